"""The blocked harvest pass at scale: block sizes, padding, half precision, non-finite rows, leading head-mean blocks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from uzr.attention import AttentionEdit, LayerRecorder, attention_modules, use_uzr_attention
from uzr.attention.stats import STAT_NAMES, BlockGeometry, attention_stats

from .conftest import model_spec

TEXTS = ["short text", "a much longer text, so that the other one is left padded by several tokens"]


def padded(tok):
    tok.padding_side = "left"
    return tok(TEXTS, return_tensors="pt", padding=True)


def record(model, enc, layers=None, **recorder_kwargs):
    """Forward with a recorder on ``layers`` (default all); returns (logits, [(stats, head_mean, nonfinite)])."""
    use_uzr_attention(model)
    modules = attention_modules(model)
    layers = range(len(modules)) if layers is None else layers
    for index in layers:
        modules[index].uzr_recorder = LayerRecorder(**{"window": 4, "keep_head_mean": True, **recorder_kwargs})
    try:
        with torch.no_grad():
            logits = model(**enc).logits
        out = []
        for index in layers:
            stats, head_mean = modules[index].uzr_recorder.result()
            out.append((stats, head_mean, modules[index].uzr_recorder.nonfinite_rows))
    finally:
        for index in layers:
            del modules[index].uzr_recorder
    return logits, out


def reference_allowed(model, layer: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) keys each query may see: causal, real keys, and the sliding window where the layer has one."""
    s = attention_mask.shape[1]
    i = torch.arange(s)
    allowed = (i[None, :] <= i[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    types = getattr(model.config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        allowed = allowed & ((i[:, None] - i[None, :]) < model.config.sliding_window)[None, None]
    return allowed


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_blocked_statistics_equal_unblocked_with_left_padding(tiny_models, family):
    model, tok = tiny_models[family]
    enc = padded(tok)
    real = enc["attention_mask"].bool()  # (B, S)
    s = real.shape[1]
    assert (~real).any()
    whole_logits, whole = record(model, enc, block_size=s)
    # the reference: probabilities from eager attention, statistics by the plain definitions
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**enc, output_attentions=True)
    torch.testing.assert_close(whole_logits[real], eager.logits[real], atol=1e-4, rtol=1e-4)
    geometry = BlockGeometry.for_block(0, s, s, s, "cpu")
    for layer, (stats, head_mean, bad) in enumerate(whole):
        assert bad == 0
        probs = eager.attentions[layer].float() * reference_allowed(model, layer, enc["attention_mask"])
        ref = attention_stats(probs, reference_allowed(model, layer, enc["attention_mask"]), geometry, window=4)
        for name in STAT_NAMES:
            got, want = stats[name].permute(0, 2, 1)[real], ref[name].permute(0, 2, 1)[real]  # (rows, H)
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4, msg=f"L{layer} {name}")
            assert (stats[name].permute(0, 2, 1)[~real] == 0).all()  # padding rows: zero statistics
        torch.testing.assert_close(head_mean[real], probs.mean(1)[real], atol=1e-5, rtol=1e-4)
        assert (head_mean[~real] == 0).all()
    # blocked, also with the score budget forcing fewer rows than block_size
    for kwargs in ({"block_size": 1}, {"block_size": 3}, {"block_size": 7}, {"block_size": 64, "max_block_elems": 50}):
        logits, blocked = record(model, enc, **kwargs)
        torch.testing.assert_close(logits[real], whole_logits[real], atol=1e-5, rtol=1e-5)
        for layer, ((stats, head_mean, bad), (ref_stats, ref_mean, _)) in enumerate(zip(blocked, whole)):
            assert bad == 0
            for name in STAT_NAMES:
                torch.testing.assert_close(stats[name], ref_stats[name], atol=1e-5, rtol=1e-5,
                                           msg=f"{kwargs} L{layer} {name}")
            torch.testing.assert_close(head_mean, ref_mean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_statistics_are_float32_and_finite_in_half_precision(tiny_models, dtype):
    from uzr.models import load_model

    model, tok = load_model(dataclasses.replace(model_spec("teacher/tiny_gemma3"), dtype=dtype))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    enc = padded(tok)
    real = enc["attention_mask"].bool()
    _, half = record(model, enc, block_size=5)
    _, full = record(tiny_models["gemma3"][0], enc, block_size=5)  # the same weights in float32
    for (stats, head_mean, bad), (ref, _ref_mean, _) in zip(half, full):
        assert bad == 0
        assert head_mean.dtype == torch.float32 and torch.isfinite(head_mean).all()
        for name in STAT_NAMES:
            assert stats[name].dtype == torch.float32 and torch.isfinite(stats[name]).all(), name
        diff = (stats["norm_entropy"] - ref["norm_entropy"]).permute(0, 2, 1)[real].abs().max()
        assert diff < 0.05, diff


class _RowBias:
    """A stand-in injector: adds ``value`` to every score of query row ``row`` of one layer."""

    def __init__(self, row: int, value: float):
        self.row, self.value = row, value

    def attention_edit(self, module, query, key, mask):
        bias = torch.zeros(query.shape[0], 1, query.shape[2], key.shape[2])
        bias[:, :, self.row] = self.value
        return AttentionEdit(bias=bias)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_score_rows_are_counted_not_hidden(tiny_models, value):
    model, tok = tiny_models["llama"]
    enc = tok(TEXTS[1:], return_tensors="pt")
    row, layer = 5, 1
    module = attention_modules(model)[layer]
    module.uzr_injector = _RowBias(row, value)
    try:
        logits, [(stats, head_mean, bad)] = record(model, enc, layers=[layer], block_size=4)
    finally:
        del module.uzr_injector
    heads = model.config.num_attention_heads
    assert bad == heads  # one row in every head, counted
    for name in STAT_NAMES:
        assert torch.isnan(stats[name][0, :, row]).all(), name  # never a plausible-looking number
        others = torch.cat([stats[name][0, :, :row], stats[name][0, :, row + 1:]], -1)
        assert torch.isfinite(others).all(), name
    assert (head_mean[0, row] == 0).all()  # its probabilities are dropped, not NaN
    assert torch.isfinite(head_mean).all() and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_head_mean_of_the_leading_rows_is_the_leading_block(tiny_models, family):
    """dist_rows=d keeps exactly the leading (d, d) block of the full head-mean: left padding, blocks that
    straddle row d, and a sliding-window layer (gemma3) included; statistics are unaffected."""
    model, tok = tiny_models[family]
    enc = padded(tok)
    real = enc["attention_mask"].bool()
    s = real.shape[1]
    for block_size in (1, 3, 7, s):
        _, full = record(model, enc, block_size=block_size)
        for d in (1, 2, 5, s - 1, s, s + 3):
            _, kept = record(model, enc, block_size=block_size, dist_rows=d)
            for layer, ((stats, head_mean, bad), (ref_stats, ref_mean, _)) in enumerate(zip(kept, full)):
                assert bad == 0 and head_mean.shape == (2, min(d, s), min(d, s))
                assert torch.equal(head_mean, ref_mean[:, :d, :d]), (block_size, d, layer)
                for name in STAT_NAMES:  # every row, not just the kept ones
                    assert torch.equal(stats[name], ref_stats[name]), (block_size, d, layer, name)
                rows = real[:, :d]  # causal: a kept real row keeps all of its mass
                torch.testing.assert_close(head_mean.sum(-1)[rows], torch.ones(int(rows.sum())), atol=1e-5, rtol=0)
                assert (head_mean.sum(-1)[~rows] == 0).all()  # left padding rows


def test_harvested_distributions_are_the_leading_block(tiny_models):
    """Teacher tiny gemma3 and student tiny llama (different tokenizers): harvest.max_dist_len=d < S stores
    the leading (d, d) block of the full distributions, and every other column unchanged."""
    from uzr.harvest.harvester import Harvester

    teacher, t_tok = tiny_models["gemma3"]
    student, s_tok = tiny_models["llama"]
    text = "Attention habits of the teacher, harvested on the student's grid: " * 4

    def harvest(max_dist_len):
        harvester = Harvester(teacher, t_tok, student, s_tok, [1, 2], [2, 3], window=8, block_size=16,
                              max_length=48, max_dist_len=max_dist_len)
        try:
            return harvester(text)
        finally:
            harvester.close()

    full = harvest(10**6)
    s = len(full["input_ids"])
    assert s == 48 and full["teacher_len"] != s  # truncated, and the tokenizers differ
    assert all(np.array_equal(full[k], v) for k, v in harvest(s).items() if isinstance(v, np.ndarray))
    dists = [k for k in full if "_dist_L" in k]
    assert len(dists) == 4 and all(full[k].shape == (s, s) for k in dists)
    for d in (2, 13, s - 1):
        row = harvest(d)
        assert sorted(row) == sorted(full)
        for key, value in row.items():
            if key in dists:
                assert value.shape == (d, d), key
                np.testing.assert_allclose(value.astype(np.float32), full[key][:d, :d].astype(np.float32),
                                           atol=2e-3, rtol=2e-3, err_msg=key)
                np.testing.assert_allclose(value.astype(np.float32).sum(-1), 1.0, atol=5e-3, err_msg=key)
            elif isinstance(value, np.ndarray):
                assert np.array_equal(value, full[key]), key
            elif key not in ("align_dropped_mass", "align_self_fallback_rows"):  # over the stored rows only
                assert value == full[key], key


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoding_step_with_cache_records_the_new_row(tiny_models, family):
    """q = 1 against a KV cache (mask or no mask, sliding window crossed) gives the full pass's last row."""
    model, tok = tiny_models[family]
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2 * getattr(model.config, "sliding_window", 4)
    _, full = record(model, {"input_ids": ids}, block_size=5)
    use_uzr_attention(model)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
    _, step = record(model, {"input_ids": ids[:, -1:], "past_key_values": cache}, block_size=5)
    for (stats, head_mean, _), (ref, ref_mean, _) in zip(step, full):
        for name in STAT_NAMES:
            torch.testing.assert_close(stats[name][..., 0], ref[name][..., -1], atol=2e-5, rtol=1e-4)
        k = head_mean.shape[-1]  # a sliding layer's cache may hold only the last keys
        torch.testing.assert_close(head_mean[0, 0], ref_mean[0, -1, -k:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masked", [True, False])
def test_non_causal_rows_match_the_definitions(masked):
    """Keys after the query (bidirectional masks, encoders): mean distance counts max(i - j, 0) as defined."""
    from uzr.attention.function import _blocked_eager

    class Module(torch.nn.Module):
        is_causal = False

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    allowed = torch.ones(1, 1, 11, 11, dtype=torch.bool)
    allowed[..., 0, 5:] = False  # one row sees only part of the future
    mask = allowed if masked else None
    if not masked:
        allowed = torch.ones_like(allowed)
    recorder = LayerRecorder(window=3, keep_head_mean=True, block_size=4)
    out = _blocked_eager(Module(), q, k, v, mask, 8 ** -0.5, recorder, None, None)
    stats, head_mean = recorder.result()
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = torch.softmax((q @ kr.transpose(-1, -2) * 8 ** -0.5).masked_fill(~allowed, float("-inf")), -1)
    ref = attention_stats(probs, allowed, BlockGeometry.for_block(0, 11, 11, 11, "cpu"), window=3)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(head_mean, probs.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, (probs @ vr).transpose(1, 2), atol=1e-5, rtol=1e-5)
