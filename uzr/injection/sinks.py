"""Attention sinks: the student's keys that soak up attention, and ``inject.sinks=keep`` (issue 13, item 5).

Students park much of their attention on a few *sink* keys (the first token, some punctuation): an
"attend nowhere" outlet. The aligned teacher rows have no such outlet (the teacher's BOS sink is dropped
and the rows renormalised), so injecting them (``inject.sinks=replace``, the default) also takes the
student's sink mass away. ``keep`` leaves the student's own mass on its sink keys untouched and lets the
injected distribution shape only the remainder.

**Detection rule** (per injected layer, from the harvest's training texts, :func:`detect_sinks`): a key's
*share ratio* in query row ``i`` is ``p_ij * (i + 1)``, its mass over the uniform share ``1 / (i + 1)``. Only
queries at least ``locality_window`` tokens after the key count (attention to the last few tokens is
locality, not a sink). The first position is one candidate; every other key is grouped by token id. A
candidate whose mean share ratio over all its (text, query) pairs is at least ``inject.sink_ratio`` (default
10: ten times its share) is a sink. A token id must also occur in at least :data:`MIN_TEXTS` training texts,
so a word that one text happens to repeat is not taken for a sink. At run time a key is a sink if it is the
first position (when that was detected) or its token id is a detected one.

**Keep, exactly.** With the student's own probabilities ``p`` over the allowed keys, sink set ``K`` and sink
mass ``m = sum_K p``: ``mix`` mixes in ``P' = p`` on ``K`` and ``(1 - m) * P_prior`` renormalised off ``K``, so
``(1 - a) p + a P'`` keeps ``m``; ``bias`` adds 0 on ``K`` and ``a log P_prior + c`` elsewhere, with the
per-row ``c = log(1 - m) - log sum_{not K} p * P_prior^a``, so the softmax keeps every sink probability and the
product of experts shapes the rest (alpha 0 adds exactly 0).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MIN_TEXTS = 2  # a sink token id must recur across texts, not within one
_TINY = 1e-30


@dataclass(frozen=True)
class SinkSet:
    """A layer's sink keys: the first position, and tokens by id."""

    first: bool = False
    token_ids: tuple[int, ...] = ()
    ratios: dict = field(default_factory=dict, compare=False)  # candidate -> mean share ratio (for the report)

    def flags(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, k) bool: which keys are sinks, for key token ``ids`` (B, k) at sequence ``positions`` (k,)."""
        out = torch.isin(ids, torch.tensor(self.token_ids, dtype=ids.dtype, device=ids.device))
        if self.first:
            out = out | (positions == 0)[None]
        return out

    def as_dict(self, tokenizer=None) -> dict:
        out = {"first": self.first, "token_ids": list(self.token_ids),
               "share_ratio": {str(k): round(v, 3) for k, v in self.ratios.items()}}
        if tokenizer is not None:
            out["tokens"] = [tokenizer.convert_ids_to_tokens(i) for i in self.token_ids]
        return out


def share_ratios(probs: np.ndarray, ids: np.ndarray, window: int) -> dict:
    """Per candidate (``"first"`` or a token id) of one text: (summed share ratio, count) over its distant queries.

    ``probs``: (D, D) causal head-mean rows of the student; ``ids``: (>= D,) its token ids.
    """
    d = probs.shape[-1]
    i = np.arange(d)[:, None]
    j = np.arange(d)[None]
    distant = (i - j) >= max(window, 1)  # (D, D) query i at least ``window`` after key j
    ratio = np.where(distant, probs.astype(np.float64) * (i + 1), 0.0)
    sums, counts = ratio.sum(0), distant.sum(0)  # (D,) per key
    out: dict = {}
    for k in range(d):
        if counts[k] == 0:
            continue
        name = "first" if k == 0 else int(ids[k])
        s, c = out.get(name, (0.0, 0))
        out[name] = (s + float(sums[k]), c + int(counts[k]))
    return out


def detect_sinks(rows, layers, ratio: float, window: int) -> dict[int, SinkSet]:
    """``{layer: SinkSet}`` from store rows (``student_dist_L{layer}``, ``input_ids``), by the module's rule."""
    out = {}
    for layer in layers:
        totals: dict = {}
        texts: dict = {}
        for n in range(len(rows)):
            row = rows[n]
            for name, (s, c) in share_ratios(np.asarray(row[f"student_dist_L{layer}"]), np.asarray(row["input_ids"]),
                                             window).items():
                total = totals.get(name, (0.0, 0))
                totals[name] = (total[0] + s, total[1] + c)
                texts[name] = texts.get(name, 0) + 1
        means = {name: s / c for name, (s, c) in totals.items()}
        sinks = {name: m for name, m in means.items()
                 if m >= ratio and (name == "first" or texts[name] >= MIN_TEXTS)}
        out[layer] = SinkSet("first" in sinks, tuple(sorted(k for k in sinks if k != "first")), sinks)
    return out


