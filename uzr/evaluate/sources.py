"""``inject.source`` for held-out texts: the prior each text gets, built from the harvest store's rows.

The live sources (``controller``, ``student_self``, ``uniform``) need nothing but the student's own pass.
The two that need a text's stored rows:

- ``teacher`` (the oracle): the teacher's head-mean attention of the mapped layer, aligned to the student's
  tokens (``teacher_dist_L{layer}``, the leading ``harvest.max_dist_len`` block); with per-head targets
  (``heads_of``), each student head gets its matched teacher head's aligned rows (``teacher_heads_L{layer}``,
  :mod:`uzr.harvest.head_matching`). Zero-mass entries (the
  teacher's dropped BOS sink, keys no teacher token maps to) get :data:`ORACLE_FLOOR` so that ``bias`` mode
  adds a large finite penalty there instead of forbidding the key outright.
- ``shuffled`` (the negative control): the controller's rows for the *next* held-out text that is at least as
  long (cyclically), cropped to this text's length. A causal controller's rows for the first S positions
  depend only on those positions, so the crop is what the controller predicts for a text of length S — just
  not this one. The longest text borrows the following texts' hidden states joined end to end (never its own).

Facts-QA prompts have no stored rows: there the oracle is computed live (:class:`uzr.injection.oracle.TeacherPrior`: the
teacher reads the prompt's text itself), and ``shuffled`` is reported on bits per byte only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from uzr.injection.oracle import ORACLE_FLOOR
from uzr.injection.priors import AttentionPrior, RowsPrior, live_prior
from uzr.masks import masked_log_softmax

STORED_ROWS = ("teacher", "shuffled")  # sources that need a text's store rows (not available for QA prompts)


def text_prior(source: str, controllers: Mapping[int, torch.nn.Module], rows: Sequence[dict],
               device: str | torch.device = "cpu", heads_of: Mapping[int, Sequence[int]] | None = None,
               ) -> Callable[[torch.Tensor, dict], AttentionPrior]:
    """``prior(ids, row)`` for a held-out store row of ``rows`` (the texts being scored, in order).

    ``heads_of``: per-head targets, ``{layer: teacher head of each student head}`` (the store's head matching);
    None: head-mean targets.
    """
    if source not in STORED_ROWS:
        prior = live_prior(source, controllers, per_head=heads_of is not None)
        return lambda ids, row: prior
    layers = list(controllers)
    if source == "teacher":
        return lambda ids, row: teacher_rows_prior(row, layers, heads_of, device)
    lengths = [len(r["input_ids"]) for r in rows]

    def shuffled(ids: torch.Tensor, row: dict) -> AttentionPrior:
        s = ids.shape[1]
        others = borrowed(lengths, _index_of(rows, row))
        return RowsPrior({layer: controller_rows(controllers[layer],
                                                 np.concatenate([rows[i][f"hidden_L{layer}"] for i in others])[:s],
                                                 device)
                          for layer in layers}, "shuffled")

    return shuffled


def teacher_rows_prior(row: dict, layers: Sequence[int], heads_of: Mapping[int, Sequence[int]] | None,
                       device: str | torch.device = "cpu") -> RowsPrior:
    """The oracle of one stored text: the teacher's aligned rows at ``layers`` (:func:`oracle_rows`), floored."""
    return RowsPrior({layer: _log_rows(oracle_rows(row, layer, heads_of), device) for layer in layers}, "teacher")


def oracle_rows(row: dict, layer: int, heads_of: Mapping[int, Sequence[int]] | None) -> np.ndarray:
    """The oracle's rows of one text: (D, D) head mean, or (H_s, D, D) matched teacher head per student head."""
    if heads_of is None:
        return np.asarray(row[f"teacher_dist_L{layer}"])
    return np.asarray(row[f"teacher_heads_L{layer}"])[list(heads_of[layer])]


def borrowed(lengths: Sequence[int], index: int) -> list[int]:
    """The texts whose hidden states stand in for text ``index``: the next one (cyclically) that is at least as
    long, else the following texts other than ``index``, joined end to end until they cover its length."""
    n = len(lengths)
    if n < 2:
        raise ValueError("inject.source=shuffled needs at least 2 held-out texts (evaluate.num_texts)")
    order = [(index + step) % n for step in range(1, n)]
    for other in order:
        if lengths[other] >= lengths[index]:
            return [other]
    chosen, covered = [], 0
    while covered < lengths[index]:
        for other in order:
            chosen.append(other)
            covered += lengths[other]
            if covered >= lengths[index]:
                break
    return chosen


@torch.no_grad()
def controller_rows(controller: torch.nn.Module, hidden, device) -> torch.Tensor:
    """(1, 1|H, S, S) causal log-probabilities of a controller (per head: H) over a text's stored hidden states
    (S, D)."""
    h = torch.as_tensor(np.asarray(hidden), dtype=torch.float32, device=device)[None]  # (1, S, D)
    s = h.shape[1]
    logits = controller(h)  # (1, S, S) or (1, H, S, S)
    logits = logits if logits.dim() == 4 else logits[:, None]
    allowed = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).tril()
    return masked_log_softmax(logits, allowed.expand_as(logits))


def _log_rows(dist, device) -> torch.Tensor:
    """(D, D) or (H, D, D) probabilities -> (1, 1|H, D, D) floored log-probabilities."""
    rows = torch.as_tensor(np.asarray(dist), dtype=torch.float32, device=device)  # ([H,] D, D)
    rows = rows.clamp_min(ORACLE_FLOOR).log()
    return rows[None] if rows.dim() == 3 else rows[None, None]


def _index_of(rows: Sequence[dict], row: dict) -> int:
    for index, candidate in enumerate(rows):
        if candidate is row:
            return index
    raise ValueError("inject.source=shuffled: the row being scored is not among the evaluated rows")
