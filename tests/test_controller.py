"""Tests for uzr.controller: architectures, masking, losses, baselines, training, checkpoints."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from uzr.config import LOCALITY_WINDOW
from uzr.controller import (
    BilinearController,
    ControllerModule,
    ControllerSpec,
    RecencyPrior,
    SeedMLPController,
    build_controller,
    causal_mask,
    coerce_spec,
    controller_loss,
    load_controller,
    masked_log_softmax,
    relative_bucket,
    row_kl,
    save_controller,
    uniform_probs,
)

# ------------------------------------------------------------------------------------ synthetic data


def _padded_mask(n: int, S: int, gen: torch.Generator, min_len: int, left_every: int = 3) -> torch.Tensor:
    """(n, S) bool; random lengths, right padding except every `left_every`-th row (left padding)."""
    lengths = torch.randint(min_len, S + 1, (n,), generator=gen)
    idx = torch.arange(S)
    mask = idx[None, :] < lengths[:, None]  # (n, S) right padded
    left = (torch.arange(n) % left_every) == 0
    mask[left] = idx[None, :] >= (S - lengths[left])[:, None]  # left padded
    return mask


def _recency_rows(mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, S, S) rows p_ij ∝ weights[i - j] over allowed keys (all-zero padding rows)."""
    S = mask.shape[1]
    idx = torch.arange(S)
    w = weights[(idx[:, None] - idx[None, :]).clamp(0, len(weights) - 1)] * causal_mask(mask)  # (n, S, S)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


