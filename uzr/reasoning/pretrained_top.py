"""The trained top of a pretrained Llama-layout student for the pretrained LRU/MLA ablation (issue 27).

:class:`PretrainedTop` holds copies of the student's last ``top_layers`` decoder layers (pre-norm, attention,
SwiGLU MLP), its final norm and a frozen reference to its tied output embedding. It reads the frozen lower
layers' output (:mod:`uzr.reasoning.prefix`) and gives the model's hidden states and logits, so a training step
runs only the top. Groups:

- ``baseline`` (A): the layers as they are (:class:`~uzr.reasoning.mla_convert.GroupedQueryAttention`);
- ``mla`` (B): their attention converted to MLA (:class:`~uzr.reasoning.mla_convert.ConvertedLatentAttention`);
- ``mla_lru_fixed`` (C) / ``mla_lru_act`` (D): B with the latent reasoning unit on ``c_kv``, fixed iterations or
  ACT halting (zero-initialised residual: they start as B).

Every parameter of the top is trained; the lower layers and the output embedding stay frozen. Why uzr's own
layers and not transformers' ``LlamaDecoderLayer``: the LRU sits inside the attention between the latent's down-
and up-projection and returns halting statistics, which a transformers layer has no place for (DESIGN.md §10:
no private calling conventions); ``tests/test_lru_mla_pretrained.py`` checks that the copy reproduces the student.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from uzr.attention import decoder_of
from uzr.config.lru_mla import LRUMLASpec
from uzr.reasoning.lru import LatentReasoningUnit, LRUOutput
from uzr.reasoning.mla_convert import ConvertedLatentAttention, GroupedQueryAttention, LatentRefiner


class TopOutput(NamedTuple):
    hidden: Tensor  # (B, S, d) after the final norm
    aux: Tensor  # scalar: the LRUs' weighted auxiliary losses (0 without an LRU)
    refined: list[LRUOutput]  # one per layer with an LRU


class TopLayer(nn.Module):
    """One pre-norm decoder layer (Llama layout) with a replaceable ``self_attn``."""

    def __init__(self, d_model: int, ffn: int, attn: nn.Module, eps: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model, eps=eps)
        self.self_attn = attn
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=eps)
        self.gate_proj = nn.Linear(d_model, ffn, bias=False)
        self.up_proj = nn.Linear(d_model, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, LRUOutput | None]:
        a, refined = self.self_attn(self.input_layernorm(x), mask)
        x = x + a
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), refined


class PretrainedTop(nn.Module):
    """``forward(hidden, mask)``: the lower layers' output (B, S, d) -> :class:`TopOutput`; :meth:`logits` maps
    final hidden states (..., d) to the vocabulary through the frozen tied embedding."""

    def __init__(self, layers: list[TopLayer], d_model: int, eps: float, embedding: Tensor):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.register_buffer("embedding", embedding.detach(), persistent=False)  # (V, d), frozen, not saved

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> TopOutput:
        refined = []
        for layer in self.layers:
            hidden, r = layer(hidden, mask)
            if r is not None:
                refined.append(r)
        aux = sum((r.aux["total"] for r in refined), hidden.new_zeros(()))
        return TopOutput(self.norm(hidden), aux, refined)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.embedding.T

    def latent_attentions(self) -> list[ConvertedLatentAttention]:
        return [la.self_attn for la in self.layers if isinstance(la.self_attn, ConvertedLatentAttention)]


def copy_top(model, top_layers: int) -> PretrainedTop:
    """A :class:`PretrainedTop` with copies of the last ``top_layers`` layers of a Llama-layout causal LM (group A)."""
    cfg = model.config
    decoder = decoder_of(model)
    if not 1 <= top_layers <= len(decoder.layers):
        raise ValueError(f"top_layers={top_layers} is invalid: 1 to the model's {len(decoder.layers)} layers")
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for source in decoder.layers[len(decoder.layers) - top_layers:]:
        attn = GroupedQueryAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, theta)
        layer = TopLayer(cfg.hidden_size, cfg.intermediate_size, attn, cfg.rms_norm_eps)
        state = {k: v for k, v in source.state_dict().items()}
        layer.load_state_dict({k.replace("mlp.", ""): v.detach().clone().float() for k, v in state.items()})
        layers.append(layer)
    top = PretrainedTop(layers, cfg.hidden_size, cfg.rms_norm_eps, model.get_input_embeddings().weight)
    top.norm.weight.data.copy_(decoder.norm.weight.detach())
    return top


def convert_top(top: PretrainedTop, rank: int, rope_pairs: int) -> PretrainedTop:
    """Group B from group A: every layer's attention converted to MLA at latent ``rank`` (in place; returns top)."""
    for layer in top.layers:
        layer.self_attn = ConvertedLatentAttention(layer.self_attn, rank, rope_pairs)
    return top


def make_lru(spec: LRUMLASpec, group: str) -> LatentReasoningUnit:
    weights = {"stability": spec.stability_weight, "sparsity": spec.sparsity_weight, "ponder": spec.ponder_weight}
    return LatentReasoningUnit(spec.pretrained.latent_rank, max_steps=spec.max_steps,
                               mode="act" if group == "mla_lru_act" else "fixed", threshold=spec.threshold,
                               mix_kernel=spec.mix_kernel, aux_weights=weights, halt_bias=spec.halt_bias_init)


def group_top(model, spec: LRUMLASpec, group: str, seed: int) -> PretrainedTop:
    """The trainable top of ``group`` built from the pretrained ``model`` (the LRU initialised from ``seed``)."""
    p = spec.pretrained
    top = copy_top(model, p.top_layers)
    if group == "baseline":
        return top
    convert_top(top, p.latent_rank, p.rope_pairs)
    if group in ("mla_lru_fixed", "mla_lru_act"):
        torch.manual_seed(seed)
        for attn in top.latent_attentions():
            attn.refiner = LatentRefiner(make_lru(spec, group))
    return top


def trainable_parameters(top: nn.Module) -> int:
    return sum(p.numel() for p in top.parameters() if p.requires_grad)


def set_exit(top: PretrainedTop, mode: str, exit_tol: float) -> None:
    """Switch every LRU's halting (``act`` | ``fixed`` | ``latent`` | ``kl``) and exit tolerance, e.g. Huginn's
    training-free KL exit at inference (``kl``, 1e-3)."""
    for attn in top.latent_attentions():
        if attn.refiner is not None:
            attn.refiner.lru.mode, attn.refiner.lru.exit_tol = mode, exit_tol
