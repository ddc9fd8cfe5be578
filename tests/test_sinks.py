"""``inject.sinks=keep`` (issue 13, item 5): the student's own attention mass on its sink keys survives injection
exactly; the detection rule finds keys that take far more than their share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uzr.evaluate.passes import student_pass
from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.priors import UniformPrior
from uzr.injection.sinks import SinkSet, detect_sinks

from .test_per_head import TEXTS


class SharpPrior(UniformPrior):
    """Each query row's whole prior on its previous key (a strong pull away from any sink)."""

    def scores(self, layer, call, keys):
        k = call.k_pos[None, :]
        q = call.q_pos[:, None]
        return torch.where(k == q - 1, 0.0, -30.0)[None, None].expand(call.hidden.shape[0], 1, -1, -1)


@pytest.mark.parametrize("family, mode", [("qwen2", "bias"), ("gemma3", "mix")])
def test_keep_leaves_the_sink_mass_of_the_plain_student(tiny_models, family, mode):
    """One injected layer (a second one would see inputs that the first changed, so its own attention is no longer
    the plain student's): its sink mass is the plain student's to float rounding, in both modes."""
    student, tok = tiny_models[family]
    layers = [1]
    ids = tok([TEXTS[0]], return_tensors="pt")["input_ids"]
    sink_id = int(ids[0, 5])  # a token in the middle of the text as a sink, besides the first position
    sinks = {layer: SinkSet(first=True, token_ids=(sink_id,)) for layer in layers}
    is_sink = (ids[0] == sink_id) | (torch.arange(ids.shape[1]) == 0)  # (S,)
    alpha = AlphaSpec(value=1.0)

    def sink_mass(injector):
        """Head-mean sink mass per query row (S,) of what the layer attends with: its recorded probabilities
        (bias mode edits the scores), or the distribution mixed in (mix mode mixes outputs: the recorder sees
        the scores before the mix, and (1 - a) p + a P' keeps p's sink mass exactly when P' does)."""
        if injector is None or mode == "bias":
            heads = student_pass(student, ids, layers, 4, injector).head_mean  # layer -> (S, S)
            return {layer: heads[layer][:, is_sink].sum(-1) for layer in layers}
        mixed = {}
        edit = injector.attention_edit

        def spy(module, *args):
            out = edit(module, *args)
            mixed[module.layer_idx] = out.mix_probs[0]  # (H, S, S) or (S, S)
            return out

        injector.attention_edit = spy
        student_pass(student, ids, layers, 4, injector)
        return {layer: (p.mean(0) if p.dim() == 3 else p)[:, is_sink].sum(-1) for layer, p in mixed.items()}

    plain = sink_mass(None)
    keep = sink_mass(Injector(SharpPrior(layers), alpha, mode, prompt_len=0, sinks=sinks))
    replace = sink_mass(Injector(SharpPrior(layers), alpha, mode, prompt_len=0))
    for layer in layers:
        torch.testing.assert_close(keep[layer], plain[layer], atol=1e-6, rtol=0)
        assert (replace[layer][2:] - plain[layer][2:]).abs().max() > 0.01  # replace does move it
    # alpha 0 with keep: the plain student, bit for bit in bias mode's bias (it is exactly 0)
    zero = student_pass(student, ids, layers, 4, Injector(SharpPrior(layers), AlphaSpec(value=0.0), mode,
                                                             prompt_len=0, sinks=sinks))
    base = student_pass(student, ids, layers, 4)
    torch.testing.assert_close(zero.nll, base.nll, atol=0, rtol=0)


def test_detection_finds_a_key_far_above_its_share():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        d = 24
        ids = rng.integers(10, 50, d)
        ids[[6, 15]] = 7  # a token that recurs in every text and soaks up mass
        probs = np.tril(rng.random((d, d)) + 0.1)
        base = probs.sum(-1)  # (d,) before the sinks
        probs[:, 0] += 2.0 * base  # the first position and the recurring token take much of every row they see
        probs[15:, 15] += 2.0 * base[15:]
        probs[6:, 6] += 2.0 * base[6:]
        probs /= probs.sum(-1, keepdims=True)
        rows.append({"student_dist_L0": probs.astype(np.float16), "input_ids": ids})
    sinks = detect_sinks(rows, [0], ratio=5.0, window=4)[0]
    assert sinks.first and sinks.token_ids == (7,)
    assert detect_sinks(rows, [0], ratio=1e4, window=4)[0] == SinkSet()
