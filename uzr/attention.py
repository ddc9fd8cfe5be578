"""The one attention function uzr registers with transformers, and the per-layer objects it consults.

``AttentionInterface.register("uzr", uzr_attention)`` plus ``AttentionMaskInterface.register("uzr",
sdpa_mask)`` (without the second the function would get ``attention_mask=None`` and silently ignore
padding). A model switched to ``attn_implementation="uzr"`` behaves exactly like ``sdpa`` until an
attention module carries one of these attributes:

- ``module.uzr_recorder``: a :class:`LayerRecorder`; the layer then runs blocked eager attention in
  float32 and hands each block of probabilities to the recorder (statistics, head-mean rows) without
  ever materialising all layers' ``(B, H, S, S)`` weights;
- ``module.uzr_injector``: an object with ``attention_edit(module, query, key, mask)`` returning an
  :class:`AttentionEdit` (additive log-prior or probability mix), or ``None`` to leave the layer alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from uzr.harvest.stats import BlockGeometry, attention_stats

ATTN_IMPLEMENTATION = "uzr"


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

    ``stats[name]``: list of (B, H, q_block) float32 tensors, concatenated by :meth:`result`.
    ``head_mean``: list of (B, q_block, k) float32 blocks when ``keep_head_mean``.
    """

    window: int = 8
    keep_head_mean: bool = False
    block_size: int = 256
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    head_mean: list[torch.Tensor] = field(default_factory=list)
    nonfinite_rows: int = 0

    def add(self, probs: torch.Tensor, allowed: torch.Tensor, geometry: BlockGeometry) -> None:
        for name, value in attention_stats(probs, allowed, geometry, self.window).items():
            self.stats.setdefault(name, []).append(value)
        if self.keep_head_mean:
            self.head_mean.append(probs.mean(1))  # (B, q, k)

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Returns ({name: (B, H, S)}, head-mean (B, S, S) or None) and clears the recorder."""
        stats = {name: torch.cat(parts, -1) for name, parts in self.stats.items()}
        head_mean = torch.cat(self.head_mean, 1) if self.head_mean else None
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


def _blocked_eager(module, query, key, value, allowed, scaling, recorder, bias, softcap):
    """Eager attention over query blocks in float32; memory grows linearly with the sequence length."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (B, H, k, D)
    q_len, k_len = query.shape[2], key.shape[2]
    keys_t = key.float().transpose(-1, -2)  # (B, H, D, k)
    outputs = []
    for start in range(0, q_len, recorder.block_size):
        stop = min(start + recorder.block_size, q_len)
        scores = (query[:, :, start:stop].float() @ keys_t) * scaling  # (B, H, q_blk, k)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + bias[:, :, start:stop].float()
        block_allowed = allowed[:, :, start:stop]  # (B|1, 1, q_blk, k)
        scores = scores.masked_fill(~block_allowed, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
        geometry = BlockGeometry.for_block(start, stop, q_len, k_len, query.device)
        recorder.add(probs, block_allowed, geometry)
        outputs.append(probs.to(value.dtype) @ value)  # (B, H, q_blk, D)
    return torch.cat(outputs, 2).transpose(1, 2).contiguous()  # (B, q, H, D)


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
        allowed = causal_allowed(attention_mask, query.shape[2], key.shape[2], query.device)
        output = _blocked_eager(module, query, key, value, allowed, scaling, recorder, bias, kwargs.get("softcap"))
        output = output.to(query.dtype)
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
