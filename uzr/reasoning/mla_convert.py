"""A pretrained grouped-query attention layer turned into multi-head latent attention (MLA), from its own weights.

The recipe (TransMLA's GQA-to-MLA equivalence, arXiv 2502.07864 §3, with MHA2MLA's joint SVD and kept
high-frequency RoPE dimensions, arXiv 2502.14837):

- Keys and values of every KV head come from one latent: ``c_kv = W_down x`` (B, S, r), ``[k_rest; v] = W_up c_kv``.
  ``W_down``, ``W_up`` are the truncated SVD of the stacked map ``W = [W_k_rest; W_v]`` (rows: the key dims not
  kept, then the value dims, of every KV head), ``W ~ U_r S_r V_r^T``, split as ``W_up = U_r S_r^½``,
  ``W_down = S_r^½ V_r^T`` (equal scales on both sides, so that the latent the LRU refines is neither tiny nor huge).
- RoPE stays where the model had it, on every key dim, applied *after* the up-projection (TransMLA's first step: a
  GQA layer is an MLA layer whose latent is its stacked pre-RoPE keys and values). This is what makes the full rank
  reproduce the layer exactly; DeepSeek's decoupled RoPE (absorbing ``W_up`` into the query) would need RoPE
  removed from the compressed dims, which changes the pretrained function before any training (MHA2MLA's
  partial-RoPE step, recovered there by fine-tuning on billions of tokens, which a CPU run cannot afford).
- ``rope_pairs`` frequency pairs per KV head (the highest, MHA2MLA's ``S_high``; pair ``j`` is dims ``j`` and
  ``j + head_dim/2``) bypass the latent: ``k_pe = W_k_pe x``, as DeepSeek's ``k_pe`` beside ``c_kv``.

The layer caches ``c_kv`` and ``k_pe`` instead of per-head keys and values. An optional :class:`LatentRefiner`
iterates the latent reasoning unit on ``c_kv`` between the down- and the up-projection (groups C, D).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from uzr.reasoning.lru import LatentReasoningUnit, LRUOutput
from uzr.reasoning.mla import rope


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention with grouped KV heads. q (B, H, S, d), k/v (B, Hkv, S, d) -> (B, S, H * d). Right padding
    needs no key mask (a real position never sees a later one)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # query head h reads KV head h // groups
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class GroupedQueryAttention(nn.Module):
    """The pretrained attention as is (group A): GQA with RoPE on every query/key dim (Llama's layout)."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, rope_theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rope_theta = heads, kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)

    def heads_of(self, t: Tensor, n: int) -> Tensor:
        """(B, S, n * head_dim) -> (B, n, S, head_dim)."""
        return t.view(*t.shape[:2], n, self.head_dim).transpose(1, 2)

    def query(self, x: Tensor, pos: Tensor) -> Tensor:
        return rope(self.heads_of(self.q_proj(x), self.heads), pos, self.rope_theta)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, LRUOutput | None]:
        """x (B, S, d) -> (B, S, d), no LRU output."""
        pos = torch.arange(x.shape[1], device=x.device)
        k = rope(self.heads_of(self.k_proj(x), self.kv_heads), pos, self.rope_theta)
        v = self.heads_of(self.v_proj(x), self.kv_heads)
        return self.o_proj(causal_attention(self.query(x, pos), k, v)), None


class LatentRefiner(nn.Module):
    """The LRU on a pretrained latent, as a zero-initialised residual: ``c + gate * LRU(RMSNorm(c))``, ``gate``
    (r,) starting at 0 so that C and D start as B (the LRU's LayerNorm'd output has no scale of the latent's)."""

    def __init__(self, lru: LatentReasoningUnit):
        super().__init__()
        self.lru = lru
        self.norm = nn.RMSNorm(lru.dim)
        self.gate = nn.Parameter(torch.zeros(lru.dim))

    def forward(self, c: Tensor, mask: Tensor | None) -> tuple[Tensor, LRUOutput]:
        """c (B, S, r) -> the refined latent (B, S, r) and the LRU's output."""
        out = self.lru(self.norm(c), mask)
        return c + self.gate * out.output, out