def _synthetic(n: int, S: int, D: int, gen: torch.Generator, layers=("1", "3")) -> list[dict]:
    """Targets are a deterministic function of the hidden states: each token carries a content id in
    its hidden state; layer 1 attends 60% to earlier tokens with the same id, 40% recency; layer 3
    30 / 70. The student's own attention is a flatter recency."""
    K = 6
    emb = torch.randn(K, D, generator=torch.Generator().manual_seed(123)) * 1.5  # fixed across splits
    ids = torch.randint(0, K, (n, S), generator=gen)
    mask = _padded_mask(n, S, gen, min_len=S // 2)
    hidden = (emb[ids] + 0.3 * torch.randn(n, S, D, generator=gen)) * mask[..., None]  # (n, S, D)
    allowed = causal_mask(mask)
    same = ((ids[:, :, None] == ids[:, None, :]) & allowed).float()
    same = same / same.sum(-1, keepdim=True).clamp_min(1)
    rec = _recency_rows(mask, torch.exp(-torch.arange(S).float() / 2))
    selfish = _recency_rows(mask, torch.exp(-torch.arange(S).float() / 8))
    mix = {"1": 0.6, "3": 0.3, "0": 0.5}
    items = []
    for b in range(n):
        items.append({
            "mask": mask[b],
            "hidden": {k: hidden[b].half() for k in layers},
            "target": {k: (mix[k] * same[b] + (1 - mix[k]) * rec[b]).half() for k in layers},
            "student_self": {k: selfish[b].half() for k in layers},
        })
    return items


class _DM(L.LightningDataModule):
    def __init__(self, train, val, batch_size):
        super().__init__()
        self.train, self.val, self.bs = train, val, batch_size

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.bs, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy shared CPU spinning threads made
    this fit 20x slower (3 s -> 60 s); one thread keeps it fast and stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


# ----------------------------------------------------------------------------------------- config


def test_spec_validation_names_key_value_and_choices():
    with pytest.raises(ValueError, match=r"arch='foo'.*bilinear \| seed_mlp"):
        coerce_spec({"arch": "foo"})
    with pytest.raises(ValueError, match=r"key_dim=0"):
        coerce_spec(ControllerSpec(key_dim=0))
    with pytest.raises(ValueError, match=r"mse_weight=-1"):
        coerce_spec({"mse_weight": -1.0})
    with pytest.raises(ValueError, match=r"bogus.*valid keys: arch"):
        coerce_spec({"bogus": 1})
    assert coerce_spec(None) == ControllerSpec(locality_window=LOCALITY_WINDOW)  # a standalone spec gets the default window


def test_relative_bucket_exact_then_log():
    d = torch.arange(0, 2000)
    b = relative_bucket(d, 32, 1024)
    assert torch.equal(b[:16], torch.arange(16))  # exact for small distances
    assert (b.diff() >= 0).all() and b.max() == 31 and b[1024] == 31
    assert b[17] == 16 and b[100] < 31  # logarithmic in between
    assert relative_bucket(torch.tensor([-5]), 32, 1024).item() == 0


# ----------------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", ["bilinear", "seed_mlp", "lru"])
def test_shapes_and_incremental_decoding_equals_forward(arch):
    torch.manual_seed(0)
    B, S, D, P = 2, 11, 16, 4
    ctrl = build_controller(ControllerSpec(arch=arch, key_dim=8, mlp_hidden=32, max_len=16), D).eval()
    h = torch.randn(B, S, D).half()  # the store's dtype
    full = ctrl(h)  # (B, S, S)
    assert full.shape == (B, S, S) and full.dtype == torch.float32
    qf, kf = ctrl.query_features(h), ctrl.key_features(h)
    assert qf.shape == (B, S, ctrl.query_dim) and kf.shape == (B, S, ctrl.key_dim)
    # Prefill P tokens, then decode one token at a time with a growing key-feature cache.
    cache = ctrl.key_features(h[:, :P])
    pre = ctrl.logits_from_features(ctrl.query_features(h[:, :P]), cache, torch.arange(P), torch.arange(P))
    torch.testing.assert_close(pre, full[:, :P, :P], atol=1e-5, rtol=1e-5)
    for t in range(P, S):
        cache = torch.cat([cache, ctrl.key_features(h[:, t : t + 1])], dim=1)  # (B, t + 1, dk)
        row = ctrl.logits_from_features(ctrl.query_features(h[:, t : t + 1]), cache,
                                        torch.tensor([t]), torch.arange(t + 1))  # (B, 1, t + 1)
        assert row.shape == (B, 1, t + 1)
        torch.testing.assert_close(row, full[:, t : t + 1, : t + 1], atol=1e-5, rtol=1e-5)
    # Per-batch (B, S) positions are accepted too.
    pos = torch.arange(S).expand(B, S)
    torch.testing.assert_close(ctrl.logits_from_features(qf, kf, pos, pos), full)


def test_bilinear_is_shift_invariant_and_uses_distance():
    torch.manual_seed(0)
    ctrl = BilinearController(ControllerSpec(key_dim=8, mlp_hidden=16), 16).eval()
    h = torch.randn(2, 6, 16)
    qf, kf = ctrl.query_features(h), ctrl.key_features(h)
    pos = torch.arange(6)
    shifted = torch.stack([pos + 3, pos + 10])  # (B, S): left padding offsets per row
    torch.testing.assert_close(ctrl.logits_from_features(qf, kf, shifted, shifted), ctrl(h))
    with torch.no_grad():  # the relative bias of distance 1 (bucket 1) must enter the logits as is
        ctrl.rel_bias[1] += 5.0
    assert torch.allclose(ctrl(h)[:, 3, 2] - (qf[:, 3] * kf[:, 2]).sum(-1) / math.sqrt(8), ctrl.rel_bias[1].detach())


def test_seed_mlp_rejects_too_long_inputs():
    ctrl = SeedMLPController(ControllerSpec(arch="seed_mlp", max_len=8), 16)
    assert ctrl(torch.randn(1, 8, 16)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="max_len=8"):
        ctrl(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="max_len=8"):
        ctrl.logits_from_features(torch.randn(1, 1, 8), torch.zeros(1, 9, 0), torch.tensor([8]), torch.arange(9))


def test_wrong_hidden_size_is_named():
    with pytest.raises(ValueError, match="hidden size 16"):
        BilinearController(ControllerSpec(), 16)(torch.randn(1, 3, 20))


# ------------------------------------------------------------------------------------- masking/loss


def test_masked_log_softmax_padding_rows_and_normalisation():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, False, False], [False, False, True, True, True]])
    allowed = causal_mask(mask)  # includes fully masked padding rows
    logits = (torch.randn(2, 5, 5) * 30).requires_grad_(True)
    logp = masked_log_softmax(logits, allowed)
    p = logp.exp()
    assert torch.isfinite(logp).all()
    rows = allowed.any(-1)
    torch.testing.assert_close(p.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert (p[~rows] == 0).all() and (p[~allowed] == 0).all()
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def _toy():
    """One sequence of 3 real tokens + 1 padding token, hand-written teacher rows."""
    t = torch.zeros(1, 4, 4)
    t[0, 0, :1] = torch.tensor([1.0])
    t[0, 1, :2] = torch.tensor([0.25, 0.75])
    t[0, 2, :3] = torch.tensor([0.5, 0.25, 0.25])
    t[0, 3] = 0.7  # garbage in the padding row: must be ignored
    mask = torch.tensor([[True, True, True, False]])
    return t, mask


def test_row_kl_closed_forms():
    t, mask = _toy()
    kl, n = row_kl(t, t, mask)
    assert n.item() == 3 and abs(kl.item()) < 1e-6
    # KL(t || uniform) = log n_i - H(t_i), summed over the 3 real rows.
    H = [0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))]
    expected = sum(math.log(n_i) - h for n_i, h in zip([1, 2, 3], H))
    kl_u, n_u = row_kl(t, uniform_probs(mask), mask)
    assert n_u.item() == 3 and abs(kl_u.item() - expected) < 1e-6
    # Same number from the training loss (mean over rows) with zero logits, and its MSE by hand.
    spec = ControllerSpec(stats_weight=1.0)
    out = controller_loss(torch.zeros(1, 4, 4), t, mask, spec)
    assert abs(out["kl"].item() - expected / 3) < 1e-6
    mse = ((0.25 - 0.5) ** 2 * 2 + (0.5 - 1 / 3) ** 2 + 2 * (0.25 - 1 / 3) ** 2) / 6
    assert abs(out["mse"].item() - mse) < 1e-6
    # Perfect logits: KL, MSE and the statistics all vanish.
    perfect = controller_loss(torch.log(t.clamp_min(1e-30)), t, mask, spec)
    for key in ("kl", "mse", "stats"):
        assert abs(perfect[key].item()) < 1e-6, key


