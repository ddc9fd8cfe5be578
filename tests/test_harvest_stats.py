"""Statistics computed inside the attention function equal a plain reference from full softmax."""

from __future__ import annotations

import pytest
import torch

from uzr.attention import LayerRecorder, attention_modules, use_uzr_attention
from uzr.attention.stats import BlockGeometry, attention_stats, distribution_stats


def reference_stats(probs: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Loop-based definitions from DESIGN.md §4 on (H, S, S) causal probabilities of one text."""
    h, s, _ = probs.shape
    out = {name: torch.zeros(h, s) for name in ("entropy", "norm_entropy", "locality", "mean_distance")}
    for head in range(h):
        for i in range(s):
            row = probs[head, i, : i + 1].double()
            ent = float(-(row[row > 0] * row[row > 0].log()).sum())
            out["entropy"][head, i] = ent
            out["norm_entropy"][head, i] = ent / torch.log(torch.tensor(i + 1.0)) if i > 0 else 0.0
            out["locality"][head, i] = float(sum(row[j] for j in range(i + 1) if i - j < window))
            out["mean_distance"][head, i] = float(sum(row[j] * (i - j) for j in range(i + 1)))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_recorded_stats_equal_reference_from_output_attentions(tiny_models, family, block_size):
    model, tok = tiny_models[family]
    ids = tok("Habits of attention, measured inside the attention call: entropy and locality.",
              return_tensors="pt")["input_ids"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
    use_uzr_attention(model)
    modules = attention_modules(model)
    for module in modules:
        module.uzr_recorder = LayerRecorder(window=4, keep_head_mean=True, block_size=block_size)
    try:
        with torch.no_grad():
            recorded = model(ids)
        results = [module.uzr_recorder.result() for module in modules]
    finally:
        for module in modules:
            del module.uzr_recorder
    torch.testing.assert_close(recorded.logits, reference.logits, atol=1e-4, rtol=1e-4)
    for layer, (stats, head_mean) in enumerate(results):
        probs = reference.attentions[layer][0]  # (H, S, S)
        ref = reference_stats(probs, window=4)
        if family == "gemma3" and model.config.layer_types[layer] == "sliding_attention":
            # n_keys is the window, not i + 1: check entropy/locality/distance; norm entropy separately
            ref.pop("norm_entropy")
        for name, value in ref.items():
            torch.testing.assert_close(stats[name][0], value.float(), atol=2e-4, rtol=1e-4, msg=f"L{layer} {name}")
        torch.testing.assert_close(head_mean[0], probs.mean(0), atol=1e-5, rtol=1e-4)


def test_sliding_window_normalised_entropy_uses_visible_keys(tiny_models):
    model, tok = tiny_models["gemma3"]
    window = model.config.sliding_window
    ids = tok("x " * 30, return_tensors="pt")["input_ids"]
    use_uzr_attention(model)
    module = attention_modules(model)[0]  # layer 0 is a sliding-window layer
    assert model.config.layer_types[0] == "sliding_attention"
    module.uzr_recorder = LayerRecorder(window=4, keep_head_mean=True, block_size=64)
    try:
        with torch.no_grad():
            model(ids)
        stats, head_mean = module.uzr_recorder.result()
    finally:
        del module.uzr_recorder
    s = ids.shape[1]
    assert (head_mean[0].tril(-window) == 0).all()  # nothing beyond the window
    assert (stats["norm_entropy"] <= 1 + 1e-5).all() and (stats["norm_entropy"][..., window:] > 0).all()
    assert s > window


def test_padding_rows_are_zero_and_stats_finite(tiny_models):
    model, tok = tiny_models["llama"]
    tok.padding_side = "left"
    enc = tok(["short", "a much longer text than the other one"], return_tensors="pt", padding=True)
    use_uzr_attention(model)
    module = attention_modules(model)[1]
    module.uzr_recorder = LayerRecorder(window=8, keep_head_mean=True, block_size=3)
    try:
        with torch.no_grad():
            model(**enc)
        stats, head_mean = module.uzr_recorder.result()
    finally:
        del module.uzr_recorder
    pad = ~enc["attention_mask"][0].bool()
    assert pad.any()
    assert torch.all(head_mean[0][pad] == 0) and torch.all(head_mean[0][~pad][:, pad] == 0)
    torch.testing.assert_close(head_mean[0][~pad].sum(-1), torch.ones(int((~pad).sum())))
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_distribution_stats_hand_example():
    probs = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.0, 0.0, 1.0]])
    stats = distribution_stats(probs, window=1)
    torch.testing.assert_close(stats["entropy"], torch.tensor([0.0, 0.6931472, 0.0]))
    torch.testing.assert_close(stats["norm_entropy"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(stats["locality"], torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(stats["mean_distance"], torch.tensor([0.0, 0.5, 0.0]))


def test_attention_stats_uses_allowed_count():
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])  # one query that may see keys 0..1 of 4
    allowed = torch.tensor([[[True, True, False, False]]])
    geometry = BlockGeometry(torch.tensor([3]), torch.arange(4))
    stats = attention_stats(probs, allowed, geometry, window=2)
    torch.testing.assert_close(stats["norm_entropy"], torch.tensor([[1.0]]))
    torch.testing.assert_close(stats["mean_distance"], torch.tensor([[2.5]]))
    torch.testing.assert_close(stats["locality"], torch.tensor([[0.0]]))