class ConvertedLatentAttention(GroupedQueryAttention):
    """MLA made from a :class:`GroupedQueryAttention` (module docstring); ``k_proj``/``v_proj`` replaced by
    ``k_pe_proj`` (kept RoPE pairs), ``kv_down`` (d -> r) and ``kv_up`` (r -> the other key dims and the values)."""

    def __init__(self, source: GroupedQueryAttention, rank: int, rope_pairs: int):
        nn.Module.__init__(self)
        self.heads, self.kv_heads, self.head_dim = source.heads, source.kv_heads, source.head_dim
        self.rope_theta, self.rank, self.rope_pairs = source.rope_theta, rank, rope_pairs
        hd, half = source.head_dim, source.head_dim // 2
        if not 0 <= rope_pairs <= half:
            raise ValueError(f"rope_pairs={rope_pairs} is invalid: 0 to head_dim / 2 = {half}")
        kept = [*range(rope_pairs), *range(half, half + rope_pairs)]
        rest = [i for i in range(hd) if i not in kept]
        # kept dims first, then the rest: ``order`` puts a head's key back into its original dim order
        self.register_buffer("order", torch.argsort(torch.tensor(kept + rest)), persistent=False)
        self.n_kept, self.n_rest = len(kept), len(rest)
        full = self.kv_heads * (len(rest) + hd)
        wk = source.k_proj.weight.detach().view(self.kv_heads, hd, -1)  # (Hkv, hd, d)
        d_model = wk.shape[-1]
        if not 1 <= rank <= min(full, d_model):
            raise ValueError(f"latent rank {rank} is invalid: 1 to {min(full, d_model)} (the stacked K/V map's rank)")
        self.q_proj, self.o_proj = source.q_proj, source.o_proj
        self.k_pe_proj = nn.Linear(d_model, self.kv_heads * len(kept), bias=False)
        self.k_pe_proj.weight.data.copy_(wk[:, kept].reshape(-1, d_model))
        stacked = torch.cat([wk[:, rest].reshape(-1, d_model), source.v_proj.weight.detach()])  # (full, d)
        u, s, vh = torch.linalg.svd(stacked.double(), full_matrices=False)
        root = s[:rank].sqrt()
        self.kv_down = nn.Linear(d_model, rank, bias=False)
        self.kv_up = nn.Linear(rank, full, bias=False)
        self.kv_down.weight.data.copy_((root[:, None] * vh[:rank]).to(stacked.dtype))
        self.kv_up.weight.data.copy_((u[:, :rank] * root).to(stacked.dtype))
        self.refiner: LatentRefiner | None = None

    def latent(self, x: Tensor) -> Tensor:
        """c_kv: (B, S, d) -> (B, S, r)."""
        return self.kv_down(x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, LRUOutput | None]:
        """x (B, S, d), mask (B, S) real positions -> (B, S, d) and the LRU's output (None without a refiner)."""
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device)
        c = self.latent(x)
        refined = None
        if self.refiner is not None:
            c, refined = self.refiner(c, mask)
        up = self.kv_up(c)  # (B, S, Hkv * (n_rest + hd))
        k_rest = up[..., :self.kv_heads * self.n_rest].view(B, S, self.kv_heads, self.n_rest)
        k_pe = self.k_pe_proj(x).view(B, S, self.kv_heads, self.n_kept)
        k = torch.cat([k_pe, k_rest], -1)[..., self.order].transpose(1, 2)  # (B, Hkv, S, hd), original dim order
        v = self.heads_of(up[..., self.kv_heads * self.n_rest:], self.kv_heads)
        k = rope(k, pos, self.rope_theta)
        return self.o_proj(causal_attention(self.query(x, pos), k, v)), refined


def full_rank(attn: GroupedQueryAttention, rope_pairs: int) -> int:
    """The latent rank at which the conversion is exact: the stacked K/V rows (or d_model if fewer)."""
    rows = attn.kv_heads * (2 * attn.head_dim - 2 * rope_pairs)
    return min(rows, attn.q_proj.in_features)