def test_loss_gradients_finite_with_padding_and_stats():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = _synthetic(4, 12, 16, gen)
    mask = torch.stack([b["mask"] for b in batch])
    target = torch.stack([b["target"]["1"] for b in batch])
    logits = torch.randn(4, 12, 12, requires_grad=True)
    out = controller_loss(logits, target, mask, ControllerSpec(stats_weight=1.0))
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(logits.grad).all()
    assert logits.grad[~causal_mask(mask)].abs().max() == 0  # masked pairs get no gradient


# --------------------------------------------------------------------------------------- baselines


def test_recency_prior_recovers_known_recency():
    gen = torch.Generator().manual_seed(0)
    S = 40
    truth = torch.exp(-torch.arange(64).float() / 3) + 0.05  # w(d)
    train_mask = _padded_mask(96, S, gen, min_len=5)
    train_t = _recency_rows(train_mask, truth).half()
    prior = RecencyPrior(max_distance=64).fit(
        (train_t[i : i + 16], train_mask[i : i + 16]) for i in range(0, 96, 16))
    test_mask = _padded_mask(32, S, gen, min_len=2)
    test_t = _recency_rows(test_mask, truth)
    kl, n = row_kl(test_t, prior.probs(test_mask), test_mask)
    kl_u, _ = row_kl(test_t, uniform_probs(test_mask), test_mask)
    assert n.item() == test_mask.sum().item()
    assert kl.item() / n.item() < 1e-4, kl.item() / n.item()
    assert kl_u.item() / n.item() > 0.3
    ratio = (prior.log_weights[:S] - prior.log_weights[0]).exp()
    torch.testing.assert_close(ratio, truth[:S] / truth[0], rtol=0.02, atol=1e-3)


# ---------------------------------------------------------------------------------------- training


