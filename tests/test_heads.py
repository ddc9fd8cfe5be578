"""``inject.heads``: only the chosen heads change (every other head and the layers before bit-identical), bad values
fail before any model loads, and the per-head profile ranks heads by their effect."""

from __future__ import annotations

import pytest
import torch

from uzr.attention import HeadRows, LayerRecorder, attention_modules, recording
from uzr.evaluate.heads import HeadProfile, profile_heads
from uzr.hooks import injected
from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.priors import ControllerPrior
from uzr.qa.facts import qa_scores
from uzr.qa.prompts import PromptSet

from .conftest import resolved
from .test_inject import controllers_for

TEXT = "Attention habits of a large model, poured into a small one while it runs, one layer at a time."


def head_rows(model, ids, layers, injector=None) -> dict[int, torch.Tensor]:
    """{layer: (1, H, S, S)} attention probabilities of every head (the blocked recorder pass)."""
    recorders = {layer: LayerRecorder(block_size=64, reducers=[HeadRows()]) for layer in layers}
    with torch.no_grad(), injected(model, injector), recording(model, recorders) as rec:
        model(input_ids=ids)
    return {layer: rec[layer].take()["heads"] for layer in layers}


def head_outputs(model, ids, layer, injector=None) -> torch.Tensor:
    """(1, S, H, D) attention output of each head at ``layer`` (the input of its output projection)."""
    seen = {}
    module = attention_modules(model)[layer]
    handle = module.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad(), injected(model, injector):
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"].reshape(*seen["x"].shape[:2], model.config.num_attention_heads, -1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_single_head_injection_changes_only_that_heads_attention(tiny_models, family):
    model, tok = tiny_models[family]
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    layer, head = 1, 2
    prior = ControllerPrior(controllers_for(model, [layer]))
    plain = head_rows(model, ids, [0, layer])
    steered = head_rows(model, ids, [0, layer], Injector(prior, AlphaSpec(value=1.0), "bias", prompt_len=0,
                                                         heads={layer: (head,)}))
    assert torch.equal(steered[0], plain[0])  # the layer before
    others = [h for h in range(plain[layer].shape[1]) if h != head]
    assert torch.equal(steered[layer][:, others], plain[layer][:, others])  # bit-identical
    assert (steered[layer][:, head] - plain[layer][:, head]).abs().max() > 1e-2
    every = head_rows(model, ids, [layer], Injector(prior, AlphaSpec(value=1.0), "bias", prompt_len=0))[layer]
    torch.testing.assert_close(steered[layer][:, head], every[:, head])  # the head's own edit, as with all heads


@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_a_single_head_injection_changes_only_that_heads_output(tiny_models, mode):
    """On the model's own (sdpa) path too, in both modes: the other heads' outputs are the plain model's."""
    model, tok = tiny_models["llama"]
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    layer, head = 1, 0
    prior = ControllerPrior(controllers_for(model, [layer]))
    plain = head_outputs(model, ids, layer)
    steered = head_outputs(model, ids, layer, Injector(prior, AlphaSpec(value=1.0), mode, prompt_len=0,
                                                       heads={layer: (head,)}))
    torch.testing.assert_close(steered[:, :, 1:], plain[:, :, 1:], atol=1e-6, rtol=0)
    if mode == "mix":  # weight 0 on the other heads: not one bit changes
        assert torch.equal(steered[:, :, 1:], plain[:, :, 1:])
    assert (steered[:, :, head] - plain[:, :, head]).abs().max() > 1e-3


@pytest.mark.parametrize("heads, message", [
    ("[[1,4]]", r"inject.heads: \[\[1, 4\]\] outside the injected heads; valid: layers \[1, 2\] \(inject.layers\), "
                r"heads 0..3"),
    ("[[0,1]]", r"\[\[0, 1\]\] outside the injected heads; valid: layers \[1, 2\]"),
    ("[[1,0],[1,0]]", "contains duplicates"),
    ("[]", "a non-empty list of \\[layer, head\\] pairs within layers \\[1, 2\\]"),
    ("best", "valid: null \\(every head\\), 'auto'"),
])
def test_bad_heads_fail_before_models_load_with_the_valid_ranges(heads, message):
    with pytest.raises(ValueError, match=message):
        resolved("+experiment=smoke", f"inject.heads={heads}")


