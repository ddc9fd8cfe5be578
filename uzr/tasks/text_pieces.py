"""Rows of text assembled from short byte pieces straight into one Arrow string buffer (no loop over rows).

The rows of a group are a sequence of *segments*, each one column or a block of columns of the row:

- **pieces**: ``vals`` (n, k) little-endian uint64, each a string of 0-8 bytes (first byte lowest), and
  ``lens`` (n, k) its byte length;
- **runs**: one constant byte string, in every row or in the rows of a mask.

:func:`render` computes each row's length, hence its offset in the buffer and each column's position (the
running sum of the row's lengths). Pieces are written column by column in row order, each column by one
assignment into an overlapping uint64 view of the buffer (stride 1 byte, one item per byte offset): a store
also writes ``8 - len`` bytes past its piece, which the row's later columns overwrite. Then each run is written
by one assignment into an overlapping ``V<len>`` view, which overwrites whatever spilled into it. The 8 bytes
stored for a row's last piece must lie within the row: end rows in a run of >= 8 bytes, or render with
``gap=True`` (8 spare bytes after each row, cut out at the end). :meth:`TextRows.write` checks this, so no
store reaches into another row, and the result does not depend on the order of stores within a column.

Why not simpler: the previous renderer gathered token strings with Arrow ``take`` and joined them with
``binary_join`` (38 % of generation time); compacting a zero-padded byte matrix with a boolean mask costs
~4 ns per byte; one 8-byte store per piece costs a few ns per piece (~25 pieces per prompt).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

U8 = np.dtype("<u8")  # a piece: up to 8 bytes, the first in the lowest byte


def pack(text: str) -> int:
    """A string of at most 8 ASCII bytes as a piece value."""
    raw = text.encode()
    if len(raw) > 8:
        raise ValueError(f"a piece holds at most 8 bytes, not {text!r}")
    return int.from_bytes(raw, "little")


def fuse(a: tuple, b: tuple) -> tuple:
    """Pieces ``a`` then ``b`` (each ``(vals, lens)``, broadcastable) as one piece each; the caller checks
    with :func:`fits` that every pair fits in 8 bytes."""
    (va, la), (vb, lb) = a, b
    return np.asarray(va, U8) | (np.asarray(vb, U8) << (np.asarray(la, U8) * U8.type(8))), la + lb


def words(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One constant piece per column: ``(vals, lens)`` (len(texts),), the same in every row."""
    return np.array([pack(t) for t in texts], U8), np.array([len(t.encode()) for t in texts])


def only(mask: np.ndarray, piece: tuple) -> tuple:
    """The piece where ``mask`` holds, the empty piece elsewhere (shapes broadcast)."""
    vals, lens = piece
    return np.where(mask, np.asarray(vals, U8), U8.type(0)), mask * np.asarray(lens)


def fits(a: tuple, b: tuple) -> bool:
    return int(np.max(a[1])) + int(np.max(b[1])) <= 8


def join(*blocks: tuple) -> list[tuple]:
    """Consecutive piece blocks, each fused into the one before it where every row's pair fits in 8 bytes."""
    out = [blocks[0]]
    for b in blocks[1:]:
        out[-1:] = [fuse(out[-1], b)] if fits(out[-1], b) else [out[-1], b]
    return out


