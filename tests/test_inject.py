"""Injector parity, effect, removal and KV-cache decoding on every architecture family."""

from __future__ import annotations

import pytest
import torch

from uzr.controller import ControllerSpec, build_controller
from uzr.injection.injector import AlphaSpec, Injector, alpha_rows

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


LONG_PROMPT = "Attention habits of a large model, poured into a small one while it runs, one layer at a time:"


def recomputed_logits(model, ctrls, alpha, ids, mask, n_prompt, steps):
    """Next-token logits (steps, B, V) of decoding the given ``ids`` by recomputing every prefix without a cache."""
    out = []
    with Injector(ctrls, alpha, "bias", prompt_len=n_prompt).attach(model), torch.no_grad():
        for step in range(steps):
            end = n_prompt + step
            positions = (mask[:, :end].cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each text
            out.append(model(input_ids=ids[:, :end], attention_mask=mask[:, :end], position_ids=positions,
                             use_cache=False).logits[:, -1])
    return torch.stack(out)


def generated(model, enc, new, **kwargs):
    return model.generate(**enc, max_new_tokens=new, min_new_tokens=new, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", ["constant", "linear", "entropy_local"])
def test_generate_with_cache_equals_recompute(tiny_models, family, schedule):
    """Greedy generate() with injection == decoding that recomputes the whole prefix without a cache.

    The prompt is longer than Gemma 3's sliding window (8), so its sliding layers decode from a
    truncated KV cache."""
    model, tok = tiny_models[family]
    ctrls = controllers_for(model, [0, 1], seed=1)
    prompt = tok(LONG_PROMPT, return_tensors="pt")
    n_prompt, new = prompt["input_ids"].shape[1], 12
    assert n_prompt > 8
    alpha = AlphaSpec(schedule=schedule, value=1.5, warmup_steps=4)
    with Injector(ctrls, alpha, "bias").attach(model), torch.no_grad():
        out = generated(model, prompt, new, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = prompt["input_ids"]
    with Injector(ctrls, alpha, "bias", prompt_len=n_prompt).attach(model), torch.no_grad():
        for step in range(new):
            step_logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, out.logits[step], atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, out.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_left_padded_batch_sampled_and_twice(tiny_models, family):
    """Batch > 1 with left padding, sampled decoding, and a second generate() on the same attached injector:
    every step's logits equal the recompute of the tokens generate() chose (within 1e-4)."""
    model, tok = tiny_models[family]
    ctrls = controllers_for(model, [0, 1], seed=2)
    tok.padding_side = "left"
    enc = tok([LONG_PROMPT, "A short one."], return_tensors="pt", padding=True)
    n_prompt, new = enc["input_ids"].shape[1], 10
    alpha = AlphaSpec(schedule="linear", value=1.5, warmup_steps=3)
    injector = Injector(ctrls, alpha, "bias").attach(model)
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            sampled = generated(model, enc, new, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                pad_token_id=tok.pad_token_id)
            greedy = generated(model, enc, new, do_sample=False, pad_token_id=tok.pad_token_id)
            again = generated(model, enc, new, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        injector.remove()
    assert torch.equal(greedy.sequences, again.sequences)  # the second call starts afresh
    for out in (sampled, greedy, again):
        mask = torch.cat([enc["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1)
        expected = recomputed_logits(model, ctrls, alpha, out.sequences, mask, n_prompt, new)
        torch.testing.assert_close(torch.stack(out.logits), expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(sampled.sequences, greedy.sequences)


class CallCounter:
    """Counts calls of a controller's feature functions (the controller's work per layer)."""

    def __init__(self, ctrls):
        self.calls = {layer: {"key": 0, "query": 0} for layer in ctrls}
        for layer, ctrl in ctrls.items():
            for kind in ("key", "query"):
                fn = getattr(ctrl, f"{kind}_features")
                setattr(ctrl, f"{kind}_features", self._counted(layer, kind, fn))

    def _counted(self, layer, kind, fn):
        def counted(hidden):
            self.calls[layer][kind] += 1
            return fn(hidden)

        return counted


def test_layers_at_alpha_zero_never_run_their_controller(tiny_models):
    model, tok = tiny_models["llama"]
    prompt = tok(LONG_PROMPT, return_tensors="pt")
    ctrls = controllers_for(model, [0, 1, 2])
    counter = CallCounter(ctrls)
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        with Injector(ctrls, AlphaSpec(value=0.0), "bias").attach(model):
            zero = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(zero, plain)
        assert all(c == {"key": 0, "query": 0} for c in counter.calls.values())
        with Injector(ctrls, AlphaSpec(value=1.0, layer_weights={1: 0.0}), "bias").attach(model):
            model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert counter.calls[1] == {"key": 0, "query": 0}
    assert counter.calls[0] == counter.calls[2] == {"key": 4, "query": 4}  # prefill + 3 decoding steps


def test_warmup_prompt_caches_keys_without_logits(tiny_models):
    """A linear warm-up gives the prompt alpha 0: its keys are cached for decoding, its queries never scored."""
    model, tok = tiny_models["qwen2"]
    prompt = tok(LONG_PROMPT, return_tensors="pt")
    ctrls = controllers_for(model, [1])
    counter = CallCounter(ctrls)
    with Injector(ctrls, AlphaSpec(schedule="linear", value=1.0, warmup_steps=2), "bias").attach(model), torch.no_grad():
        model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert counter.calls[1] == {"key": 3, "query": 2}  # the prefill computed keys only


@pytest.mark.real
def test_packaged_student_generate_with_cache_equals_recompute(converted_models, tmp_path):
    from tests.conftest import model_spec, share_models
    from uzr.models import load_model

    # the session's converted models (not the repository's cache: a test leaves nothing there)
    model, tok = load_model(model_spec("student/smollm2_135m"), cache_dir=share_models(tmp_path, converted_models))
    ctrls = controllers_for(model, [4, 15, 26], seed=3)
    for ctrl in ctrls.values():  # the random prior, tempered so the student still writes text
        for p in ctrl.parameters():
            p.data.mul_(0.2)
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    n_prompt, new = enc["input_ids"].shape[1], 6
    alpha = AlphaSpec(value=1.0)
    with Injector(ctrls, alpha, "bias").attach(model), torch.no_grad():
        out = generated(model, enc, new, do_sample=False, pad_token_id=tok.pad_token_id)
    mask = torch.cat([enc["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1)
    expected = recomputed_logits(model, ctrls, alpha, out.sequences, mask, n_prompt, new)
    torch.testing.assert_close(torch.stack(out.logits), expected, atol=1e-4, rtol=1e-4)


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