def test_training_beats_uniform_recency_and_student_self(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    S, D = 24, 32
    train, val = _synthetic(256, S, D, gen), _synthetic(96, S, D, gen)
    spec = ControllerSpec(key_dim=16, mlp_hidden=64, lr=1e-2, weight_decay=0.0, batch_size=16, max_epochs=20)
    module = ControllerModule(hidden_size=D, layers=[1, 3], spec=spec)
    _trainer(spec.max_epochs).fit(module, datamodule=_DM(train, val, spec.batch_size))
    rep = module.heldout_report()
    assert rep["val/rows/L1"] == sum(int(b["mask"].sum()) for b in val)
    for layer in ("1", "3"):
        c = rep[f"val/kl/L{layer}/controller"]
        assert c < 0.35 * rep[f"val/kl/L{layer}/uniform"], rep
        assert c < 0.5 * rep[f"val/kl/L{layer}/recency"], rep
        assert c < 0.5 * rep[f"val/kl/L{layer}/student_self"], rep
        assert rep[f"val/kl/L{layer}/recency"] < rep[f"val/kl/L{layer}/uniform"]  # the prior is a real baseline
    # Layer mean is the row-weighted mean (equal rows per layer here: plain mean of the two).
    mean = (rep["val/kl/L1/controller"] + rep["val/kl/L3/controller"]) / 2
    assert abs(rep["val/kl/controller"] - mean) < 1e-9
    assert math.isfinite(rep["val/loss"])


def test_fit_without_datamodule_fits_baselines_from_train_loader(one_thread):
    gen = torch.Generator().manual_seed(2)
    data = _synthetic(32, 10, 16, gen, layers=("0",))
    module = ControllerModule(16, [0], ControllerSpec(key_dim=8, mlp_hidden=16))
    dl = DataLoader(data, batch_size=8)
    _trainer(1).fit(module, train_dataloaders=dl, val_dataloaders=dl)
    assert module.recency["0"].fitted
    rep = module.heldout_report()
    assert {"val/kl/L0/recency", "val/kl/recency", "val/kl/L0/student_self", "val/loss"} <= set(rep)
    assert rep["val/rows/L0"] == sum(int(b["mask"].sum()) for b in data)


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("arch", ["bilinear", "seed_mlp", "lru"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    module = ControllerModule(16, [2, 5], ControllerSpec(arch=arch, key_dim=8, mlp_hidden=16, max_len=12))
    for p in module.parameters():  # make sure non-default values travel
        p.data.add_(0.01 * torch.randn_like(p))
    out = save_controller(module, tmp_path / "ckpt", {"student": "tiny-llama", "cache_key": "abc"})
    assert sorted(p.name for p in out.iterdir()) == ["controller.json", "controller.safetensors"]  # no temp left
    ctrls, meta = load_controller(out, expected={"student": "tiny-llama", "hidden_size": 16, "layers": (2, 5)})
    assert meta["cache_key"] == "abc" and meta["layers"] == [2, 5] and meta["spec"]["arch"] == arch
    h = torch.randn(2, 9, 16).half()
    for key in ("2", "5"):
        assert type(ctrls[key]) is type(module.controllers[key])
        assert torch.equal(ctrls[key](h), module.controllers[key].eval()(h))
    # A plain {layer: controller} mapping saves too.
    save_controller(dict(ctrls), tmp_path / "again", {"student": "tiny-llama"})
    assert torch.equal(load_controller(tmp_path / "again")[0]["2"](h), ctrls["2"](h))


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("student", "other-model", "student='tiny-llama' in the checkpoint"),
    ("hidden_size", 32, "hidden_size=16 in the checkpoint, hidden_size=32 now"),
    ("layers", [2], r"layers=\[2, 5\] in the checkpoint, layers=\[2\] now"),
])
def test_load_rejects_mismatched_metadata(tmp_path, field, value, shown):
    module = ControllerModule(16, [2, 5], ControllerSpec(key_dim=8, mlp_hidden=16))
    save_controller(module, tmp_path, {"student": "tiny-llama"})
    expected = {"student": "tiny-llama", "hidden_size": 16, "layers": [2, 5], field: value}
    with pytest.raises(ValueError, match=shown) as err:
        load_controller(tmp_path, expected=expected)
    assert "retrain" in str(err.value)


def test_load_rejects_damaged_files(tmp_path):
    module = ControllerModule(16, [1], ControllerSpec(key_dim=8, mlp_hidden=16))
    save_controller(module, tmp_path, {"student": "s"})
    weights = tmp_path / "controller.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="controller.safetensors.*truncated"):
        load_controller(tmp_path)
    # Without the recorded hash the weights cannot be checked: refused, never read unchecked.
    meta_path = tmp_path / "controller.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records no weights_sha256.*controller.safetensors cannot be checked"):
        load_controller(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="controller.safetensors is missing"):
        load_controller(tmp_path)