def test_auto_heads_check_the_profile_settings():
    with pytest.raises(ValueError, match=r"inject.top_k_heads=9 is invalid; valid: an integer in \[1, 8\]"):
        resolved("+experiment=smoke", "inject.heads=auto", "inject.top_k_heads=9")
    with pytest.raises(ValueError, match="inject.profile_source='uniform' is invalid"):
        resolved("+experiment=smoke", "inject.heads=auto", "inject.profile_source=uniform")
    with pytest.raises(ValueError, match="inject.profile_qa=.pydoc. is invalid; valid: facts_qa | causal_loop | kv_retrieval"):
        resolved("+experiment=smoke", "inject.heads=auto", "inject.profile_qa=pydoc")
    with pytest.raises(ValueError, match="inject.emphasis_beta=0.5 is invalid"):
        resolved("+experiment=smoke", "inject.emphasis_beta=0.5")
    with pytest.raises(ValueError, match="inject.emphasis_span=.answer. is invalid; valid: marked | evidence"):
        resolved("+experiment=smoke", "inject.emphasis_span=answer")
    cfg = resolved("+experiment=smoke", "inject.heads=[[2,3],[1,0]]")
    assert [list(p) for p in cfg.inject.heads] == [[2, 3], [1, 0]]


def test_top_heads_follow_the_effects():
    profile = HeadProfile([(1, 0), (1, 1), (2, 0), (2, 1)], [0.1, -0.3, 0.5, 0.1], [0.0, 0.0, 0.25, 0.25], 0.5, 4)
    assert profile.top(2) == [(2, 0), (2, 1)]  # ties on log-likelihood broken by accuracy
    assert profile.top(4) == [(2, 0), (2, 1), (1, 0), (1, 1)]
    grid = profile.grid([1, 2], 3)
    assert grid[1, 0] == 0.5 and grid[0, 1] == -0.3 and torch.isnan(torch.tensor(grid[0, 2]))
    assert HeadProfile.from_dict(profile.as_dict()) == profile


def test_profile_ranks_a_head_that_matters_above_a_silenced_one(tiny_models):
    """A head whose output projection is zeroed cannot change any answer: its effect is exactly 0, every live head's
    is not, and a live head that helps ranks above it."""
    model, tok = tiny_models["llama"]
    layer, dead = 1, 3
    o_proj = attention_modules(model)[layer].o_proj
    width = o_proj.in_features // model.config.num_attention_heads
    saved = o_proj.weight.detach().clone()
    prompts = [p for p in PromptSet().train if p.answerable][:6]
    ctrls = controllers_for(model, [layer])

    def score(only):
        edit = None if only is None else (lambda rows: Injector(ControllerPrior(ctrls), AlphaSpec(value=2.0), "bias",
                                                                prompt_len=0, heads=only))
        return qa_scores(model, tok, prompts, "qa", edit)

    try:
        with torch.no_grad():
            o_proj.weight[:, dead * width:(dead + 1) * width] = 0
        profile = profile_heads(score, prompts, [(layer, h) for h in range(4)])
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved)
    effects = dict(zip(profile.heads, profile.loglik_delta))
    assert effects[(layer, dead)] == 0.0 and profile.accuracy_delta[dead] == 0.0
    assert all(abs(effects[(layer, h)]) > 1e-4 for h in range(3))
    order = profile.top(4)
    assert all(order.index((layer, h)) < order.index((layer, dead)) for h in range(3) if effects[(layer, h)] > 0)
    assert all(order.index((layer, h)) > order.index((layer, dead)) for h in range(3) if effects[(layer, h)] < 0)
