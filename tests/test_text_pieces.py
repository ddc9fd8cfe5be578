"""Text rows from 8-byte pieces: every rendered row equals the plain Python concatenation of its segments."""

from __future__ import annotations

import numpy as np
import pytest

from uzr.tasks.text_pieces import TextRows, fuse, numbers, pack, render


def test_numbers_are_their_decimal_strings():
    values = np.array([0, 7, -7, 10, -10, 9999, -9999, 10000, -10000, 123456, -999999, 999999, 40, -305])
    vals, lens = numbers(values)  # the arithmetic path (some |v| > 9999)
    small_vals, small_lens = numbers(values[np.abs(values) <= 9999])  # the table path
    as_text = [int(v).to_bytes(8, "little")[:L].decode() for v, L in zip(vals, lens)]
    assert as_text == [str(v) for v in values]
    assert (small_vals == vals[np.abs(values) <= 9999]).all() and (small_lens == lens[np.abs(values) <= 9999]).all()
    with pytest.raises(OverflowError, match="999999"):
        numbers(np.array([1_000_000]))


def _random_group(rng, n: int, gap: bool) -> tuple[TextRows, list[str]]:
    """Random segments: piece blocks of 0-8 random letters (some rows empty), masked and unmasked runs; ends in
    a run unless ``gap``. Returns the rows and the texts they must render to."""
    rows, want = TextRows(n), [""] * n
    for _ in range(rng.integers(1, 6)):
        k = int(rng.integers(1, 4))
        lens = rng.integers(0, 9, (n, k))
        words = [["".join(rng.choice(list("abcdefghij"), L)) for L in row] for row in lens]
        rows.pieces(np.array([[pack(w) for w in row] for row in words], np.uint64), lens)
        want = [t + "".join(row) for t, row in zip(want, words)]
        run = "R" * int(rng.integers(9, 30))
        mask = rng.random(n) < 0.5
        rows.text(run, mask)
        want = [t + (run if m else "") for t, m in zip(want, mask)]
    if not gap:
        rows.text("the end of every row.")
        want = [t + "the end of every row." for t in want]
    return rows, want


@pytest.mark.parametrize("gap", [False, True])
def test_render_equals_python_concatenation(gap):
    rng = np.random.default_rng(0)
    order = rng.permutation(120)  # two groups whose rows interleave in the output
    groups, want = [], [None] * 120
    for where in (np.sort(order[:70]), np.sort(order[70:])):
        rows, texts = _random_group(rng, len(where), gap)
        groups.append((where, rows))
        for i, t in zip(where, texts):
            want[i] = t
    assert render(groups, 120, gap=gap).to_pylist() == want


def test_a_row_that_ends_in_a_piece_needs_the_gap():
    rows = TextRows(3)
    rows.text("Start: x")
    rows.pieces(*fuse((pack("ab"), 2), (np.array([[pack("c")], [0], [pack("de")]], np.uint64),
                                       np.array([[1], [0], [2]]))))
    with pytest.raises(ValueError, match="gap=True"):
        render([(np.arange(3), rows)], 3)
    assert render([(np.arange(3), rows)], 3, gap=True).to_pylist() == ["Start: xabc", "Start: xab", "Start: xabde"]