# ------------------------------------------------------------------------------ store (short dists)


def test_store_with_distributions_shorter_than_the_text_trains(tmp_path, one_thread):
    """harvest.max_dist_len=D < S: batches are the leading D positions — hidden (B, D, H), dists (B, D, D) —
    and one controller step and a validation pass run on them."""
    import numpy as np

    from uzr.controller.data import StoreDataModule
    from uzr.harvest.store import HarvestStore, StoreLayout

    D, H, layers = 16, 12, [1, 3]
    rng = np.random.default_rng(0)
    store = HarvestStore(tmp_path / "store")
    store.write_layout(StoreLayout(layers=layers, teacher_layers=[2, 5], hidden_size=H, teacher_num_layers=6,
                                   teacher_num_heads=2, student_num_layers=4, student_num_heads=2, locality_window=4,
                                   max_dist_len=D))
    rows = []
    for i, s in enumerate([30, 6, 40, 23, 9, 50]):
        n = min(s, D)
        row = {"text": f"text {i}", "input_ids": np.arange(s, dtype=np.int32), "split": ("train", "heldout")[i % 2]}
        for layer in layers:
            row[f"hidden_L{layer}"] = rng.standard_normal((s, H)).astype(np.float16)
            for column in ("teacher_dist", "student_dist"):
                p = np.tril(rng.random((n, n))) + np.eye(n)
                row[f"{column}_L{layer}"] = (p / p.sum(-1, keepdims=True)).astype(np.float16)
        rows.append(row)
    store.write_shard(0, rows)
    assert store.rows()[0]["teacher_dist_L1"].shape == (D, D) and store.rows()[0]["hidden_L1"].shape == (30, H)

    datamodule = StoreDataModule(store, layers, batch_size=3)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["mask"].shape == (3, D) and batch["mask"].sum(1).sort().values.tolist() == [9, 16, 16]
    for key in ("1", "3"):
        assert batch["hidden"][key].shape == (3, D, H)
        assert batch["target"][key].shape == batch["student_self"][key].shape == (3, D, D)
    item = datamodule.splits["train"][0]  # text 0: S = 30 cut to its leading D positions
    torch.testing.assert_close(item["hidden_L1"], torch.from_numpy(rows[0]["hidden_L1"][:D].astype(np.float32)))

    module = ControllerModule(H, layers, ControllerSpec(key_dim=8, mlp_hidden=16))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))  # it stepped
    report = module.heldout_report()
    assert report["val/rows/L1"] == 6 + 16 + 16 and math.isfinite(report["val/kl/controller"])


def test_seed_mlp_width_comes_from_the_config():
    """controller.mlp_hidden sets the seed MLP's width (conf/controller/seed_mlp.yaml: the reference 512)."""
    ctrl = build_controller(ControllerSpec(arch="seed_mlp", mlp_hidden=24, max_len=16), 32)
    widths = [m.out_features for m in ctrl.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [24, 16]


def test_every_configurable_architecture_is_built():
    """uzr.config's ARCHS (validated without torch) and the controller registry name the same architectures."""
    from uzr.config import ARCHS
    from uzr.controller.archs import CONTROLLERS

    assert set(ARCHS) == set(CONTROLLERS)
    for arch in ARCHS:
        assert isinstance(build_controller(ControllerSpec(arch=arch, max_len=8), 16), CONTROLLERS[arch])
