"""Per-head targets (``controller.target=per_head``, issue 13): head matching, the per-head store, controller and
oracle, checked on tiny models through the harvest's own code."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from uzr.config.model import DamageSpec
from uzr.evaluate.sources import text_prior
from uzr.harvest import harvester as harvester_module
from uzr.harvest.harvester import Harvester
from uzr.harvest.head_matching import match_heads, match_store
from uzr.injection.injector import AlphaSpec, Injector
from uzr.models import load_model

from .conftest import model_spec, resolved

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun.",
    "Attention habits of a large model, poured into a small one while it runs.",
    "def add(a, b):\n    return a + b  # numbers, strings and lists alike",
    "Short texts and long texts share one store; every head keeps its own rows.",
]
LAYER = 1


def harvest(teacher, student, tok, layers=(LAYER,)) -> list[dict]:
    """Per-head store rows of ``TEXTS`` (same tokenizer on both sides: the identity alignment)."""
    h = Harvester(teacher, tok, student, tok, list(layers), list(layers), window=4, block_size=8, max_length=64,
                  max_dist_len=64, per_head=True)
    try:
        return [h(text) for text in TEXTS]
    finally:
        h.close()


def logits(model, ids, injector=None):
    with torch.no_grad():
        if injector is None:
            return model(input_ids=ids).logits
        with injector.attach(model):
            return model(input_ids=ids).logits


def permute_heads(model, layer: int, perm: list[int], kv_perm: list[int]) -> None:
    """Make head ``h`` of ``layer`` the old head ``perm[h]`` (queries, keys, values and output columns moved
    together, so the model computes exactly what it did). ``kv_perm`` moves the key/value heads so that each
    moved query head still meets its own keys (grouped-query attention)."""
    attn = model.model.layers[layer].self_attn
    cfg = model.config
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads

    def rows(linear, order):
        idx = torch.cat([torch.arange(i * d, (i + 1) * d) for i in order])
        with torch.no_grad():
            linear.weight.copy_(linear.weight[idx].clone())
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[idx].clone())

    rows(attn.q_proj, perm)
    rows(attn.k_proj, kv_perm)
    rows(attn.v_proj, kv_perm)
    idx = torch.cat([torch.arange(i * d, (i + 1) * d) for i in perm])
    with torch.no_grad():
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, idx].clone())


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_head_matching_recovers_a_known_permutation(tiny_models, family):
    """A copy whose heads are permuted computes the same logits; matching on its attention maps it back."""
    teacher, tok = tiny_models[family]
    student = copy.deepcopy(teacher)
    perm, kv_perm = [3, 2, 0, 1], [1, 0]  # group 0's heads come from group 1 and the other way round
    permute_heads(student, LAYER, perm, kv_perm)
    ids = tok([TEXTS[0]], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(logits(student, ids), logits(teacher, ids), atol=1e-5, rtol=1e-5)
    matching = match_store(harvest(teacher, student, tok), [LAYER])[f"L{LAYER}"]
    assert matching["teacher_heads"] == perm and matching["method"] == "hungarian"
    cost = np.asarray(matching["cost"])  # (H_t, H_s) mean KL per row
    assert cost.shape == (4, 4)
    assert all(cost[perm[h], h] < 1e-3 for h in range(4))  # float16 rows: the matched pairs are ~0 KL
    assert min(cost[t, h] for h in range(4) for t in range(4) if t != perm[h]) > 10 * cost[perm, range(4)].max()


def test_match_heads_with_unequal_head_counts():
    cost = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1]])  # 2 teacher heads, 3 student heads
    assert match_heads(cost) == ([0, 1, 1], "min_kl_many_to_one")  # each student head its nearest teacher head
    wide = np.array([[0.1, 0.12], [0.2, 0.9], [0.9, 0.5]])  # 3 teacher heads, 2 student heads, both nearest 0
    assert match_heads(wide) == ([1, 0], "hungarian")  # distinct teacher heads, least total (0.2 + 0.12)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_per_head_oracle_in_mix_mode_restores_the_undamaged_teacher(tiny_models, family, monkeypatch):
    """The machinery's own check: the student is the teacher with layer 1's attention flattened (student.damage);
    the per-head oracle built from the harvest (head matching, the matched teacher rows, ``inject.source=teacher``)
    in ``mix`` mode at alpha 1 gives back the undamaged teacher's logits."""
    teacher, tok = tiny_models[family]
    name = {"qwen2": "student/tiny_qwen2", "gemma3": "student/tiny_gemma3"}[family]
    student, _ = load_model(replace(model_spec(name), damage=DamageSpec(layers=[LAYER], kind="temperature",
                                                                        strength=4.0)))
    # the store keeps float16; the machinery itself is exact, so this check keeps float32
    monkeypatch.setattr(harvester_module, "f16", lambda t: t.float().cpu().numpy())
    rows = harvest(teacher, student, tok)
    matching = match_store(rows, [LAYER])
    heads_of = {LAYER: matching[f"L{LAYER}"]["teacher_heads"]}
    assert heads_of[LAYER] == [0, 1, 2, 3]  # the damaged copy's heads are matched to their undamaged selves
    oracle = text_prior("teacher", {LAYER: None}, rows, "cpu", heads_of)
    head_mean = text_prior("teacher", {LAYER: None}, rows, "cpu")
    for row in rows:
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)[None]
        target = logits(teacher, ids)
        assert (logits(student, ids) - target).abs().max() > 1e-3  # the damage is real
        restored = logits(student, ids, Injector(oracle(ids, row), AlphaSpec(value=1.0), "mix", prompt_len=0))
        torch.testing.assert_close(restored, target, atol=1e-5, rtol=1e-5)
        mean = logits(student, ids, Injector(head_mean(ids, row), AlphaSpec(value=1.0), "mix", prompt_len=0))
        assert (mean - target).abs().max() > 1e-4  # the head-mean oracle cannot restore each head


