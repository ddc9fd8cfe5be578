"""The priors of ``inject.source``: each injects what it claims, checked against the model's own attention."""

from __future__ import annotations

import pytest
import torch

from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.priors import RowsPrior, StudentSelfPrior, UniformPrior

FAMILIES = ("llama", "qwen2", "gemma3")
TEXT = "Attention habits of a large model, poured into a small one while it runs, one layer at a time."


def eager_attentions(model, enc) -> tuple[torch.Tensor, ...]:
    """Per-layer (B, H, S, S) attention probabilities from transformers' own eager path."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**enc, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def logits(model, enc, injector=None):
    with torch.no_grad():
        if injector is None:
            return model(**enc).logits
        with injector.attach(model):
            return model(**enc).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_own_per_head_rows_in_mix_mode_reproduce_the_model(tiny_models, family):
    """Mix at alpha 1 replaces each head's attention by the injected rows: the model's own rows give it back."""
    model, tok = tiny_models[family]
    enc = tok([TEXT], return_tensors="pt")
    plain = logits(model, enc)
    layers = [0, model.config.num_hidden_layers - 1]
    attn = eager_attentions(model, enc)
    rows = RowsPrior({layer: attn[layer].clamp_min(1e-30).log() for layer in layers}, "own")
    torch.testing.assert_close(logits(model, enc, Injector(rows, AlphaSpec(value=1.0), "mix", prompt_len=0)), plain,
                               atol=1e-5, rtol=1e-5)
    live = StudentSelfPrior(layers, per_head=True)
    torch.testing.assert_close(logits(model, enc, Injector(live, AlphaSpec(value=1.0), "mix", prompt_len=0)), plain,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_oracle_undoes_a_damaged_temperature(tiny_models, family):
    """A copy of the model with one layer's attention flattened (scores / 4) gets the undamaged logits back
    when the undamaged model's per-head rows are mixed in at alpha 1 — and not from its own rows or the
    head mean."""
    model, tok = tiny_models[family]
    enc = tok([TEXT], return_tensors="pt")
    layer = 1
    target = logits(model, enc)
    oracle_rows = eager_attentions(model, enc)[layer].clamp_min(1e-30).log()  # (1, H, S, S)
    module = model.model.layers[layer].self_attn
    scaling = module.scaling
    module.scaling = scaling / 4  # the damage
    try:
        damaged = logits(model, enc)
        assert (damaged - target).abs().max() > 1e-3
        per_head = Injector(RowsPrior({layer: oracle_rows}, "teacher"), AlphaSpec(value=1.0), "mix", prompt_len=0)
        torch.testing.assert_close(logits(model, enc, per_head), target, atol=1e-5, rtol=1e-5)
        head_mean = oracle_rows.exp().mean(1, keepdim=True).log()
        mean = Injector(RowsPrior({layer: head_mean}, "teacher"), AlphaSpec(value=1.0), "mix", prompt_len=0)
        assert (logits(model, enc, mean) - target).abs().max() > 1e-4  # averaging heads loses information
    finally:
        module.scaling = scaling


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_prior_is_a_no_op_in_bias_mode_and_not_in_mix(tiny_models, family):
    model, tok = tiny_models[family]
    enc = tok([TEXT], return_tensors="pt")
    plain = logits(model, enc)
    uniform = UniformPrior([0, 1])
    torch.testing.assert_close(logits(model, enc, Injector(uniform, AlphaSpec(value=3.0), "bias")), plain,
                               atol=1e-5, rtol=1e-5)
    assert (logits(model, enc, Injector(uniform, AlphaSpec(value=0.5), "mix")) - plain).abs().max() > 1e-4


def test_student_self_head_mean_sharpens_toward_the_model_itself(tiny_models):
    """Bias with the student's own head-mean attention changes the output (it is not a no-op), and its rows
    equal the eager head-mean."""
    from uzr.injection.priors import AttentionCall

    model, tok = tiny_models["llama"]
    enc = tok([TEXT], return_tensors="pt")
    attn = eager_attentions(model, enc)
    seen = {}

    def spy(scores_fn):
        def wrapped(layer, call: AttentionCall, keys):
            seen[layer] = out = scores_fn(layer, call, keys)
            return out

        return wrapped

    prior = StudentSelfPrior([1])
    prior.scores = spy(prior.scores)
    changed = logits(model, enc, Injector(prior, AlphaSpec(value=1.0), "bias"))
    torch.testing.assert_close(seen[1].exp(), attn[1].mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert (changed - logits(model, enc)).abs().max() > 1e-4


def test_rows_shorter_than_the_text_are_refused(tiny_models):
    model, tok = tiny_models["qwen2"]
    enc = tok([TEXT], return_tensors="pt")
    rows = RowsPrior({0: torch.zeros(1, 1, 4, 4)}, "teacher")
    with pytest.raises(ValueError, match="teacher rows of layer 0 cover 4 positions"):
        logits(model, enc, Injector(rows, AlphaSpec(value=1.0), "bias"))