def interleave(blocks: list[tuple], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of shape (n, k) -> one block (n, k * len(blocks)): row-wise block 0's column 0, block 1's
    column 0, ..., block 0's column 1, ... (e.g. name, value and separator of each variable in turn)."""
    k = np.broadcast_shapes((1,), *(np.shape(v) for v, _ in blocks), *(np.shape(L) for _, L in blocks))[-1]
    vals = np.stack([np.broadcast_to(np.asarray(v, U8), (n, k)) for v, _ in blocks], -1)
    lens = np.stack([np.broadcast_to(np.asarray(L, np.int64), (n, k)) for _, L in blocks], -1)
    return vals.reshape(n, -1), lens.reshape(n, -1)


MAX_NUMBER = 999_999  # 6 digits and a sign: 7 bytes


def _number_pieces(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers (...,), |v| <= MAX_NUMBER -> pieces: a sign, then the digits without leading zeros."""
    a = np.abs(values).astype(U8)
    ndigits = 1 + sum((a >= U8.type(10 ** p)).astype(np.int64) for p in range(1, 6))
    neg = (values < 0).astype(np.int64)
    vals = np.where(neg == 1, U8.type(ord("-")), U8.type(0))
    for d in range(6):  # d = 0: the units digit, the piece's last byte
        byte = U8.type(ord("0")) + (a // U8.type(10 ** d)) % U8.type(10)
        shift = (8 * (neg + ndigits - 1 - d)).clip(0).astype(U8)
        vals |= np.where(d < ndigits, byte << shift, U8.type(0))
    return vals, neg + ndigits
_SMALL = 9999
_TABLE_VALS, _TABLE_LENS = _number_pieces(np.arange(-_SMALL, _SMALL + 1))


def numbers(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers (...,) -> their decimal pieces ``(vals, lens)`` (...,), e.g. -12 -> ``b"-12"``, 3 bytes."""
    biggest = int(np.abs(values).max(initial=0))
    if biggest > MAX_NUMBER:
        raise OverflowError(f"a number exceeds {MAX_NUMBER} (a piece holds 7 digits and a sign at most)")
    if biggest > _SMALL:
        return _number_pieces(values)
    return _TABLE_VALS[values + _SMALL], _TABLE_LENS[values + _SMALL]


class TextRows:
    """The segments of ``n`` rows, in row order (module docstring)."""

    def __init__(self, n: int):
        self.n = n
        # (first column, piece vals (n, k) or a run's bytes, the run's rows (n,) bool or None)
        self.segments: list[tuple[int, np.ndarray | bytes, np.ndarray | None]] = []
        self.lens: list[np.ndarray] = []  # each segment's byte lengths (n, k)
        self.columns = 0

    def _add(self, vals, lens: np.ndarray, mask=None) -> None:
        self.segments.append((self.columns, vals, mask))
        self.lens.append(lens)
        self.columns += lens.shape[1]

    def pieces(self, vals, lens) -> None:
        """A block of pieces (n, k), or broadcastable to it: (k,) is the same in every row, (n, 1) one column."""
        vals, lens = np.asarray(vals, U8), np.asarray(lens, np.int64)
        shape = np.broadcast_shapes(vals.shape, lens.shape, (self.n, 1))
        self._add(np.broadcast_to(vals, shape), np.broadcast_to(lens, shape))

    def sequence(self, *blocks: tuple) -> None:
        """Blocks of pieces (n, k) that alternate within the row (:func:`interleave`), fused where they fit."""
        self.pieces(*interleave(join(*blocks), self.n))

    def text(self, text: str, mask: np.ndarray | None = None) -> None:
        """Constant text in every row (or the rows of ``mask`` (n,) bool): one piece if it fits, else a run."""
        raw = text.encode()
        present = np.ones((self.n, 1), bool) if mask is None else mask[:, None]
        if len(raw) > 8:
            self._add(raw, np.where(present, len(raw), 0), mask)
        elif mask is None:
            self.pieces(pack(text), len(raw))
        else:
            self.pieces(np.where(present, U8.type(pack(text)), U8.type(0)), present * len(raw))

    def lengths(self) -> np.ndarray:
        """Every column's byte length per row (n, columns)."""
        return np.concatenate(self.lens, 1)

    def column_ends(self) -> np.ndarray:
        """Where each column ends within its row (n, columns); the last column: the row's length."""
        return np.cumsum(self.lengths(), 1)

    def write(self, buf: np.ndarray, start: np.ndarray, ends: np.ndarray, limit: np.ndarray) -> None:
        """Store the rows into ``buf`` (uint8) at the offsets ``start`` (n,); ``ends`` (n, C): where each column
        ends within the row (:meth:`column_ends`); ``limit`` (n,): where the bytes a row may touch end (its end,
        or the end of its spare bytes)."""
        def begins(column: int) -> np.ndarray:  # (n,) where the column begins in buf
            return start if column == 0 else start + ends[:, column - 1]

        pieces = [(c, v) for c, v, _ in self.segments if not isinstance(v, bytes)]
        if (begins(pieces[-1][0] + pieces[-1][1].shape[1] - 1) + 8 > limit).any():
            raise ValueError("a row's last piece would write past its end: end it in a run of >= 8 bytes or "
                             "render with gap=True")
        stores = _view(buf, U8)
        for c, vals in pieces:
            for j in range(vals.shape[1]):  # column by column, in row order: later pieces overwrite spills
                stores[begins(c + j)] = vals[:, j]  # rows never overlap (checked above), so one store per row
        for c, raw, mask in self.segments:
            if isinstance(raw, bytes):
                at = begins(c) if mask is None else begins(c)[mask]
                _view(buf, np.dtype(f"V{len(raw)}"))[at] = np.frombuffer(raw, f"V{len(raw)}")[0]


def _view(buf: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Every byte offset of ``buf`` as the start of one ``dtype`` item (overlapping items, stride 1)."""
    return np.ndarray((buf.size - dtype.itemsize + 1,), dtype, buffer=buf, strides=(1,))


def render(groups: list[tuple[np.ndarray, TextRows]], n: int, gap: bool = False) -> pa.LargeStringArray:
    """Groups of rows ``(row indices (k,), TextRows of k rows)`` covering rows 0..n-1 -> one Arrow string
    column in row order. ``gap``: 8 spare bytes after each row (rows that may end in a piece)."""
    lengths = np.zeros(n, np.int64)
    column_ends = [rows.column_ends() for _, rows in groups]  # (k, columns) per group
    for (where, _), group_ends in zip(groups, column_ends):
        lengths[where] = group_ends[:, -1]
    spare = 8 if gap else 0
    ends = np.cumsum(lengths + spare)  # (n,) staged row ends, spare bytes included
    starts = ends - lengths - spare
    buf = np.zeros(int(ends[-1]) + 8, np.uint8)
    for (where, rows), group_ends in zip(groups, column_ends):
        rows.write(buf, starts[where], group_ends, ends[where])
    if gap:
        keep = np.ones(int(ends[-1]), bool)
        keep[(ends[:, None] - spare + np.arange(spare)).ravel()] = False
        data = buf[:int(ends[-1])][keep]
    else:
        data = buf[:int(ends[-1])]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