def test_per_head_store_rows_and_controller_shapes(tiny_models, tmp_path):
    """Store columns (H, D, D) with D = min(S, max_dist_len); batches (B, H, S, S); the controller predicts
    one distribution per head, trains, and round-trips through its checkpoint."""
    from uzr.controller import ControllerModule, load_controller, save_controller
    from uzr.controller.data import StoreDataModule
    from uzr.harvest.store import HarvestStore, StoreLayout

    teacher, tok = tiny_models["gemma3"]
    student, s_tok = tiny_models["llama"]  # other tokenizer, other width: 4 heads each
    h = Harvester(teacher, tok, student, s_tok, [1, 2], [1, 3], window=4, block_size=8, max_length=40,
                  max_dist_len=16, per_head=True)
    try:
        rows = [{**h(text), "split": split} for text, split in zip(TEXTS, ["train", "train", "heldout", "heldout"])]
    finally:
        h.close()
    for row in rows:
        s = len(row["input_ids"])
        d = min(s, 16)
        assert row["teacher_heads_L1"].shape == row["student_heads_L2"].shape == (4, d, d)
        # the head mean of the stored heads is the stored head-mean row (float16 rounding)
        np.testing.assert_allclose(row["student_heads_L2"].astype(np.float32).mean(0),
                                   row["student_dist_L2"].astype(np.float32), atol=2e-3)
    store = HarvestStore(tmp_path / "store")
    layout = StoreLayout(layers=[1, 2], teacher_layers=[1, 3], hidden_size=48, teacher_num_layers=4,
                         teacher_num_heads=4, student_num_layers=3, student_num_heads=4, locality_window=4,
                         max_dist_len=16, per_head=True)
    store.write_layout(layout)
    store.write_shard(0, rows)
    layout.head_matching = match_store(store.rows("train"), [1, 2])
    store.write_layout(layout)
    assert store.rows()[0]["teacher_heads_L1"].shape == (4, 16, 16)  # reshaped from layout.json

    dm = StoreDataModule(store, [1, 2], batch_size=2, per_head=True)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))  # not shuffled: item 0 is the first held-out row
    s = int(batch["mask"].shape[1])
    assert batch["target"]["1"].shape == batch["student_self"]["2"].shape == (2, 4, s, s)
    matched = layout.head_matching["L1"]["teacher_heads"]
    first = store.rows("heldout")[0]
    n = int(batch["mask"][0].sum())
    np.testing.assert_allclose(batch["target"]["1"][0, :, :n, :n].numpy(),
                               first["teacher_heads_L1"][matched].astype(np.float32))
    np.testing.assert_allclose(batch["student_self"]["2"][0, :, :n, :n].numpy(),
                               first["student_heads_L2"].astype(np.float32))

    spec = resolved("controller.target=per_head", "controller.key_dim=8", "controller.mlp_hidden=16").controller
    module = ControllerModule(48, [1, 2], spec, heads=4)
    assert module.controllers["1"](batch["hidden"]["1"]).shape == (2, 4, s, s)
    module.fit_baselines(dm.train_dataloader())
    loss, outs, _ = module._layer_losses(batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert module.controllers["1"].rel_bias.grad.shape == (4, spec.num_buckets)  # one relative bias per head
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    assert int(module._rows[0, 0]) == 4 * int(batch["mask"].sum())  # every head's rows: heads x tokens
    save_controller(module, tmp_path / "ctrl")
    loaded, meta = load_controller(tmp_path / "ctrl")
    assert meta["heads"] == 4
    torch.testing.assert_close(loaded["1"](batch["hidden"]["1"]), module.controllers["1"](batch["hidden"]["1"]))
    with pytest.raises(ValueError, match="per_head needs the student's number of heads"):
        ControllerModule(48, [1], spec)


def test_a_head_mean_store_is_never_used_for_per_head(tmp_path):
    from uzr.controller.data import StoreDataModule
    from uzr.harvest.stage import HarvestStage
    from uzr.harvest.store import HarvestStore, StoreLayout
    from uzr.runner import artifact_keys

    def keys(*overrides):
        return artifact_keys(resolved("+experiment=positive_control", *overrides), ["controller"])

    head_mean, per_head = keys("controller.target=head_mean"), keys()  # the positive control is per head
    assert head_mean["harvest"] != per_head["harvest"] and head_mean["controller"] != per_head["controller"]
    assert keys("controller.target=per_head") == per_head  # the default and the override: one store, one controller
    # head-mean keys stay as they were before per-head targets existed (old caches stay valid)
    payload = HarvestStage().key_payload(resolved("+experiment=positive_control", "controller.target=head_mean"), {})
    assert "target" not in payload
    store = HarvestStore(tmp_path / "store")
    store.write_layout(StoreLayout(layers=[1], teacher_layers=[1], hidden_size=8, teacher_num_layers=2,
                                   teacher_num_heads=2, student_num_layers=2, student_num_heads=2, locality_window=4))
    store.write_shard(0, [{"input_ids": np.zeros(3, np.int32), "split": "train"}])
    with pytest.raises(ValueError, match="holds head-mean targets only"):
        StoreDataModule(store, [1], per_head=True).setup()


def test_bad_target_fails_before_models_load():
    with pytest.raises(ValueError, match=r"controller.target='per_layer' is invalid; valid: head_mean \| per_head"):
        resolved("controller.target=per_layer")


@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_per_head_controller_decodes_with_its_key_cache(tiny_models, mode):
    """A per-head controller injects one distribution per head, and greedy generate() (cached key features)
    equals recomputing every prefix without a cache."""
    from uzr.controller import ControllerSpec, build_controller
    from uzr.injection.priors import ControllerPrior

    from .test_inject import LONG_PROMPT, generated

    model, tok = tiny_models["gemma3"]
    torch.manual_seed(3)
    spec = ControllerSpec(key_dim=8, mlp_hidden=16, target="per_head")
    ctrls = {layer: build_controller(spec, model.config.hidden_size, heads=4).eval() for layer in (0, 1)}
    for ctrl in ctrls.values():  # random but not tiny, so heads differ and the prior is far from uniform
        for p in ctrl.parameters():
            p.data.normal_(0, 0.5)
    prompt = tok(LONG_PROMPT, return_tensors="pt")
    ids = prompt["input_ids"]
    hidden = torch.randn(1, ids.shape[1], model.config.hidden_size)
    rows = ControllerPrior(ctrls).controllers[0](hidden)  # (1, 4, S, S): one row per head
    assert rows.shape == (1, 4, ids.shape[1], ids.shape[1]) and (rows[:, 0] - rows[:, 1]).abs().max() > 1e-2
    alpha, n_prompt, new = AlphaSpec(value=1.0), ids.shape[1], 6
    with Injector(ctrls, alpha, mode).attach(model), torch.no_grad():
        out = generated(model, prompt, new, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = logits(model, ids)
    with Injector(ctrls, alpha, mode, prompt_len=n_prompt).attach(model), torch.no_grad():
        assert (model(input_ids=ids).logits - plain).abs().max() > 1e-3  # the injection does something
        for step in range(new):
            step_logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, out.logits[step], atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, out.sequences)


def test_output_slot_matching_repairs_permuted_heads(tiny_models, monkeypatch):
    """``student.damage.kind=permute_heads`` moves query heads only: head h attends like teacher head perm[h] but
    writes into slot h. Attention matching pairs h with perm[h] (the oracle then changes nothing); output-slot
    matching (``harvest.head_matching=output``) pairs h with h, and the per-head oracle in mix mode at alpha 1
    restores the undamaged teacher's logits."""
    from uzr.harvest.head_matching import match_outputs

    teacher, tok = tiny_models["gemma3"]  # the positive control's family (one key/value group per 2 heads here)
    student, _ = load_model(replace(model_spec("student/tiny_gemma3"), damage=DamageSpec(layers=[LAYER], kind="permute_heads",
                                                                        strength=1.0)))
    monkeypatch.setattr(harvester_module, "f16", lambda t: t.float().cpu().numpy())
    rows = harvest(teacher, student, tok)
    by_attention = match_store(rows, [LAYER])[f"L{LAYER}"]["teacher_heads"]
    by_output = match_outputs(teacher, student, [LAYER], [LAYER])[f"L{LAYER}"]["teacher_heads"]
    assert by_output == [0, 1, 2, 3] and by_attention != by_output
    ids = torch.as_tensor(rows[0]["input_ids"], dtype=torch.long)[None]
    target = logits(teacher, ids)
    for heads, restores in ((by_output, True), (by_attention, False)):
        oracle = text_prior("teacher", {LAYER: None}, rows, "cpu", {LAYER: heads})
        out = logits(student, ids, Injector(oracle(ids, rows[0]), AlphaSpec(value=1.0), "mix", prompt_len=0))
        assert torch.allclose(out, target, atol=1e-5, rtol=1e-5) == restores
