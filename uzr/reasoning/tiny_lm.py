"""The small decoder the LRU/MLA ablation trains from scratch, one per group, at matched parameter counts.

Pre-norm blocks (RMSNorm, attention, RMSNorm, GELU MLP), tied input/output embeddings. The groups differ only
in the attention (:mod:`uzr.reasoning.mla`) and the MLP width, which :func:`matched_widths` solves for so
that every group has the parameter count of the largest at ``ffn_mult * d_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from uzr.config.lru_mla import GROUPS, LRUMLASpec
from uzr.reasoning.lru import LatentReasoningUnit, LRUOutput
from uzr.reasoning.mla import LatentAttention, MultiHeadAttention


@dataclass(frozen=True)
class Shape:
    group: str
    vocab: int
    ffn: int  # MLP width


class LMOutput(NamedTuple):
    logits: Tensor  # (B, S, V)
    aux: Tensor  # scalar: the LRUs' weighted auxiliary losses, summed over layers (0 without an LRU)
    refined: list[LRUOutput]  # one per layer with an LRU
    cache: list | None  # per layer, when asked


def make_lru(spec: LRUMLASpec, group: str) -> LatentReasoningUnit | None:
    if group not in ("mla_lru_fixed", "mla_lru_act"):
        return None
    weights = {"stability": spec.stability_weight, "sparsity": spec.sparsity_weight, "ponder": spec.ponder_weight}
    return LatentReasoningUnit(spec.kv_rank, max_steps=spec.max_steps, mode="act" if group == "mla_lru_act" else "fixed",
                               threshold=spec.threshold, mix_kernel=spec.mix_kernel, aux_weights=weights,
                               halt_bias=spec.halt_bias_init)


class Block(nn.Module):
    def __init__(self, spec: LRUMLASpec, group: str, ffn: int):
        super().__init__()
        d = spec.d_model
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        if group == "baseline":
            self.attn = MultiHeadAttention(d, spec.heads, spec.head_dim, spec.rope_dim)
        else:
            self.attn = LatentAttention(d, spec.heads, spec.head_dim, spec.rope_dim, spec.kv_rank, spec.q_rank,
                                        make_lru(spec, group))
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: Tensor, mask: Tensor | None, cache, use_cache: bool):
        a, cache, refined = self.attn(self.norm1(x), mask, cache, use_cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache, refined


class TinyLM(nn.Module):
    """``forward(ids, mask, cache=None, use_cache=False)``: ids (B, S) -> :class:`LMOutput`."""

    def __init__(self, spec: LRUMLASpec, shape: Shape):
        super().__init__()
        if shape.group not in GROUPS:
            raise ValueError(f"group {shape.group!r} is invalid; valid: {', '.join(GROUPS)}")
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec, shape.group, shape.ffn) for _ in range(spec.layers))
        self.norm = nn.RMSNorm(spec.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor | None = None, cache: list | None = None,
                use_cache: bool = False) -> LMOutput:
        x = self.embed(ids)  # (B, S, d)
        new_cache, refined = [], []
        for i, block in enumerate(self.blocks):
            x, c, r = block(x, mask, cache[i] if cache is not None else None, use_cache)
            new_cache.append(c)
            if r is not None:
                refined.append(r)
        logits = self.norm(x) @ self.embed.weight.T  # (B, S, V), tied
        aux = sum((r.aux["total"] for r in refined), x.new_zeros(()))
        return LMOutput(logits, aux, refined, new_cache if use_cache else None)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_widths(spec: LRUMLASpec, vocab: int) -> dict[str, tuple[int, int]]:
    """``{group: (ffn, parameters)}`` for every group of :data:`GROUPS` (not only the selected ones, so a
    subset builds the same models): the largest group at ``ffn_mult * d_model``; the others' MLP widened to
    match it within ``match_tolerance``."""
    base = max(1, round(spec.ffn_mult * spec.d_model))
    count = {g: (lambda f, g=g: num_parameters(TinyLM(spec, Shape(g, vocab, f)))) for g in GROUPS}
    target = max(count[g](base) for g in GROUPS)
    out = {}
    for g in GROUPS:
        p1, p2 = count[g](1), count[g](2)  # parameters are linear in the width
        ffn = max(1, round(1 + (target - p1) / (p2 - p1)))
        out[g] = (ffn, count[g](ffn))
        if abs(out[g][1] - target) > spec.match_tolerance * target:
            raise ValueError(f"lru_mla: group {g} has {out[g][1]} parameters at MLP width {ffn}, more than "
                             f"lru_mla.match_tolerance={spec.match_tolerance} from {target}; raise lru_mla.ffn_mult")
    return out


def build(spec: LRUMLASpec, group: str, vocab: int, seed: int) -> TinyLM:
    """The group's model at its matched width, initialised from ``seed``."""
    ffn, _ = matched_widths(spec, vocab)[group]
    torch.manual_seed(seed)
    return TinyLM(spec, Shape(group, vocab, ffn))
