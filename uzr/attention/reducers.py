"""Reducers: what the blocked attention pass records from each block of query rows.

The blocked eager pass in :mod:`uzr.attention.function` computes, per block of query rows, the float32 scores
``t = s - max s`` and ``e = exp(t)`` and hands the same :class:`ScoreBlock` to every reducer of the layer's
:class:`~uzr.attention.recorder.LayerRecorder`. A reducer turns the blocks of one attention call into one tensor:

- ``start(batch, heads, q_len, k_len, device)``: a call begins; preallocate the result, filled with the
  value of a row without allowed keys (zeros): blocks whose rows are all padding are never passed on;
- ``add(block)``: fold one block in (read ``block.e``/``block.t``, never write them: the pass reuses
  ``e`` for the attention output);
- ``finish() -> Tensor``: the call's result, whose axis ``query_dim`` indexes the query rows (a recorder
  concatenates the calls of one forward pass, e.g. decoding steps, along it).

The probability of key ``lo + c`` for row ``start + r`` is ``e[..., r, c] * inv_z[..., r]``. Two standard
reducers: :class:`HabitStats` (DESIGN.md §4 statistics) and :class:`HeadMeanRows` (head-mean distribution
of the leading rows); :class:`HeadRows` keeps each head's rows of the same block (per-head targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from uzr.attention.stats import STAT_NAMES, score_block_stats


@dataclass
class ScoreBlock:
    """One block of query rows of one attention call, in float32.

    Rows are the call's query rows ``[start, stop)`` (``n = stop - start``); columns are the keys
    ``[lo, hi)`` (``w = hi - lo``) of the call's key sequence (KV cache included), the only keys these rows
    may see. Query row ``start + r`` sits at position ``q_first + r`` of the key sequence.
    """

    start: int
    stop: int
    lo: int
    hi: int
    q_first: int  # key-sequence position of query row ``start`` (``start + k_len - q_len``)
    future: bool  # some row may see a key after itself (bidirectional masks; never for causal ones)
    t: torch.Tensor  # (B, H, n, w) scores minus their row maximum; disallowed keys hugely negative
    e: torch.Tensor  # (B, H, n, w) exp(t): unnormalised probabilities, 0 at disallowed keys and on bad rows
    z: torch.Tensor  # (B, H, n) row sums of e
    inv_z: torch.Tensor  # (B, H, n) 1 / z on valid rows, 0 elsewhere
    n_keys: torch.Tensor  # (B, H, n) float32 number of allowed keys per row (0: padding row)
    valid: torch.Tensor  # (B, H, n) bool: allowed keys and finite scores
    bad: torch.Tensor  # (B, H, n) bool: allowed keys with a non-finite score (NaN, inf)


@runtime_checkable
class Reducer(Protocol):
    """What a :class:`~uzr.attention.recorder.LayerRecorder` runs on every block (see the module docstring)."""

    name: str  # key of the result in ``LayerRecorder.take()``
    query_dim: int  # axis of ``finish()``'s result that indexes query rows

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None: ...

    def add(self, block: ScoreBlock) -> None: ...

    def finish(self) -> torch.Tensor: ...


class HabitStats:
    """Entropy, normalised entropy, locality and mean distance of every (batch, head, query) row.

    Result: (4, B, H, q) float32 in ``STAT_NAMES`` order (nats, fraction of ``log n_keys``, probability
    mass on the last ``window`` positions, tokens). Padding rows 0, rows with non-finite scores NaN.
    """

    name = "habits"
    query_dim = -1

    def __init__(self, window: int):
        self.window = window  # locality window in tokens
        self.out: torch.Tensor | None = None

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        self.out = torch.zeros(len(STAT_NAMES), batch, heads, q_len, device=device)  # (4, B, H, q)

    def add(self, block: ScoreBlock) -> None:
        future = None
        if block.future:
            device, n = block.e.device, block.stop - block.start
            j = torch.arange(block.lo, block.hi, device=device, dtype=torch.float32)
            i = torch.arange(block.q_first, block.q_first + n, device=device, dtype=torch.float32)
            future = (j[None, :] - i[:, None]).clamp(min=0)  # (n, w) max(j - i, 0)
        self.out[..., block.start:block.stop] = score_block_stats(
            block.t, block.e, block.z, block.inv_z, block.valid, block.bad, block.n_keys,
            block.q_first, block.lo, self.window, future,
        )

    def finish(self) -> torch.Tensor:
        out, self.out = self.out, None
        return out

    @staticmethod
    def named(result: torch.Tensor) -> dict[str, torch.Tensor]:
        """(4, ..., q) result -> ``{name: (..., q)}`` views, names as in ``STAT_NAMES``."""
        return dict(zip(STAT_NAMES, result))


class HeadMeanRows:
    """Head-averaged attention distribution of the leading query rows.

    Args:
        dist_rows: keep the rows ``< dist_rows`` and the keys ``< dist_rows`` (plus the cached keys before
            the call's first query); ``None``: every row and key. For a causal layer those rows see no later
            key, so the block holds their whole distribution while its memory stays ``O(dist_rows^2)``.

    Result: (B, q', k') float32 probabilities (``q' = min(q, dist_rows)``); rows of padding and rows with
    non-finite scores are 0. Only the blocks that hold kept rows write into it, each entry once.
    """

    name = "head_mean"
    query_dim = 1

    def __init__(self, dist_rows: int | None = None):
        self.dist_rows = dist_rows
        self.out: torch.Tensor | None = None

    def shape(self, q_len: int, k_len: int) -> tuple[int, int]:
        """(rows, keys) kept for a call with ``q_len`` queries and ``k_len`` keys."""
        if self.dist_rows is None or self.dist_rows >= q_len:
            return q_len, k_len
        return self.dist_rows, min(self.dist_rows + k_len - q_len, k_len)  # queries sit at the end of the keys

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        self.out = torch.zeros(batch, *self.shape(q_len, k_len), device=device)  # (B, q', k')

    def add(self, block: ScoreBlock) -> None:
        rows = min(block.stop, self.out.shape[1]) - block.start
        keys = min(block.hi, self.out.shape[2]) - block.lo
        if rows <= 0 or keys <= 0:  # a block past the kept rows adds nothing (the common case at long S)
            return
        e = block.e[:, :, :rows, :keys]  # (B, H, r, c)
        weights = (block.inv_z[:, :, :rows] / e.shape[1])[..., None]  # (B, H, r, 1)
        mean = self.out[:, block.start:block.start + rows, block.lo:block.lo + keys]  # written in place
        torch.mul(e[:, 0], weights[:, 0], out=mean)
        for h in range(1, e.shape[1]):
            mean.addcmul_(e[:, h], weights[:, h])

    def finish(self) -> torch.Tensor:
        out, self.out = self.out, None
        return out


class HeadRows(HeadMeanRows):
    """Each head's own attention distribution of the leading query rows (per-head targets, issue 13).

    Same rows and keys as :class:`HeadMeanRows` (``dist_rows`` bounds both, so memory stays
    ``O(H * dist_rows^2)``). Result: (B, H, q', k') float32 probabilities; padding rows and rows with
    non-finite scores are 0.
    """

    name = "heads"
    query_dim = 2

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        self.out = torch.zeros(batch, heads, *self.shape(q_len, k_len), device=device)  # (B, H, q', k')

    def add(self, block: ScoreBlock) -> None:
        rows = min(block.stop, self.out.shape[2]) - block.start
        keys = min(block.hi, self.out.shape[3]) - block.lo
        if rows <= 0 or keys <= 0:
            return
        e = block.e[:, :, :rows, :keys]  # (B, H, r, c)
        out = self.out[:, :, block.start:block.start + rows, block.lo:block.lo + keys]  # written in place
        torch.mul(e, block.inv_z[:, :, :rows, None], out=out)
