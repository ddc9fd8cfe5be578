"""``inject.source`` on stored rows: the oracle is the aligned teacher rows, the shuffled control never this text's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uzr.evaluate.sources import ORACLE_FLOOR, borrowed, controller_rows, text_prior
from uzr.injection.priors import AttentionCall


class Bilinear(torch.nn.Module):
    """A controller whose logits are h @ h^T: different texts give different rows."""

    def forward(self, hidden):
        return hidden @ hidden.transpose(-1, -2)


def store_row(rng, s: int, d: int = 6, layer: int = 1) -> dict:
    teacher = np.tril(rng.random((s, s))).astype(np.float32)
    teacher[:, 0] = 0  # a dropped sink: zero mass on the first key
    teacher[0, 0] = 1
    teacher /= teacher.sum(-1, keepdims=True)
    return {"input_ids": list(range(s)), f"teacher_dist_L{layer}": teacher.astype(np.float16),
            f"hidden_L{layer}": rng.standard_normal((s, d)).astype(np.float16)}


def call_for(s: int) -> AttentionCall:
    pos = torch.arange(s)
    return AttentionCall(None, torch.zeros(1, s, 6), None, None, torch.ones(1, s, s, dtype=torch.bool).tril(), pos, pos)


def test_teacher_source_is_the_stored_aligned_rows():
    rows = [store_row(np.random.default_rng(0), 9)]
    prior = text_prior("teacher", {1: Bilinear()}, rows)(torch.zeros(1, 9, dtype=torch.long), rows[0])
    scores = prior.scores(1, call_for(9), torch.zeros(1, 9, 0))  # (1, 1, 9, 9)
    teacher = torch.as_tensor(rows[0]["teacher_dist_L1"].astype(np.float32))
    torch.testing.assert_close(scores[0, 0], teacher.clamp_min(ORACLE_FLOOR).log())
    assert float(scores[0, 0, 3, 0].exp()) == pytest.approx(ORACLE_FLOOR)  # the dropped sink: floored, not -inf


def test_shuffled_source_uses_another_text_of_at_least_the_same_length():
    lengths = [5, 9, 7, 9, 3]
    for index in range(len(lengths)):
        (other,) = borrowed(lengths, index)
        assert other != index and lengths[other] >= lengths[index]
    rng = np.random.default_rng(1)
    rows = [store_row(rng, s) for s in lengths]
    ctrl = Bilinear()
    prior = text_prior("shuffled", {1: ctrl}, rows)
    for index, row in enumerate(rows):
        s = lengths[index]
        scores = prior(torch.zeros(1, s, dtype=torch.long), row).scores(1, call_for(s), torch.zeros(1, s, 0))
        (other,) = borrowed(lengths, index)
        torch.testing.assert_close(scores, controller_rows(ctrl, rows[other]["hidden_L1"][:s], "cpu"))
        own = controller_rows(ctrl, row["hidden_L1"], "cpu")
        assert (scores - own).abs().max() > 1e-2


def test_the_longest_text_borrows_the_following_texts_joined():
    assert borrowed([5, 12, 4], 1) == [2, 0, 2]  # 4 + 5 + 4 >= 12, never text 1 itself
    assert borrowed([3, 3, 10], 2) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="at least 2 held-out texts"):
        borrowed([7], 0)
