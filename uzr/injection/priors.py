"""What the injector injects: the prior over keys that an injected layer's attention is pulled toward.

``inject.source`` chooses it (DESIGN.md §6; issue 13's controls):

- ``controller``: the trained controller's prediction from the student's own hidden states (the method);
- ``teacher``: the teacher's attention rows on the same text, aligned to the student's tokens (the
  oracle ceiling: what a perfect controller would inject);
- ``student_self``: the student's own attention at that layer (injecting it only sharpens what the
  student already does: any effect is not the teacher's);
- ``uniform``: equal scores on every allowed key (in ``bias`` mode a no-op, since softmax ignores a
  per-row constant; in ``mix`` mode it blends in the mean of the values);
- ``shuffled``: controller rows computed for a *different* text of the same length (a prior on
  attention that is not this text's: separates "any prior" from "the right one");
- ``emphasis``: a hand-set prior toward the marked spans of a prompt (PASTA-like steering of the student's own
  attention; no controller, no teacher).

A prior gives unnormalised log-scores over the keys of one attention call, for all heads at once
(``(B, 1, q, k)``, head-mean targets) or per head (``(B, H, q, k)``); the injector masks and normalises
them. Priors that depend on earlier positions (the controller) cache per-position key features, which the
injector keeps like a KV cache.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from uzr.masks import masked_log_softmax


@dataclass
class AttentionCall:
    """One call of an injected layer's attention, as the prior sees it.

    ``hidden``: (B, q, D) float32 input of the attention; ``query``: (B, H, q, Dh); ``key``: (B, H_kv, k, Dh)
    (KV cache included); ``allowed``: (B|1, q, k) bool; ``q_pos``/``k_pos``: (q,)/(k,) positions in the
    sequence; ``ids``: (B, seen) token ids of the sequence so far, given to priors that declare ``needs_ids``
    (None otherwise).
    """

    module: torch.nn.Module
    hidden: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    allowed: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    ids: torch.Tensor | None = None


class AttentionPrior(ABC):
    """A prior over keys for each of ``layers``.

    ``continues_rows``: the scores of a sequence's positions depend only on that sequence (its hidden states,
    queries and keys), so its positions may run in separate calls with other batch rows (a prompt's prefix once,
    then each candidate: :func:`uzr.qa.facts.score_candidates`). False for rows fixed to a batch and for a prior
    that needs the whole sequence at once (the teacher oracle on a facts-QA candidate): callers run full
    sequences for it. ``needs_ids``: the injector hands it the token ids (``AttentionCall.ids``).
    """

    continues_rows = True
    needs_ids = False

    def __init__(self, layers):
        self.layers = tuple(layers)

    def for_rows(self, rows: torch.Tensor) -> AttentionPrior:
        """The prior of batch rows ``rows`` (long (b,); repeats allowed), for a prior that holds something per batch
        row (:class:`EmphasisPrior`); the others are the same for every row."""
        return self

    @property
    def row_weights(self) -> torch.Tensor | None:
        """(B,) factor on each batch row's alpha (0: the row is left exactly as it is); None: 1 for every row."""
        return None

    def alike(self, length: int) -> bool:
        """Whether every batch row gets the same scores and weight on keys before position ``length`` (so a prefix
        that all rows share may run once for all of them)."""
        return True

    def key_features(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, q, d) features of this call's positions, cached by the injector for later calls; d may be 0."""
        return hidden.new_zeros(*hidden.shape[:2], 0)

    @abstractmethod
    def scores(self, layer: int, call: AttentionCall, keys: torch.Tensor) -> torch.Tensor:
        """(B, 1|H, q, k) log-scores; ``keys``: (B, k, d) cached key features of the call's keys."""


class ControllerPrior(AttentionPrior):
    """The controllers' predictions (``{layer: controller}``; see :mod:`uzr.controller.archs`)."""

    def __init__(self, controllers: Mapping[int, torch.nn.Module]):
        super().__init__(controllers)
        self.controllers = dict(controllers)

    def key_features(self, layer, hidden):
        return self.controllers[layer].key_features(hidden)

    def scores(self, layer, call, keys):
        ctrl = self.controllers[layer]
        logits = ctrl.logits_from_features(ctrl.query_features(call.hidden), keys, call.q_pos, call.k_pos)
        return logits if logits.dim() == 4 else logits[:, None]  # (B, H, q, k) per head, else (B, 1, q, k)


class UniformPrior(AttentionPrior):
    """Equal scores on every key."""

    def scores(self, layer, call, keys):
        return call.hidden.new_zeros(call.hidden.shape[0], 1, call.q_pos.numel(), call.k_pos.numel())


class StudentSelfPrior(AttentionPrior):
    """The student's own attention at the layer: head-mean (``per_head=False``) or each head's own."""

    def __init__(self, layers, per_head: bool = False):
        super().__init__(layers)
        self.per_head = per_head

    def scores(self, layer, call, keys):
        logp = own_logprobs(call)  # (B, H, q, k)
        if self.per_head:
            return logp
        return torch.logsumexp(logp, 1, keepdim=True) - torch.log(torch.tensor(float(logp.shape[1])))


