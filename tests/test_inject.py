"""Injector parity, effect, removal and KV-cache decoding on every architecture family."""

from __future__ import annotations

import pytest
import torch

from uzr.controller import ControllerSpec, build_controller
from uzr.inject import AlphaSpec, Injector, alpha_rows

FAMILIES = ("llama", "qwen2", "gemma3")
TEXTS = ["A short one.", "The quick brown fox jumps over the lazy dog, again and again and again."]


def controllers_for(model, layers, seed=0):
    torch.manual_seed(seed)
    spec = ControllerSpec(key_dim=16, mlp_hidden=32)
    ctrls = {layer: build_controller(spec, model.config.hidden_size).eval() for layer in layers}
    for ctrl in ctrls.values():  # random but not tiny, so the prior is far from uniform
        for p in ctrl.parameters():
            p.data.normal_(0, 0.5)
    return ctrls


def batch(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_alpha_zero_is_exact_and_alpha_positive_changes(tiny_models, family, padding_side, mode):
    model, tok = tiny_models[family]
    model.set_attn_implementation("sdpa")
    enc = batch(tok, padding_side)
    real = enc["attention_mask"].bool()
    plain = logits(model, enc)
    layers = [0, model.config.num_hidden_layers - 1]
    ctrls = controllers_for(model, layers)
    with Injector(ctrls, AlphaSpec(value=0.0), mode).attach(model):
        assert torch.equal(logits(model, enc), plain)  # bit-identical, padding respected
    with Injector(ctrls, AlphaSpec(value=1.0), mode).attach(model):
        injected = logits(model, enc)
    assert torch.isfinite(injected[real]).all()
    assert (injected - plain)[real].abs().max() > 1e-3
    assert torch.equal(logits(model, enc), plain)  # removed: original outputs exactly
    assert not any(hasattr(m.self_attn, "uzr_injector") for m in model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_injected_rows(tiny_models, family):
    """The injected logits of a text are the same alone and left-padded in a batch."""
    model, tok = tiny_models[family]
    ctrls = controllers_for(model, [1])
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    alone = tok(TEXTS[0], return_tensors="pt")
    with Injector(ctrls, AlphaSpec(value=0.8), "bias", prompt_len=0).attach(model):
        padded = logits(model, enc)[0, -alone["input_ids"].shape[1]:]
        single = logits(model, alone)[0]
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", ["constant", "linear", "entropy_local"])
def test_generate_with_cache_equals_recompute(tiny_models, family, schedule):
    """Greedy generate() with injection == decoding that recomputes the whole prefix without a cache."""
    model, tok = tiny_models[family]
    ctrls = controllers_for(model, [0, 1], seed=1)
    prompt = tok("Attention habits of", return_tensors="pt")
    n_prompt, new = prompt["input_ids"].shape[1], 12
    alpha = AlphaSpec(schedule=schedule, value=1.5, warmup_steps=4)
    with Injector(ctrls, alpha, "bias").attach(model), torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    ids = prompt["input_ids"]
    with Injector(ctrls, alpha, "bias", prompt_len=n_prompt).attach(model), torch.no_grad():
        for step in range(new):
            step_logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, out.logits[step], atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, out.sequences)


def test_generate_alpha_changes_tokens(tiny_models):
    model, tok = tiny_models["llama"]
    prompt = tok("Attention habits of", return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with Injector(controllers_for(model, [0, 1, 2]), AlphaSpec(value=4.0), "bias").attach(model), torch.no_grad():
        injected = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not torch.equal(plain, injected)


def test_alpha_schedules_values():
    steps = torch.tensor([0, 2, 4, 8])
    ent = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    lin = alpha_rows(AlphaSpec(schedule="linear", value=2.0, warmup_steps=4), 0, steps, ent)
    torch.testing.assert_close(lin, torch.tensor([[0.0, 1.0, 2.0, 2.0]]))
    cos = alpha_rows(AlphaSpec(schedule="cosine", value=2.0, warmup_steps=4), 0, steps, ent)
    torch.testing.assert_close(cos, torch.tensor([[0.0, 1.0, 2.0, 2.0]]), atol=1e-6, rtol=0)
    cos1 = alpha_rows(AlphaSpec(schedule="cosine", value=1.0, warmup_steps=4), 0, torch.tensor([1]), ent[:, :1])
    assert abs(float(cos1) - (1 - 2 ** -0.5) / 2) < 1e-6
    local = alpha_rows(AlphaSpec(schedule="entropy_local", value=2.0), 0, steps, ent)
    torch.testing.assert_close(local, torch.tensor([[2.0, 1.0, 0.0, 1.5]]))
    weighted = alpha_rows(AlphaSpec(value=2.0, layer_weights={3: 0.25}), 3, steps, ent)
    torch.testing.assert_close(weighted, torch.full((1, 4), 0.5))


@pytest.mark.parametrize("bad, message", [
    (dict(value=-0.1), "alpha.value=-0.1 must be a finite number >= 0"),
    (dict(value=float("nan")), "alpha.value=nan"),
    (dict(schedule="warm"), "valid choices: constant, linear, cosine, entropy_local, gated"),
    (dict(warmup_steps=0), "alpha.warmup_steps=0"),
])
def test_bad_alpha_rejected(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Injector({}, AlphaSpec(**bad))


def test_injector_is_a_model_edit_removed_even_when_the_pass_fails(tiny_models):
    """``with injected(model, edit):`` detaches the edit on error too; the model is then exactly the plain one."""
    from uzr.hooks import ModelEdit, injected

    model, tok = tiny_models["qwen2"]
    enc = batch(tok, "right")
    plain = logits(model, enc)
    injector = Injector(controllers_for(model, [1]), AlphaSpec(value=2.0), "bias")
    assert isinstance(injector, ModelEdit)
    with pytest.raises(RuntimeError, match="boom"), injected(model, injector):
        assert not torch.equal(logits(model, enc), plain)
        raise RuntimeError("boom")
    assert not any(hasattr(m.self_attn, "uzr_injector") for m in model.model.layers)
    assert not any(m.self_attn._forward_pre_hooks for m in model.model.layers)
    assert torch.equal(logits(model, enc), plain)
