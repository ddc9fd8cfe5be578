"""SVF experts: exactness at the initial z, one entry -> one matrix, exact removal, training edit, checkpoints."""

from __future__ import annotations

import pytest
import torch

from uzr.adapters.svd import decompose, target_matrices, weights_hash
from uzr.adapters.svf import (
    INIT_Z,
    SVFEdit,
    SVFExpert,
    SVFTrainable,
    expert_meta,
    initial_z,
    load_expert,
    mix_masks,
    save_expert,
)
from uzr.attention import decoder_of

FAMILIES = ("llama", "qwen2", "gemma3")
TEXTS = ["A short one.", "The quick brown fox jumps over the lazy dog."]


def logits(model, tok):
    tok.padding_side = "right"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("matrices", ["mlp", "mlp+attn"])
def test_initial_z_is_bit_identical_and_removal_restores_every_weight(tiny_models, family, matrices):
    model, tok = tiny_models[family]
    decomp = decompose(target_matrices(model, matrices))
    plain, before = logits(model, tok), state(model)
    masks = SVFExpert(initial_z(decomp)).masks()
    with SVFEdit(decomp, masks).attach(model):
        assert torch.equal(logits(model, tok), plain)
    z = initial_z(decomp)
    for name in z:  # a non-uniform expert on every matrix changes the logits ...
        z[name] = torch.linspace(-2, 2, z[name].numel())
    with SVFEdit(decomp, SVFExpert(z).masks()).attach(model):
        assert (logits(model, tok) - plain).abs().max() > 1e-4
    after = state(model)  # ... and removing it restores the state dict bit for bit
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, tok), plain)


def test_one_z_entry_changes_exactly_its_matrix_by_the_formula(tiny_models):
    model, _ = tiny_models["llama"]
    linears = target_matrices(model, "mlp+attn")
    decomp = decompose(linears)
    name = "layers.1.mlp.down_proj"
    z = initial_z(decomp)
    z[name][2] = 3.0
    before = state(model)
    prefix = "model."  # the decoder of a causal LM sits under .model
    with SVFEdit(decomp, SVFExpert(z).masks()).attach(model):
        after = state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [f"{prefix}{name}.weight"]
    U, S, Vh = decomp.U[name], decomp.S[name], decomp.Vh[name]
    m = torch.sigmoid(z[name])
    want = U @ torch.diag(S * m) @ Vh * (S.sum() / (S * m).sum())  # the reference's compose_new_params
    got = after[f"{prefix}{name}.weight"]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, before[f"{prefix}{name}.weight"], atol=1e-3)


def test_trainable_edit_matches_the_materialised_one_and_never_touches_weights(tiny_models):
    model, tok = tiny_models["qwen2"]
    decomp = decompose(target_matrices(model, "mlp"))
    plain, before = logits(model, tok), state(model)
    trainable = SVFTrainable(decomp)
    with trainable.attach(model):
        assert torch.allclose(logits(model, tok), plain, atol=1e-5)  # initial z: W' = W up to rounding
        with torch.no_grad():
            for p in trainable.z:
                p.copy_(torch.linspace(-1.5, 2.5, p.numel()))
        hooked = logits(model, tok)
    with SVFEdit(decomp, trainable.masks()).attach(model):
        materialised = logits(model, tok)
    assert (hooked - plain).abs().max() > 1e-4
    assert torch.allclose(hooked, materialised, atol=1e-4)
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, tok), plain)


def test_gradients_reach_z_only(tiny_models):
    model, tok = tiny_models["llama"]
    decomp = decompose(target_matrices(model, "mlp", layers=[0, 2]))
    trainable = SVFTrainable(decomp)
    enc = tok(TEXTS[:1], return_tensors="pt")
    with trainable.attach(model):
        model(**enc).logits.float().pow(2).mean().backward()
    grads = [p.grad for p in trainable.z]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())
    assert {n.split(".")[1] for n in trainable.names} == {"0", "2"}


def test_mixture_of_uniform_masks_is_exact_and_mix_is_per_layer(tiny_models):
    model, tok = tiny_models["llama"]
    decomp = decompose(target_matrices(model, "mlp"))
    z1, z2 = initial_z(decomp), initial_z(decomp)
    for name in z2:
        z2[name] = torch.linspace(-1, 1, z2[name].numel())
    m1, m2 = SVFExpert(z1).masks(), SVFExpert(z2).masks()
    coeffs = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.7, 1.0]])  # (experts, layers)
    mixed = mix_masks([m1, m2], coeffs)
    assert torch.equal(mixed["layers.0.mlp.up_proj"], m1["layers.0.mlp.up_proj"])
    assert torch.equal(mixed["layers.2.mlp.up_proj"], m2["layers.2.mlp.up_proj"])
    assert torch.allclose(mixed["layers.1.mlp.up_proj"], 0.3 * m1["layers.1.mlp.up_proj"] + 0.7 * m2["layers.1.mlp.up_proj"])
    plain = logits(model, tok)
    with SVFEdit(decomp, mix_masks([m1, m1], torch.full((2, 3), 0.5))).attach(model):
        assert torch.equal(logits(model, tok), plain)
    with pytest.raises(ValueError, match="expected"):
        mix_masks([m1, m2], torch.ones(2, 2))


