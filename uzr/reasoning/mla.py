"""Attention for the LRU/MLA ablation: multi-head attention and DeepSeek-V3 multi-head latent attention (MLA),
the latter with an optional latent reasoning unit on its KV latent, each with a KV cache for decoding.

MLA (DeepSeek-V3, as transformers' ``DeepseekV3Attention``): ``[c_kv; k_pe] = W_kv_a x``, ``c_kv`` normalised
(RMSNorm), ``[k_nope; v] = W_kv_b c_kv`` per head, ``k_pe`` (RoPE) shared by the heads; the query is full rank or
``W_q_b norm(W_q_a x)``; scores over ``[q_nope; q_pe] . [k_nope; k_pe]``. A cache need only hold ``c_kv``
and ``k_pe`` (:class:`LatentCache`), not per-head keys and values.

Why uzr's own module and not ``DeepseekV3Attention``: its cache holds the up-projected per-head keys and
values, not the latent, and the LRU must sit between ``kv_a_layernorm`` and ``kv_b_proj``, see the whole
sequence's latents with the padding mask and hand back its halting statistics and auxiliary losses — inside
transformers' forward that means replacing a submodule with one that returns through a side channel, relying on
its private calling conventions (DESIGN.md §10 rules that out). The layer names follow transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from uzr.reasoning.lru import LatentReasoningUnit, LRUOutput


def rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding of the last dim (even) of x (..., S, r) at positions (S,)."""
    r = x.shape[-1]
    if r == 0:
        return x
    inv = base ** (-torch.arange(0, r, 2, dtype=torch.float32, device=x.device) / r)  # (r/2,)
    ang = positions.to(torch.float32)[:, None] * inv  # (S, r/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attend(q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
    """Causal attention of S new queries after ``offset`` cached positions. q (B, H, S, dq), k (B, H, P+S, dq),
    v (B, H, P+S, dv) -> (B, S, H * dv). Right padding needs no key mask: a real position never sees it."""
    S, P = q.shape[2], k.shape[2]
    allowed = torch.ones(S, P, dtype=torch.bool, device=q.device).tril(P - S)  # (S, P): key j <= offset + i
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, S, dv)
    return out.transpose(1, 2).flatten(2)


@dataclass
class KVCache:
    """Per-head keys and values of the positions so far (multi-head attention)."""

    k: Tensor  # (B, H, P, dq)
    v: Tensor  # (B, H, P, dv)

    @property
    def length(self) -> int:
        return self.k.shape[2]


@dataclass
class LatentCache:
    """MLA's cache: the (refined) latent and the shared RoPE key, plus the LRU's window for its position mix."""

    c_kv: Tensor  # (B, P, kv_rank)
    k_pe: Tensor  # (B, P, rope_dim), rotated
    window: Tensor | None = None  # (T_max, B, k-1, kv_rank), LatentReasoningUnit.forward(past=...)

    @property
    def length(self) -> int:
        return self.c_kv.shape[1]


class MultiHeadAttention(nn.Module):
    """The baseline (group A): per-head ``head_dim + rope_dim`` query/key (RoPE on the last ``rope_dim``), ``head_dim`` value."""

    def __init__(self, d_model: int, heads: int, head_dim: int, rope_dim: int):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim = heads, head_dim, rope_dim
        self.q_proj = nn.Linear(d_model, heads * (head_dim + rope_dim), bias=False)
        self.k_proj = nn.Linear(d_model, heads * (head_dim + rope_dim), bias=False)
        self.v_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False) -> tuple[Tensor, KVCache | None, LRUOutput | None]:
        """x (B, S, d) -> (B, S, d), the cache extended (when asked), no LRU output."""
        B, S, _ = x.shape
        offset = cache.length if cache is not None else 0
        pos = torch.arange(offset, offset + S, device=x.device)
        q, k = (self._rope(p(x).view(B, S, self.heads, -1).transpose(1, 2), pos) for p in (self.q_proj, self.k_proj))
        v = self.v_proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, dv)
        if cache is not None:
            k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
        out = self.o_proj(attend(q, k, v, offset))
        return out, KVCache(k, v) if use_cache else None, None

    def _rope(self, t: Tensor, pos: Tensor) -> Tensor:
        return torch.cat([t[..., :self.head_dim], rope(t[..., self.head_dim:], pos)], -1)


class LatentAttention(nn.Module):
    """DeepSeek-V3 MLA (module docstring); ``lru``: a :class:`LatentReasoningUnit` refining ``c_kv`` (C, D) or None (B)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, rope_dim: int, kv_rank: int,
                 q_rank: int | None = None, lru: LatentReasoningUnit | None = None):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim, self.kv_rank = heads, head_dim, rope_dim, kv_rank
        qk = heads * (head_dim + rope_dim)
        if q_rank is None:
            self.q_proj = nn.Linear(d_model, qk, bias=False)
        else:
            self.q_proj = nn.Sequential(nn.Linear(d_model, q_rank, bias=False), nn.RMSNorm(q_rank),
                                        nn.Linear(q_rank, qk, bias=False))  # q_a_proj, q_a_layernorm, q_b_proj
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_rank + rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, heads * 2 * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)
        self.lru = lru
        self.use_lru = True  # False: the LRU is skipped (C and D then compute exactly what B computes)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: LatentCache | None = None,
                use_cache: bool = False) -> tuple[Tensor, LatentCache | None, LRUOutput | None]:
        """x (B, S, d), mask (B, S) real positions -> (B, S, d), the extended cache (when asked), the LRU's output."""
        B, S, _ = x.shape
        H, dh = self.heads, self.head_dim
        offset = cache.length if cache is not None else 0
        pos = torch.arange(offset, offset + S, device=x.device)
        q = self.q_proj(x).view(B, S, H, dh + self.rope_dim).transpose(1, 2)  # (B, H, S, dh + r)
        q = torch.cat([q[..., :dh], rope(q[..., dh:], pos)], -1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], -1)
        c_kv, k_pe = self.kv_a_layernorm(c_kv), rope(k_pe, pos)  # (B, S, kv_rank), (B, S, r)
        refined = window = None
        if self.lru is not None and self.use_lru:
            refined = self.lru(c_kv, mask, past=cache.window if cache is not None else None, keep_window=use_cache)
            c_kv, window = refined.output, refined.window
        if cache is not None:
            c_kv, k_pe = torch.cat([cache.c_kv, c_kv], 1), torch.cat([cache.k_pe, k_pe], 1)
        P = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, P, H, 2 * dh).transpose(1, 2).split(dh, -1)  # (B, H, P, dh) x2
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, P, self.rope_dim)], -1)
        out = self.o_proj(attend(q, k, v, offset))
        return out, LatentCache(c_kv, k_pe, window) if use_cache else None, refined

