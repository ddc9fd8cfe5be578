"""The one attention function uzr registers with transformers: sdpa, or a blocked float32 pass that records.

``AttentionInterface.register("uzr", uzr_attention)`` plus ``AttentionMaskInterface.register("uzr",
sdpa_mask)`` (without the second the function would get ``attention_mask=None`` and silently ignore
padding). A model switched to ``attn_implementation="uzr"`` behaves exactly like ``sdpa`` until an
attention module carries a recorder or an injector (see :mod:`uzr.attention`).

The blocked pass (:func:`_blocked_eager`) is built for long inputs:

- query rows are processed in blocks of at most ``LayerRecorder.block_size`` rows and at most
  ``LayerRecorder.max_block_elems`` scores, so memory grows linearly with the sequence length;
- each block only multiplies against the span of keys its rows may see (read from the mask once per
  mask and forward pass): a sliding-window layer costs ``O(S * window)``, a causal layer half of ``S^2``;
- grouped-query heads share their key/value head without ``repeat_kv``; keys and values are converted
  to float32 once per layer, never per block;
- the probabilities are never normalised into a separate tensor: ``e = exp(s - max)`` and ``1 / Z`` give
  the output (``e @ V / Z``) and whatever the reducers record (see :class:`~uzr.attention.reducers.ScoreBlock`);
- scores and ``e`` live in one reused scratch buffer; reducers preallocate their per-call results (the
  head-mean can be limited to the leading ``dist_rows`` query rows, so it does not grow with the length).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from uzr.attention.layers import INJECTOR, OBSERVER, RECORDER
from uzr.attention.reducers import ScoreBlock
from uzr.attention.stats import BlockGeometry

if TYPE_CHECKING:
    from uzr.attention.recorder import LayerRecorder

ATTN_IMPLEMENTATION = "uzr"
# Score given to disallowed keys: exp(MASKED - max) is exactly 0, and 0 * MASKED is 0 (no NaN), unlike -inf.
MASKED = torch.finfo(torch.float32).min


@dataclass
class AttentionEdit:
    """What the injector does to one layer call.

    ``bias``: (B, 1|H, q, k) added to the scores (mode ``bias``), or ``None``.
    ``mix_probs``/``mix_alpha``: (B, q, k) prior probabilities (or (B, H, q, k), one per head) and (B, q, 1|H)
    weights (one per head where only some heads are injected); the output
    becomes ``(1 - a) * out + a * (P_ctrl @ V)`` (mode ``mix``).
    """

    bias: torch.Tensor | None = None
    mix_probs: torch.Tensor | None = None
    mix_alpha: torch.Tensor | None = None



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
def _blocked_eager(module, query, key, value, attention_mask, scaling, recorder, bias, softcap, window=None):
    """Eager attention over query blocks in float32; every block goes through the recorder's reducers.

    Args:
        query: (B, H, q, D); key/value: (B, H_kv, k, D) (not repeated for GQA).
        attention_mask: bool (B|1, 1, q, k) (True = attend) or None (causal; all keys for ``q = 1``).
        recorder: the layer's :class:`LayerRecorder`.
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
    recorder._begin(batch, heads, q_len, k_len, query.device)
    bad_rows = torch.zeros((), dtype=torch.long, device=query.device)
    rows = _rows_per_block(recorder, heads, q_len, k_len, window)
    for blk in _plan(attention_mask, q_len, k_len, rows, causal):
        n = blk.stop - blk.start
        width = blk.hi - blk.lo
        q_first = blk.start + offset
        if width <= 0:  # every row is padding: zero output, reducers keep their zero rows
            out[:, blk.start:blk.stop] = 0
            continue
        q_blk = (query[:, :, blk.start:blk.stop].float() * scaling).reshape(batch, kv_heads, n_rep * n, -1)
        size = batch * heads * n * width
        buffers = _workspace(2 * size, query.device)
        scores = buffers[:size].view(batch, kv_heads, n_rep * n, width)
        torch.matmul(q_blk, keys[:, :, blk.lo:blk.hi].transpose(-1, -2), out=scores)
        scores = scores.view(batch, heads, n, width)  # (B, H, n, w)
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
            n_keys = torch.arange(q_first + 1 - blk.lo, q_first + 1 - blk.lo + n, device=query.device)  # (n,)
        else:
            n_keys = torch.full((n,), width, device=query.device)  # (n,)
        n_keys = n_keys.float().expand(batch, heads, n)  # (B, H, n)
        scores.sub_(scores.amax(-1, keepdim=True))  # t = s - max
        # a row is finite iff every t is: NaN and +inf scores give NaN, -inf (or overflow) gives -inf
        finite = torch.isfinite(scores.amin(-1))  # (B, H, n)
        e = torch.exp(scores, out=buffers[size:2 * size].view(batch, heads, n, width))  # (B, H, n, w)
        z = e @ torch.ones(width, device=query.device)  # (B, H, n)
        real = n_keys > 0
        valid = real & finite
        inv_z = torch.where(valid, 1.0 / z, torch.zeros_like(z))  # (B, H, n)
        bad = real & ~finite
        any_bad = bool(bad.any())  # the block's one host sync
        if any_bad:
            bad_rows += bad.sum()
            e.masked_fill_(bad[..., None], 0.0)  # no reducer and no output sees their NaN
        block = ScoreBlock(blk.start, blk.stop, blk.lo, blk.hi, q_first, blk.future, scores, e, z, inv_z,
                           n_keys, valid, bad)
        for reducer in recorder.reducers:
            reducer.add(block)
        o = torch.matmul(e.view(batch, kv_heads, n_rep * n, width), values[:, :, blk.lo:blk.hi])
        o = o.view(batch, heads, n, d_v).mul_(inv_z[..., None])  # (B, H, n, D)
        if any_bad:
            o.masked_fill_(bad[..., None], 0.0)  # NaN rows -> 0 (also if V is not finite)
        out[:, blk.start:blk.stop] = o.transpose(1, 2)
    recorder._end(bad_rows)
    return out


def _mix(output, value, edit: AttentionEdit, n_heads: int):
    """(1 - a) * output + a * (P_ctrl @ V), with P_ctrl (B, q, k) shared by all heads or (B, H, q, k) per head."""
    value = repeat_kv(value, n_heads // value.shape[1])  # (B, H, k, D)
    heads = "bhqk" if edit.mix_probs.dim() == 4 else "bqk"
    ctrl = torch.einsum(f"{heads},bhkd->bqhd", edit.mix_probs.to(value.dtype), value)  # (B, q, H, D)
    a = edit.mix_alpha.to(output.dtype)[..., None]  # (B, q, 1|H, 1)
    return (1 - a) * output + a * ctrl


def uzr_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: sdpa, plus uzr's recorder and injector when attached, and an observer
    (``observe(module, query, key, attention_mask, scaling, softcap)``, e.g. the attention-distillation loss of
    :mod:`uzr.adapters.attention_kl`) that reads the call without changing it.

    Args:
        query: (B, H, q, D); key/value: (B, H_kv, k, D), KV cache included, not yet repeated for GQA.
        attention_mask: bool (B, 1, q, k) from ``sdpa_mask`` (True = attend) or None (plain causal).
    Returns:
        (output (B, q, H, D), None)
    """
    observer = getattr(module, OBSERVER, None)
    if observer is not None:  # reads the student's own scores (before any edit), keeping their gradients
        observer.observe(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    recorder: LayerRecorder | None = getattr(module, RECORDER, None)
    injector = getattr(module, INJECTOR, None)
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