def keep_bias(prior_logp: torch.Tensor, own_logp: torch.Tensor, alpha: torch.Tensor, sink: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:
    """The ``bias`` edit that keeps the student's sink probabilities (module docstring).

    Args:
        prior_logp: (B, 1|H, q, k) injected log-probabilities; own_logp: (B, H, q, k) the student's own.
        alpha: (B|1, q); sink: (B, 1, 1, k) bool; allowed: (B|1, 1, q, k) bool.
    Returns:
        (B, H, q, k) bias, 0 on sinks and on forbidden keys.
    """
    rest = allowed & ~sink  # (B, 1, q, k)
    a = alpha[:, None, :, None]  # (B|1, 1, q, 1)
    p = own_logp.exp()
    m = torch.where(allowed & sink, p, 0.0).sum(-1, keepdim=True)  # (B, H, q, 1) sink mass
    shaped = torch.where(rest, a * prior_logp, 0.0)  # (B, 1|H, q, k)
    norm = torch.logsumexp(torch.where(rest, own_logp + shaped, -torch.inf), -1, keepdim=True)  # (B, H, q, 1)
    c = (1 - m).clamp_min(_TINY).log() - norm
    has_rest = rest.any(-1, keepdim=True)
    return torch.where(rest & has_rest, shaped + torch.where(has_rest, c, 0.0), 0.0)


def keep_mix(prior_probs: torch.Tensor, own_logp: torch.Tensor, sink: torch.Tensor,
             allowed: torch.Tensor) -> torch.Tensor:
    """The ``mix`` probabilities that keep the student's sink mass: own ``p`` on sinks, ``(1 - m)`` times the prior
    renormalised off the sinks elsewhere. prior_probs: (B, 1|H, q, k); own_logp: (B, H, q, k). Returns (B, H, q, k)."""
    rest = allowed & ~sink
    p = own_logp.exp()
    on_sink = torch.where(allowed & sink, p, 0.0)
    m = on_sink.sum(-1, keepdim=True)
    off = torch.where(rest, prior_probs, 0.0)
    total = off.sum(-1, keepdim=True)
    # a row with no non-sink key keeps the student's own row
    return on_sink + torch.where(total > 0, off * (1 - m) / total.clamp_min(_TINY), torch.where(rest, p, 0.0))


def sink_sets(mapping: Mapping[int, SinkSet] | None, layer: int) -> SinkSet | None:
    """The layer's sinks when any were detected (None: nothing to keep, the edit is ``replace``'s)."""
    sinks = (mapping or {}).get(layer)
    return sinks if sinks is not None and (sinks.first or sinks.token_ids) else None


def run_sinks(cfg, store, memo: Callable[[Hashable, Callable[[], Any]], Any]) -> dict[int, SinkSet] | None:
    """The run's sinks: for ``inject.sinks=keep``, ``{layer: SinkSet}`` of the injected layers, detected on the
    store's training texts (:func:`detect_sinks`) once per run through ``memo`` (the run's
    :meth:`~uzr.runner.RunContext.memo`, or ``uzr.runner.unmemoised``); None for ``replace``. Every injection is
    set up with it (:func:`uzr.injection.setup.configured_injection`), so all callers inject alike."""
    if cfg.inject.sinks != "keep":
        return None
    layers = list(cfg.inject.layers)
    return memo(("sinks", str(store.folder), tuple(layers), cfg.inject.sink_ratio),
                lambda: detect_sinks(store.rows("train"), layers, cfg.inject.sink_ratio, cfg.harvest.locality_window))
