"""What a layer records: a :class:`LayerRecorder` runs its reducers on every block of the blocked attention pass,
and :func:`recording` attaches recorders to a model for a block of code::

    with recording(model, {layer: LayerRecorder(block_size=64, reducers=[HeadRows()]) for layer in layers}) as rec:
        model(**batch)
    rows = {layer: rec[layer].take()["heads"] for layer in layers}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from uzr.attention.function import use_uzr_attention
from uzr.attention.layers import RECORDER, attach_to_layers, attention_modules, detach_from_layers
from uzr.attention.reducers import HabitStats, HeadMeanRows, Reducer


class LayerRecorder:
    """What one layer records during a forward pass: the results of its reducers, per attention call.

    Args:
        window: locality window in tokens of the standard :class:`~uzr.attention.reducers.HabitStats`
            (default 8).
        keep_head_mean: also run :class:`~uzr.attention.reducers.HeadMeanRows` (head-averaged distribution).
        block_size: most query rows per block (required: the pipeline's ``harvest.block_size`` is the one
            default).
        dist_rows: rows (and keys) of the head-mean kept, see :class:`~uzr.attention.reducers.HeadMeanRows`.
        max_block_elems: most scores per block (heads x rows x keys); lowers the rows per block for
            long inputs so the block buffers stay small.
        reducers: the reducers to run instead of the standard ones (then ``window``, ``keep_head_mean``
            and ``dist_rows`` are not given); names must be distinct.

    After a forward pass, :meth:`take` gives ``{reducer name: result}`` (the calls of the pass concatenated
    along each reducer's ``query_dim``); :meth:`result` the standard pair. ``nonfinite_rows``: number of
    (batch, head, query) rows with an allowed non-finite score (NaN or inf, e.g. a half-precision
    overflow upstream). Those rows get zero probability (and NaN statistics), so a harvest can skip the
    text and report it, never store NaN or a silently truncated row.
    """

    def __init__(self, window: int | None = None, keep_head_mean: bool = False, *, block_size: int,
                 dist_rows: int | None = None, max_block_elems: int = 1 << 22,
                 reducers: Sequence[Reducer] | None = None):
        if reducers is None:
            reducers = [HabitStats(8 if window is None else window)]
            if keep_head_mean:
                reducers.append(HeadMeanRows(dist_rows))
        elif window is not None or keep_head_mean or dist_rows is not None:
            raise ValueError("LayerRecorder: give reducers=[...] or window/keep_head_mean/dist_rows, not both")
        if block_size < 1:
            raise ValueError(f"LayerRecorder: block_size={block_size} must be >= 1")
        for reducer in reducers:
            if not isinstance(reducer, Reducer):
                raise TypeError(f"LayerRecorder: {type(reducer).__name__} lacks the Reducer methods "
                                "(name, query_dim, start, add, finish)")
        names = [reducer.name for reducer in reducers]
        if len(set(names)) != len(names):
            raise ValueError(f"LayerRecorder: reducer names must be distinct, got {names}")
        self.reducers = list(reducers)
        self.block_size, self.max_block_elems = block_size, max_block_elems
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.nonfinite_rows = 0

    def __getitem__(self, name: str) -> Reducer:
        """The reducer called ``name`` (e.g. ``recorder["head_mean"].dist_rows = 512``)."""
        for reducer in self.reducers:
            if reducer.name == name:
                return reducer
        raise KeyError(f"no reducer {name!r}; this recorder has {[r.name for r in self.reducers]}")

    def take(self) -> dict[str, torch.Tensor]:
        """``{reducer name: result}`` of the calls since the last take (concatenated along ``query_dim``); clears.

        ``nonfinite_rows`` is left for the caller to read (and reset).
        """
        out = {}
        for reducer in self.reducers:
            parts = self.outputs.get(reducer.name)
            if parts:
                out[reducer.name] = parts[0] if len(parts) == 1 else torch.cat(parts, reducer.query_dim)
        self.outputs = {}
        return out

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The standard reducers' results: ({name: (B, H, S)}, head-mean (B, S', S') or None); clears.

        ``({}, None)`` after no call (e.g. a forward pass that failed before this layer).
        """
        out = self.take()
        habits = out.get(HabitStats.name)
        return ({} if habits is None else HabitStats.named(habits)), out.get(HeadMeanRows.name)

    def _begin(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        for reducer in self.reducers:
            reducer.start(batch, heads, q_len, k_len, device)

    def _end(self, bad_rows: torch.Tensor) -> None:
        self.nonfinite_rows += int(bad_rows)
        for reducer in self.reducers:
            self.outputs.setdefault(reducer.name, []).append(reducer.finish())


@contextmanager
def recording(model, recorders: Mapping[int, LayerRecorder]) -> Iterator[Mapping[int, LayerRecorder]]:
    """``model`` on the uzr attention function with ``recorders[layer]`` on each layer's attention module for the
    block, detached on exit (also on error); yields ``recorders``, whose results stay readable after the block.

    Raises ``RuntimeError`` (before attaching any) when one of the layers already carries a recorder.
    """
    use_uzr_attention(model)
    modules = attention_modules(model)
    attach_to_layers(RECORDER, [(modules[layer], recorder) for layer, recorder in recorders.items()])
    try:
        yield recorders
    finally:
        detach_from_layers(RECORDER, [modules[layer] for layer in recorders])