def test_decomposition_cache_is_reused_and_keyed_by_model_hash(tiny_models, tmp_path):
    lin_a = target_matrices(tiny_models["llama"][0], "mlp")
    lin_b = target_matrices(tiny_models["qwen2"][0], "mlp")
    first = decompose(lin_a, tmp_path)
    files = list((tmp_path / "svd").iterdir())
    assert [f.name for f in files] == [f"v1-{weights_hash(lin_a)}.safetensors"]
    again = decompose(lin_a, tmp_path)
    assert all(torch.equal(first.U[n], again.U[n]) and torch.equal(first.S[n], again.S[n]) for n in first.names)
    other = decompose(lin_b, tmp_path)
    assert other.model_hash != first.model_hash and len(list((tmp_path / "svd").iterdir())) == 2
    w = lin_a["layers.0.mlp.up_proj"].weight
    assert torch.allclose(first.U["layers.0.mlp.up_proj"] * first.S["layers.0.mlp.up_proj"]
                          @ first.Vh["layers.0.mlp.up_proj"], w, atol=1e-5)


def test_expert_checkpoint_round_trip_and_refusals(tiny_models, tmp_path):
    model, _ = tiny_models["llama"]
    decomp = decompose(target_matrices(model, "mlp"))
    z = initial_z(decomp)
    z["layers.0.mlp.gate_proj"][0] = -1.0
    meta = expert_meta(decomp, "tiny_llama", "mlp", None, "arithmetic", "reinforce")
    save_expert(tmp_path / "e", SVFExpert(z, meta))
    loaded = load_expert(tmp_path / "e", expected={"student": "tiny_llama", "matrices": "mlp"}, decomp=decomp)
    assert all(torch.equal(loaded.z[n], z[n]) for n in z) and loaded.meta["domain"] == "arithmetic"
    assert loaded.meta["layers"] == [0, 1, 2] and float(loaded.z["layers.1.mlp.up_proj"][0]) == pytest.approx(INIT_Z)
    with pytest.raises(ValueError, match="matrices='mlp' in the checkpoint.*'mlp\\+attn' now"):
        load_expert(tmp_path / "e", expected={"matrices": "mlp+attn"})
    other = decompose(target_matrices(tiny_models["qwen2"][0], "mlp"))
    with pytest.raises(ValueError, match="model_hash"):
        load_expert(tmp_path / "e", decomp=other)
    with pytest.raises(ValueError, match="lacks"):
        save_expert(tmp_path / "f", SVFExpert(z, {"domain": "facts"}))
    assert sum(int(t.numel()) for t in z.values()) == SVFExpert(z).num_parameters


def test_target_matrices_names_and_bad_choices(tiny_models):
    model, _ = tiny_models["llama"]
    names = list(target_matrices(model, "mlp", layers=[1]))
    assert names == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    assert all(decoder_of(model).get_submodule(n) is not None for n in target_matrices(model, "attn"))
    with pytest.raises(ValueError, match="svf.matrices='ffn'.*mlp, attn, mlp\\+attn"):
        target_matrices(model, "ffn")
    with pytest.raises(ValueError, match="svf.layers"):
        target_matrices(model, "mlp", layers=[7])


def test_frozen_training_edit_materialises_what_the_hooks_compute(tiny_models):
    """Sampling uses SVFTrainable.frozen() (weights written once): same logits as the hooks, base restored."""
    model, tok = tiny_models["llama"]
    decomp = decompose(target_matrices(model, "mlp"))
    z = {n: torch.linspace(-2, 2, s.numel()) for n, s in decomp.S.items()}
    trainable = SVFTrainable(decomp, z)
    plain, before = logits(model, tok), state(model)
    with trainable.attach(model):
        hooked = logits(model, tok)
    with trainable.frozen().attach(model):
        materialised = logits(model, tok)
    assert (hooked - plain).abs().max() > 1e-3 and torch.allclose(materialised, hooked, atol=1e-4)
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_pooled_states_in_padded_batches_equal_one_text_at_a_time(tiny_models):
    """The classifier strategy's features: batching (right padding, masked mean) changes nothing."""
    import numpy as np

    from uzr.adapters.evaluation import pooled_states

    model, tok = tiny_models["qwen2"]
    texts = ["a", "hello there, general", "abc def", "x" * 30]
    batched = pooled_states(model, tok, texts, batch_size=3)
    single = np.concatenate([pooled_states(model, tok, [t], batch_size=1) for t in texts])
    assert batched.shape == (4, model.config.hidden_size)
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=1e-4)
