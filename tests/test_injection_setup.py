"""One set-up for every injection (``uzr.injection.setup``), one edit of a kind per layer, and ``recording()``.

- :class:`Injection` builds the injector the callers used to write by hand (controllers, sinks, then
  ``Injector(...)``): the same outputs, bit for bit;
- :func:`configured_injection` / :func:`run_injection` read the config and detect the sinks once per memo;
- a second injector (or recorder) on a layer that carries one fails loudly and leaves the first in place;
- :func:`recording` detaches its recorders on exit, also when the block raises.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from uzr.attention import HeadMeanRows, LayerRecorder, attention_modules, recording
from uzr.evaluate.injection import run_injection
from uzr.hooks import injected
from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.priors import UniformPrior
from uzr.injection.setup import Injection, configured_injection
from uzr.injection.sinks import SinkSet, detect_sinks
from uzr.runner import RunContext

from .conftest import resolved
from .test_inject import controllers_for, logits

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


def encoded(tok):
    tok.padding_side = "right"
    return tok([TEXT], return_tensors="pt")


@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_injection_builds_the_hand_written_injector(tiny_models, mode):
    """``Injection(...).injector(...)`` with its overrides (alpha, gate, prompt_len, source) is the injector the six
    callers built by hand: identical logits, sinks kept alike."""
    model, tok = tiny_models["qwen2"]
    enc = encoded(tok)
    layers = [0, 1]
    ctrls = controllers_for(model, layers)
    sinks = {1: SinkSet(first=True, token_ids=(int(enc["input_ids"][0, 4]),))}
    gated = AlphaSpec(value=1.0, schedule="gated")
    gate = torch.tensor([[0.7]])
    injection = Injection(ctrls, AlphaSpec(value=0.25), mode, sinks)

    def run(injector):
        with injected(model, injector):
            return logits(model, enc)

    cases = [  # (hand-written, built)
        (Injector(ctrls, AlphaSpec(value=0.25), mode, prompt_len=0, sinks=sinks), injection.injector(prompt_len=0)),
        (Injector(ctrls, gated, mode, prompt_len=None, gate=gate, sinks=sinks),
         injection.injector(prompt_len=None, gate=gate, alpha=gated)),
        (Injector(UniformPrior(layers), AlphaSpec(value=1.0), mode, prompt_len=3, sinks=sinks),
         injection.injector(prompt_len=3, alpha=AlphaSpec(value=1.0), source=UniformPrior(layers))),
    ]
    plain = logits(model, enc)
    for by_hand, built in cases:
        expected = run(by_hand)
        assert torch.equal(run(built), expected)
        assert built.sinks == by_hand.sinks and built.prompt_len == by_hand.prompt_len
    assert (run(cases[0][1]) - plain).abs().max() > 1e-4  # the injection does something to compare


def _store(layers: list[int]):
    """A harvest store's two readers that sink detection uses: 3 training texts whose first key and token 7
    take far more than their share (as tests/test_sinks.py)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        d = 24
        ids = rng.integers(10, 50, d)
        ids[[6, 15]] = 7
        probs = np.tril(rng.random((d, d)) + 0.1)
        base = probs.sum(-1)
        probs[:, 0] += 2.0 * base
        probs[15:, 15] += 2.0 * base[15:]
        probs[6:, 6] += 2.0 * base[6:]
        probs /= probs.sum(-1, keepdims=True)
        rows.append({**{f"student_dist_L{layer}": probs.astype(np.float16) for layer in layers}, "input_ids": ids})
    return SimpleNamespace(folder="store", rows=lambda split: rows)


def test_configured_injection_reads_the_config_and_detects_sinks_once_per_memo(tmp_path):
    cfg = resolved("+experiment=smoke", "inject.sinks=keep", "inject.sink_ratio=5.0", "harvest.locality_window=4")
    layers = list(cfg.inject.layers)
    store, ctrls = _store(layers), {layer: torch.nn.Identity() for layer in layers}
    calls, memory = [], {}

    def memo(key, compute):
        if key not in memory:
            calls.append(key)
            memory[key] = compute()
        return memory[key]

    run = RunContext(cfg, tmp_path)
    run.memo = memo  # the run's memo, counted
    run.artifacts.update(harvest=store, controller=SimpleNamespace(controllers=ctrls))
    first, second = configured_injection(cfg, store, ctrls, memo), run_injection(run)
    expected = detect_sinks(store.rows("train"), layers, 5.0, 4)
    assert all(expected[layer].first and expected[layer].token_ids == (7,) for layer in layers)
    assert first.sinks == second.sinks == expected and len(calls) == 1  # detected once, then memoised
    assert first.source is ctrls and first.alpha is cfg.alpha and first.mode == cfg.inject.mode
    replace = resolved("+experiment=smoke")
    assert configured_injection(replace, store, ctrls, memo).sinks is None and len(calls) == 1


def test_a_second_injector_on_a_layer_fails_and_leaves_the_first(tiny_models):
    model, tok = tiny_models["llama"]
    enc = encoded(tok)
    ctrls = controllers_for(model, [0, 1])
    first = Injector(ctrls, AlphaSpec(value=1.0), "bias")
    second = Injector({1: ctrls[1]}, AlphaSpec(value=0.5), "bias")
    plain = logits(model, enc)
    with injected(model, first):
        alone = logits(model, enc)
        with pytest.raises(RuntimeError, match=r"layer\(s\) \[1\] already carry an injector"):
            second.attach(model)
        assert torch.equal(logits(model, enc), alone)  # the first is untouched, nothing of the second attached
        with pytest.raises(RuntimeError, match="already carry an injector"):
            first.attach(model)  # the same injector twice
    assert torch.equal(logits(model, enc), plain)
    with injected(model, second):  # free again once the first is removed
        assert not torch.equal(logits(model, enc), plain)


def test_a_second_recorder_on_a_layer_fails_and_recording_detaches_on_error(tiny_models):
    model, tok = tiny_models["gemma3"]
    enc = encoded(tok)
    modules = attention_modules(model)

    def recorders(layers):
        return {layer: LayerRecorder(block_size=8, reducers=[HeadMeanRows()]) for layer in layers}

    with recording(model, recorders([0, 1])) as outer:
        with pytest.raises(RuntimeError, match=r"layer\(s\) \[1\] already carry a recorder"), \
                recording(model, recorders([1])):
            pass
        assert all(modules[layer].uzr_recorder is outer[layer] for layer in (0, 1))  # the outer ones stay
        with injected(model, Injector(controllers_for(model, [1]), AlphaSpec(value=1.0), "bias")):
            logits(model, enc)  # a recorder and an injector on one layer are two different edits: allowed
        assert outer[1].take()["head_mean"].shape[-1] == enc["input_ids"].shape[1]
    assert not any(hasattr(m, "uzr_recorder") for m in modules)

    with pytest.raises(ValueError, match="boom"), recording(model, recorders([0, 1])):
        logits(model, enc)
        raise ValueError("boom")
    assert not any(hasattr(m, "uzr_recorder") for m in modules)
    with recording(model, recorders([1])) as again:  # attachable again after the failure
        logits(model, enc)
    assert again[1].take()["head_mean"].shape[0] == 1
