"""Head matching by measured effect (``harvest.head_matching=effect``, issue 25 part 4).

Attention matching (:mod:`uzr.harvest.head_matching`) pairs a student head with the teacher head it *resembles*;
on a copy of the teacher whose query heads are permuted, that is the pattern the head already has, and the per-head
oracle then repairs nothing. Output-slot matching repairs it but needs one architecture on both sides. Matching by
effect asks the student itself: the cost of pairing student head ``h`` with teacher head ``t`` is the change of the
student's next-token loss (nats per token) when teacher head ``t``'s stored rows are injected into head ``h`` alone
(every other head untouched), on the first ``harvest.effect_texts`` *training* texts of the store (held-out texts never
choose the map they are scored with). Lower is better; :func:`~uzr.harvest.head_matching.match_heads` then assigns
(Hungarian, or each student head its least-cost teacher head when the teacher has fewer heads).

The injection is ``mix`` at alpha 1, whatever the run's ``inject.mode``: the head's probabilities are replaced by the
teacher head's, so the cost says how well that teacher head does this head's job; and the store's key does not hold
``inject.mode``, so the map must not depend on it. Zero-mass entries of the aligned rows get the oracle's floor
(:data:`~uzr.injection.oracle.ORACLE_FLOOR`), as the per-head oracle injects them.

Cost: per text one plain pass and, per stored layer and student head, one pass of a batch of ``H_t`` copies of the
text (one per teacher head), over the leading ``harvest.max_dist_len`` tokens the rows cover.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from uzr.config.inject import AlphaSpec
from uzr.harvest.head_matching import match_heads
from uzr.hooks import injected
from uzr.injection.injector import Injector
from uzr.injection.oracle import ORACLE_FLOOR
from uzr.injection.priors import RowsPrior
from uzr.next_token import token_nll

MODE = "mix"  # the effect's injection (module docstring): a head's probabilities replaced, at alpha 1
ALPHA = AlphaSpec(value=1.0)


@torch.no_grad()
def summed_nll(student, ids: torch.Tensor, injector: Injector | None = None) -> torch.Tensor:
    """(B,) summed next-token loss (nats) of each row of ``ids`` (B, S), edited by ``injector`` if given."""
    with injected(student, injector):
        return token_nll(student, ids).sum(1)


def head_effects(student, ids: torch.Tensor, teacher_heads: np.ndarray, layer: int) -> torch.Tensor:
    """(H_t, H_s) change of the summed loss of one text when teacher head ``t``'s rows replace student head ``h``'s.

    Args:
        ids: (1, D) the text's leading tokens (the rows' span); teacher_heads: (H_t, D, D) its aligned teacher rows.
    """
    n_teacher, n_student = teacher_heads.shape[0], student.config.num_attention_heads
    rows = torch.as_tensor(np.asarray(teacher_heads), dtype=torch.float32, device=ids.device)  # (H_t, D, D)
    prior = RowsPrior({layer: rows.clamp_min(ORACLE_FLOOR).log()[:, None]}, "teacher head")  # (H_t, 1, D, D)
    batch = ids.expand(n_teacher, -1)  # (H_t, D): batch row t carries teacher head t
    plain = summed_nll(student, ids)  # (1,)
    return torch.stack([summed_nll(student, batch, Injector(prior, ALPHA, MODE, prompt_len=0, heads={layer: (h,)}))
                        for h in range(n_student)], 1) - plain  # (H_t, H_s)


def match_effects(student, rows, layers: list[int], texts: int) -> dict:
    """``layout.head_matching`` by effect from the first ``texts`` training rows of a per-head store
    (:class:`~uzr.harvest.store.StoreRows`).

    Returns ``{"L{layer}": {"teacher_heads": [...], "method": ..., "kind": "effect", "texts": n, "tokens": n,
    "cost": (H_t, H_s) loss change in nats per token}}``.
    """
    n = min(texts, len(rows))
    if n == 0:
        raise ValueError("head matching needs training texts in the harvest store (the train split is empty)")
    device = next(student.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    tokens = 0
    for i in tqdm(range(n), desc="head matching by effect", unit="text"):
        row = rows[i]
        span = np.asarray(row[f"teacher_heads_L{layers[0]}"]).shape[-1]  # D = min(S, harvest.max_dist_len)
        ids = torch.as_tensor(np.asarray(row["input_ids"])[:span], dtype=torch.long, device=device)[None]  # (1, D)
        for layer in layers:
            effect = head_effects(student, ids, np.asarray(row[f"teacher_heads_L{layer}"]), layer).double().cpu()
            sums[layer] = effect if layer not in sums else sums[layer] + effect
        tokens += span - 1
    out = {}
    for layer in layers:
        cost = (sums[layer] / max(tokens, 1)).numpy()
        teacher_of, method = match_heads(cost, nearest="min_effect_many_to_one")
        out[f"L{layer}"] = {"teacher_heads": teacher_of, "method": method, "kind": "effect", "texts": n,
                            "tokens": tokens, "cost": np.round(cost, 6).tolist()}
    return out