def own_logprobs(call: AttentionCall) -> torch.Tensor:
    """(B, H, q, k) float32 log-probabilities of the student's own attention in this call (masked keys -inf)."""
    query = call.query.float()  # (B, H, q, Dh)
    key = repeat_kv(call.key.float(), query.shape[1] // call.key.shape[1])  # (B, H, k, Dh)
    scaling = getattr(call.module, "scaling", query.shape[-1] ** -0.5)
    return masked_log_softmax(query @ key.transpose(-1, -2) * scaling, call.allowed[:, None])


class RowsPrior(AttentionPrior):
    """Fixed rows for a known text: ``{layer: (B, 1|H, S, S) log-probabilities}`` over its positions.

    The teacher oracle (the teacher's aligned rows of this text) and the shuffled control (the controller's
    rows of another text) are rows; a call may cover any span of the text, never beyond ``S``.
    """

    continues_rows = False  # batch row b is text b

    def __init__(self, rows: Mapping[int, torch.Tensor], what: str):
        super().__init__(rows)
        self.rows, self.what = dict(rows), what

    def scores(self, layer, call, keys):
        rows = self.rows[layer]  # (B, 1|H, S, S)
        end = int(call.k_pos[-1]) + 1
        if end > rows.shape[-1]:
            raise ValueError(f"inject.source: the {self.what} rows of layer {layer} cover {rows.shape[-1]} "
                             f"positions but the text has {end}; score texts no longer than the rows "
                             "(harvest.max_dist_len bounds the teacher rows the harvest keeps)")
        return rows[..., call.q_pos, :][..., call.k_pos].to(call.hidden.device)


class EmphasisPrior(AttentionPrior):
    """``inject.source=emphasis``: the keys of each prompt's marked spans up-weighted by ``beta``.

    Args:
        marks: (B, P) bool, the marked token positions of each batch row's prompt (P: the longest prompt; positions
            past a row's own prompt are False); ``lengths``: (B,) each row's prompt length in tokens.
        form: ``bias`` scores + log beta on marked keys; ``pasta`` (PASTA, arXiv 2311.02262) - log beta on the
            prompt's non-marked keys. After the injector's normalisation both multiply the marked keys' weight by
            beta against the prompt's other keys (in ``bias`` mode at alpha 1, exactly), and differ on keys past the
            prompt (answer or generated tokens): ``bias`` leaves them with the unmarked keys, ``pasta`` with the marked.

    A row with no marked key, and every row when beta = 1, has weight 0 (:attr:`row_weights`): the injector leaves it
    exactly as it is (in ``mix`` mode a flat prior would otherwise blend in the values' mean).
    """

    def __init__(self, layers, marks: torch.Tensor, lengths: torch.Tensor, beta: float, form: str = "bias"):
        super().__init__(layers)
        self.marks, self.lengths, self.beta, self.form = marks.bool(), lengths.long(), float(beta), form
        log_beta = math.log(self.beta)
        if form == "bias":
            self.log_scores = self.marks.float() * log_beta  # (B, P)
        elif form == "pasta":
            in_prompt = torch.arange(marks.shape[1])[None] < self.lengths[:, None]  # (B, P)
            self.log_scores = (in_prompt & ~self.marks).float() * -log_beta
        else:
            raise ValueError(f"inject.emphasis_form={form!r} is unknown; valid choices: bias, pasta")
        self._weights = (self.marks.any(-1) & (log_beta != 0)).float()  # (B,)

    def for_rows(self, rows):
        rows = rows.to(self.marks.device)
        return EmphasisPrior(self.layers, self.marks[rows], self.lengths[rows], self.beta, self.form)

    @property
    def row_weights(self):
        return self._weights

    def alike(self, length):
        scores = self.log_scores[:, :length]
        return bool((scores == scores[:1]).all() and (self._weights == self._weights[:1]).all())

    def scores(self, layer, call, keys):
        width = self.log_scores.shape[1]
        inside = call.k_pos < width  # (k,) keys past every prompt score 0
        scores = self.log_scores.to(call.hidden.device)[:, call.k_pos.clamp(max=width - 1)]  # (B, k)
        scores = torch.where(inside[None], scores, torch.zeros_like(scores))
        return scores[:, None, None].expand(-1, 1, call.q_pos.numel(), -1)  # (B, 1, q, k)


LIVE_SOURCES = ("controller", "student_self", "uniform")  # computed from the student's own pass (live_prior)


def live_prior(source: str, controllers: Mapping[int, torch.nn.Module], per_head: bool = False) -> AttentionPrior:
    """The prior of a source computed from the student's own pass: controller, student_self or uniform
    (``per_head``: student_self gives each head its own rows, as per-head targets do)."""
    layers = list(controllers)
    if source == "controller":
        return ControllerPrior(controllers)
    if source == "student_self":
        return StudentSelfPrior(layers, per_head=per_head)
    if source == "uniform":
        return UniformPrior(layers)
    raise ValueError(f"inject.source={source!r} is not computed from the student's own pass (teacher, shuffled: a "
                     "text's stored rows or the live oracle; emphasis: a prompt's marked spans)")
