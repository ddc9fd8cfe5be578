"""The one attention function uzr registers with transformers, and the per-layer objects it consults.

``AttentionInterface.register("uzr", uzr_attention)`` plus ``AttentionMaskInterface.register("uzr",
sdpa_mask)`` (without the second the function would get ``attention_mask=None`` and silently ignore
padding). A model switched to ``attn_implementation="uzr"`` behaves exactly like ``sdpa`` until an
attention module carries one of these attributes:

- ``module.uzr_recorder``: a :class:`LayerRecorder`; the layer then runs blocked eager attention in
  float32 and hands each block of scores to :func:`~uzr.harvest.stats.score_block_stats` (statistics,
  head-mean rows) without ever materialising all layers' ``(B, H, S, S)`` weights;
- ``module.uzr_injector``: an object with ``attention_edit(module, query, key, mask)`` returning an
  :class:`AttentionEdit` (additive log-prior or probability mix), or ``None`` to leave the layer alone.

The blocked pass (:func:`_blocked_eager`) is built for long inputs:

- query rows are processed in blocks of at most ``LayerRecorder.block_size`` rows and at most
  ``LayerRecorder.max_block_elems`` scores, so memory grows linearly with the sequence length;
- each block only multiplies against the span of keys its rows may see (read from the mask once per
  mask and forward pass): a sliding-window layer costs ``O(S * window)``, a causal layer half of ``S^2``;
- grouped-query heads share their key/value head without ``repeat_kv``; keys and values are converted
  to float32 once per layer, never per block;
- the probabilities are never normalised into a separate tensor: ``e = exp(s - max)`` gives the output
  (``e @ V / Z``) and the statistics (see :mod:`uzr.harvest.stats`);
- the head-mean can be limited to the leading ``LayerRecorder.dist_rows`` query rows: a dense block
  filled only by the query blocks that hold those rows, so it does not grow with the sequence length.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from uzr.harvest.stats import STAT_NAMES, BlockGeometry, score_block_stats

ATTN_IMPLEMENTATION = "uzr"
# Score given to disallowed keys: exp(MASKED - max) is exactly 0, and 0 * MASKED is 0 (no NaN), unlike -inf.
MASKED = torch.finfo(torch.float32).min


@dataclass
class AttentionEdit:
    """What the injector does to one layer call.

    ``bias``: (B, 1, q, k) added to the scores (mode ``bias``), or ``None``.
    ``mix_probs``/``mix_alpha``: (B, q, k) controller probabilities and (B, q, 1) weights; the output
    becomes ``(1 - a) * out + a * (P_ctrl @ V)`` (mode ``mix``).
    """

    bias: torch.Tensor | None = None
    mix_probs: torch.Tensor | None = None
    mix_alpha: torch.Tensor | None = None


@dataclass
class LayerRecorder:
    """Collects attention statistics (and optionally head-mean rows) of one layer for one forward pass.

    Args:
        window: locality window in tokens.
        keep_head_mean: also keep the head-averaged distribution of the query rows.
        block_size: most query rows per block.
        dist_rows: keep the head-mean only for query rows ``< dist_rows`` and keys ``< dist_rows``
            (plus the cached keys before the call's first query), ``None``: every row and key. For a
            causal layer those rows see no later key, so the block holds their whole distribution while
            its memory stays ``O(dist_rows^2)`` at any sequence length. Statistics always cover every row.
        max_block_elems: most scores per block (heads x rows x keys); lowers the rows per block for
            long inputs so the block buffers stay small.

    After a forward pass: ``stats[name]``: list of (B, H, q) float32 tensors (one per attention call),
    ``head_mean``: list of (B, q', k') float32 tensors (``q' = min(q, dist_rows)``), ``nonfinite_rows``:
    number of (batch, head, query) rows with an allowed non-finite score (NaN or inf, e.g. a
    half-precision overflow upstream). Those rows get NaN statistics and zero probability, so a harvest
    can skip the text and report it, never store NaN or a silently truncated row.
    """

    window: int = 8
    keep_head_mean: bool = False
    block_size: int = 64
    dist_rows: int | None = None
    max_block_elems: int = 1 << 22
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    head_mean: list[torch.Tensor] = field(default_factory=list)
    nonfinite_rows: int = 0

    def head_mean_shape(self, q_len: int, k_len: int) -> tuple[int, int]:
        """(rows, keys) of the head-mean block kept for a call with ``q_len`` queries and ``k_len`` keys."""
        if self.dist_rows is None or self.dist_rows >= q_len:
            return q_len, k_len
        return self.dist_rows, min(self.dist_rows + k_len - q_len, k_len)  # queries sit at the end of the keys

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Returns ({name: (B, H, S)}, head-mean (B, S', S') or None); clears the recorder.

        ``nonfinite_rows`` is left for the caller to read (and reset) after the call.
        """
        stats = {name: parts[0] if len(parts) == 1 else torch.cat(parts, -1) for name, parts in self.stats.items()}
        head_mean = None
        if len(self.head_mean) == 1:
            head_mean = self.head_mean[0]
        elif self.head_mean:
            head_mean = torch.cat(self.head_mean, 1)
        self.stats, self.head_mean = {}, []
        return stats, head_mean


def causal_allowed(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, q, k) mask of allowed keys; builds the causal mask sdpa skipped."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    geometry = BlockGeometry.for_block(0, q_len, q_len, k_len, device)
    return (geometry.k_pos[None, :] <= geometry.q_pos[:, None])[None, None]  # (1, 1, q, k)


# ----------------------------------------------------------------------------------- block planning
@dataclass
class _Block:
    start: int  # query rows [start, stop)
    stop: int
    lo: int  # keys [lo, hi) hold every allowed key of these rows
    hi: int
    future: bool  # some row may see a key after itself (never for causal masks)


_PLANS: OrderedDict = OrderedDict()  # (id(mask), rows, offset) -> (weakref(mask), blocks); shared by layers


def _plan_from_mask(mask: torch.Tensor, rows: int, offset: int) -> list[_Block]:
    """Key span of every block of ``rows`` query rows, read from a boolean (B|1, 1, q, k) mask once.

    Layers of the same type share one mask object per forward pass, so the plan is cached by identity.
    """
    key = (id(mask), rows, offset, tuple(mask.shape))
    cached = _PLANS.get(key)
    if cached is not None and cached[0]() is mask:
        return cached[1]
    q_len, k_len = mask.shape[-2], mask.shape[-1]
    starts = list(range(0, q_len, rows))
    cols, future = [], []
    for start in starts:
        stop = min(start + rows, q_len)
        blk = mask[:, 0, start:stop]  # (B|1, rows, k)
        cols.append(blk.any(1).any(0))  # (k,)
        diag = stop + offset  # keys >= diag lie after every row of the block
        first = min(max(start + offset + 1, 0), k_len)
        late = blk[..., min(max(diag, 0), k_len):].any()
        if first < min(max(diag, 0), k_len):  # key j vs row i: future when j - first >= i - 0
            tail = blk[..., first:min(diag, k_len)]
            tri = torch.ones(tail.shape[-2:], dtype=torch.bool, device=mask.device).triu()
            late = late | (tail & tri).any()
        future.append(late)
    cols = torch.stack(cols).to(torch.uint8)  # (n_blocks, k)
    lo = cols.argmax(-1)
    hi = k_len - cols.flip(-1).argmax(-1)
    has = cols.amax(-1) > 0
    info = torch.stack([lo, hi, has.long(), torch.stack(future).long()], 1).tolist()  # one sync
    blocks = []
    for start, (lo_, hi_, has_, fut) in zip(starts, info):
        if not has_:
            lo_, hi_ = 0, 0
        blocks.append(_Block(start, min(start + rows, q_len), lo_, hi_, bool(fut)))
    _PLANS[key] = (weakref.ref(mask), blocks)
    while len(_PLANS) > 8:
        _PLANS.popitem(last=False)
    return blocks


def _plan(mask, q_len: int, k_len: int, rows: int, causal: bool) -> list[_Block]:
    offset = k_len - q_len
    if mask is not None:
        return _plan_from_mask(mask, rows, offset)
    blocks = []
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        if causal:
            blocks.append(_Block(start, stop, 0, stop + offset, False))
        else:
            blocks.append(_Block(start, stop, 0, k_len, start + offset + 1 < k_len))
    return blocks


def _rows_per_block(recorder: LayerRecorder, heads: int, q_len: int, k_len: int, window: int | None) -> int:
    """Most rows per block within ``block_size`` and ``max_block_elems`` (span: the keys a block reads)."""
    rows = max(1, min(recorder.block_size, q_len))
    while rows > 1:
        span = k_len if window is None else min(k_len, rows + window - 1)
        if heads * rows * span <= recorder.max_block_elems:
            break
        rows = (rows + 1) // 2
    return rows


_WORKSPACES: dict = {}


def _workspace(numel: int, device) -> torch.Tensor:
    """A float32 scratch buffer of at least ``numel`` elements, reused by every block and layer.

    Reusing one buffer (instead of allocating scores and ``exp`` per block) keeps the host allocator
    from fragmenting: freed 16 MB holes between the model's activations stay resident on CPU.
    Its size is bounded by ``2 * LayerRecorder.max_block_elems``.
    """
    # inference-mode tensors (Trainer.predict) cannot be written outside inference mode, and vice versa
    key = (str(device), torch.is_inference_mode_enabled())
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        _WORKSPACES.pop(key, None)
        buffer = torch.empty(numel, device=device)
        _WORKSPACES[key] = buffer
    return buffer


def release_workspace() -> None:
    """Free the scratch buffers of the blocked pass (they are kept between forward passes)."""
    _WORKSPACES.clear()


_TRIANGLES: dict = {}


def _upper_triangle(rows: int, device) -> torch.Tensor:
    """(rows, rows - 1) bool: True where key ``first + c`` lies after query ``i`` (``c >= i``)."""
    key = (rows, str(device))
    tri = _TRIANGLES.get(key)
    if tri is None:
        tri = torch.ones(rows, max(rows - 1, 0), dtype=torch.bool, device=device).triu()
        if len(_TRIANGLES) > 32:
            _TRIANGLES.clear()
        _TRIANGLES[key] = tri
    return tri


# -------------------------------------------------------------------------------------- the passes
class _Sink:
    """Where one attention call's statistics and head-mean rows go (preallocated, filled per block)."""

    def __init__(self, recorder: LayerRecorder, batch: int, heads: int, q_len: int, k_len: int, device):
        self.recorder = recorder
        self.stats = torch.zeros(len(STAT_NAMES), batch, heads, q_len, device=device)  # STAT_NAMES order
        self.dense = None
        if recorder.keep_head_mean:
            rows, keys = recorder.head_mean_shape(q_len, k_len)
            self.dense = torch.zeros(batch, rows, keys, device=device)  # (B, q', k')
        self.bad = torch.zeros((), dtype=torch.long, device=device)

    def finish(self) -> None:
        recorder = self.recorder
        recorder.nonfinite_rows += int(self.bad)
        for name, value in zip(STAT_NAMES, self.stats):
            recorder.stats.setdefault(name, []).append(value)
        if self.dense is not None:
            recorder.head_mean.append(self.dense)


def _add_head_mean(dense: torch.Tensor, blk: _Block, e: torch.Tensor, inv_z: torch.Tensor, bad: torch.Tensor) -> None:
    """Writes the head-mean of the block's rows that ``dense`` keeps into ``dense`` (B, q', k'), in place.

    ``e``: (B, H, n, w) unnormalised probabilities of keys ``[blk.lo, blk.hi)``, ``inv_z``: (B, H, n) their
    1 / Z, ``bad``: (B, H, n) non-finite rows. Rows partition into blocks, so each entry is written once;
    in a causal layer a kept row sees no key beyond ``k'``, so cutting the span loses no mass.
    """
    rows = min(blk.stop, dense.shape[1]) - blk.start
    keys = min(blk.hi, dense.shape[2]) - blk.lo
    if rows <= 0 or keys <= 0:  # a block past the kept rows adds nothing (the common case at long S)
        return
    if bool(bad.any()):
        e.masked_fill_(bad[..., None], 0.0)
    e = e[:, :, :rows, :keys]  # (B, H, r, c)
    weights = (inv_z[:, :, :rows] / e.shape[1])[..., None]  # (B, H, r, 1)
    mean = dense[:, blk.start:blk.start + rows, blk.lo:blk.lo + keys]  # written in place, no temporary
    torch.mul(e[:, 0], weights[:, 0], out=mean)
    for h in range(1, e.shape[1]):
        mean.addcmul_(e[:, h], weights[:, h])


def _blocked_eager(module, query, key, value, attention_mask, scaling, recorder, bias, softcap, window=None):
    """Eager attention over query blocks in float32, statistics recorded on the way.

    Args:
        query: (B, H, q, D); key/value: (B, H_kv, k, D) (not repeated for GQA).
        attention_mask: bool (B|1, 1, q, k) (True = attend) or None (causal; all keys for ``q = 1``).
        bias: optional (B|1, 1|H, q, k) added to the scores. ``window``: sliding window hint (block sizes).
    Returns:
        (B, q, H, D) in the query's dtype. Rows without allowed keys or with non-finite scores are 0.
    """
    batch, heads, q_len, _ = query.shape
    causal = getattr(module, "is_causal", True)
    if attention_mask is None and causal and 1 < q_len < key.shape[2]:
        # sdpa's is_causal is upper-left aligned: a prefill into a longer (static) cache sees keys [0, q)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        bias = None if bias is None else bias[..., :q_len]
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = causal_allowed(attention_mask, q_len, key.shape[2], query.device)
    kv_heads, k_len = key.shape[1], key.shape[2]
    n_rep = heads // kv_heads
    offset = k_len - q_len
    keys = key.float().contiguous()  # (B, H_kv, k, D): one float32 copy per layer at most
    values = value.float().contiguous()
    d_v = values.shape[-1]
    out = query.new_empty(batch, q_len, heads, d_v)
    sink = _Sink(recorder, batch, heads, q_len, k_len, query.device)
    rows = _rows_per_block(recorder, heads, q_len, k_len, window)
    for blk in _plan(attention_mask, q_len, k_len, rows, causal):
        n = blk.stop - blk.start
        width = blk.hi - blk.lo
        q_first = blk.start + offset
        if width <= 0:  # every row is padding: zero output, zero statistics
            out[:, blk.start:blk.stop] = 0
            continue
        q_blk = (query[:, :, blk.start:blk.stop].float() * scaling).reshape(batch, kv_heads, n_rep * n, -1)
        size = batch * heads * n * width
        buffers = _workspace(2 * size, query.device)
        scores = buffers[:size].view(batch, kv_heads, n_rep * n, width)
        torch.matmul(q_blk, keys[:, :, blk.lo:blk.hi].transpose(-1, -2), out=scores)
        scores = scores.view(batch, heads, n, width)
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
        if bias is not None:
            scores.add_(bias[:, :, blk.start:blk.stop, blk.lo:blk.hi])
        if attention_mask is not None:
            allowed = attention_mask[:, :, blk.start:blk.stop, blk.lo:blk.hi]  # (B|1, 1, n, w)
            torch.where(allowed, scores, scores.new_tensor(MASKED), out=scores)
            n_keys = allowed.sum(-1)  # (B|1, 1, n)
        elif causal:
            first = q_first + 1 - blk.lo  # column of the key right after the block's first query
            if first < width:
                scores[..., first:].masked_fill_(_upper_triangle(n, query.device)[:, : width - first], MASKED)
            n_keys = torch.arange(q_first + 1 - blk.lo, q_first + 1 - blk.lo + n, device=query.device)
        else:
            n_keys = torch.full((n,), width, device=query.device)
        future = None
        if blk.future:
            j = torch.arange(blk.lo, blk.hi, device=query.device, dtype=torch.float32)
            i = torch.arange(q_first, q_first + n, device=query.device, dtype=torch.float32)
            future = (j[None, :] - i[:, None]).clamp(min=0)
        scores.sub_(scores.amax(-1, keepdim=True))  # t = s - max
        e = torch.exp(scores, out=buffers[size:2 * size].view(batch, heads, n, width))
        stats, inv_z, valid, bad = score_block_stats(scores, e, n_keys, q_first, blk.lo, recorder.window, future)
        sink.bad += bad.sum()
        sink.stats[..., blk.start:blk.stop] = stats
        if sink.dense is not None:
            _add_head_mean(sink.dense, blk, e, inv_z, bad)
        o = torch.matmul(e.view(batch, kv_heads, n_rep * n, width), values[:, :, blk.lo:blk.hi])
        o = o.view(batch, heads, n, d_v).mul_(inv_z[..., None])
        if bool(bad.any()):
            o.masked_fill_(bad[..., None], 0.0)  # NaN rows -> 0
        out[:, blk.start:blk.stop] = o.transpose(1, 2)
    sink.finish()
    return out


def _mix(output, value, edit: AttentionEdit, n_heads: int):
    """(1 - a) * output + a * (P_ctrl @ V), with P_ctrl shared by all heads."""
    value = repeat_kv(value, n_heads // value.shape[1])  # (B, H, k, D)
    ctrl = torch.einsum("bqk,bhkd->bqhd", edit.mix_probs.to(value.dtype), value)  # (B, q, H, D)
    a = edit.mix_alpha.to(output.dtype)[..., None]  # (B, q, 1, 1)
    return (1 - a) * output + a * ctrl


def uzr_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: sdpa, plus uzr's recorder and injector when attached.

    Args:
        query: (B, H, q, D); key/value: (B, H_kv, k, D), KV cache included, not yet repeated for GQA.
        attention_mask: bool (B, 1, q, k) from ``sdpa_mask`` (True = attend) or None (plain causal).
    Returns:
        (output (B, q, H, D), None)
    """
    recorder: LayerRecorder | None = getattr(module, "uzr_recorder", None)
    injector = getattr(module, "uzr_injector", None)
    edit = injector.attention_edit(module, query, key, attention_mask) if injector is not None else None
    if recorder is None and edit is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    bias = edit.bias if edit is not None else None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if recorder is not None:
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        output = _blocked_eager(module, query, key, value, attention_mask, scaling, recorder, bias,
                                kwargs.get("softcap"), window=window)
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            position_bias=None if bias is None else bias.to(query.dtype), **kwargs,
        )
    if edit is not None and edit.mix_probs is not None:
        output = _mix(output, value, edit, query.shape[1])
    return output, None


def register() -> str:
    """Register the attention function and its mask function (idempotent); returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, uzr_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def use_uzr_attention(model) -> None:
    """Switch a loaded model to the uzr attention function (identical to sdpa until hooks attach)."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [layer.self_attn for layer in layers]
