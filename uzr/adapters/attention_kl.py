"""Attention distillation: ``KL(teacher rows || student rows)`` at chosen layers, computed inside the attention call.

An :class:`AttentionDistiller` is attached to the student's attention modules as their *observer* (the attention
function, :mod:`uzr.attention.function`, hands it each call's queries and keys before any edit): per block of query
rows it forms the student's own scores ``q k^T * scaling`` against the keys those rows may see, their log-softmax,
and the KL from the target rows, keeping the gradients (the full ``(S, S)`` map is never stored beyond one block's
rows and the autograd graph the loss needs). The call's output is not changed.

Targets (``{layer: (1|B, P, D, D)}`` probabilities, ``P`` = 1 for head-mean rows, the student's head count for
per-head rows after the store's head matching) cover the leading ``D`` positions; rows ``>= D`` are not read.
Each target row is restricted to the keys the student's mask allows (a sliding-window layer sees fewer keys than the
teacher's aligned row may cover) and renormalised; rows with no mass there (a dropped special token) are left out.
The loss of a layer is the mean KL over the (batch, head, row) entries with mass; :meth:`loss` is the mean over the
layers of the last forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import repeat_kv

from uzr.attention import attention_modules, causal_allowed, use_uzr_attention
from uzr.attention.layers import OBSERVER, attach_to_layers, detach_from_layers
from uzr.hooks import ModelEdit
from uzr.masks import masked_log_softmax

BLOCK_ROWS = 64  # query rows per block of the loss


def block_kl(student_logp: Tensor, target: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Summed ``KL(target || student)`` over rows and the number of rows with target mass.

    Args:
        student_logp: (B, P, r, k) log-probabilities of the student (P = 1: its head mean; else per head).
        target: (B|1, P, r, k) probabilities (any non-negative mass; renormalised over ``allowed`` keys).
        allowed: (B|1, 1, r, k) bool, the keys each row may see.
    Returns:
        (summed KL, rows counted), both 0-dim tensors.
    """
    target = torch.where(allowed, target.float(), torch.zeros((), device=target.device))
    mass = target.sum(-1, keepdim=True)  # (B, P, r, 1)
    has_mass = mass > 0
    target = torch.where(has_mass, target / mass.clamp_min(1e-30), target)
    # 0 log 0 = 0: keys without target mass contribute nothing (and no gradient)
    kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - student_logp), torch.zeros_like(target))
    return kl.sum(), has_mass.sum().to(kl.dtype)


class AttentionDistiller(ModelEdit):
    """The distillation term of one forward pass at ``targets``' layers (see the module docstring).

    Args:
        targets: ``{layer: (1|B, P, D, D)}`` target probabilities, P = 1 (head mean) or the student's heads.
        block_rows: query rows per block.
    """

    def __init__(self, targets: Mapping[int, Tensor], block_rows: int = BLOCK_ROWS):
        self.targets = dict(targets)
        self.block_rows = block_rows
        self.per_layer: dict[int, Tensor] = {}  # layer -> mean KL of the last forward pass (with gradients)
        self._modules: list[torch.nn.Module] = []

    def attach(self, model) -> AttentionDistiller:
        use_uzr_attention(model)
        modules = attention_modules(model)
        self._modules = [modules[layer] for layer in self.targets]
        attach_to_layers(OBSERVER, [(module, self) for module in self._modules])
        self.per_layer = {}
        return self

    def remove(self) -> None:
        detach_from_layers(OBSERVER, self._modules)
        self._modules = []

    def loss(self) -> Tensor:
        """Mean over the distilled layers of their mean row KL in the last forward pass (0-dim, with gradients)."""
        missing = sorted(set(self.targets) - set(self.per_layer))
        if missing:
            raise RuntimeError(f"attention distillation: layers {missing} were not run (is the distiller attached?)")
        return torch.stack([self.per_layer[layer] for layer in self.targets]).mean()

    def observe(self, module, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None,
                softcap: float | None) -> None:
        """Fold one attention call into the loss. ``query``: (B, H, q, Dh); ``key``: (B, H_kv, k, Dh)."""
        layer = module.layer_idx
        target = self.targets[layer]  # (1|B, P, D, D)
        q_len, k_len = query.shape[2], key.shape[2]
        if k_len != q_len:
            raise RuntimeError("attention distillation scores whole texts: run the model without a KV cache")
        rows = min(q_len, target.shape[-1])
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        keys = repeat_kv(key, query.shape[1] // key.shape[1])[:, :, :rows].float()  # (B, H, rows, Dh)
        allowed = causal_allowed(attention_mask, q_len, k_len, query.device)  # (B|1, 1, q, k)
        target = target.to(query.device)
        total, counted = query.new_zeros((), dtype=torch.float32), query.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, self.block_rows):
            stop = min(start + self.block_rows, rows)  # causal: rows < stop see no key >= stop
            scores = (query[:, :, start:stop].float() * scaling) @ keys[:, :, :stop].transpose(-1, -2)  # (B, H, r, k)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            ok = allowed[:, :, start:stop, :stop]  # (B|1, 1, r, k)
            logp = masked_log_softmax(scores, ok)  # (B, H, r, k)
            if target.shape[1] == 1 and logp.shape[1] > 1:  # head-mean target: the student's head-mean row
                logp = torch.logsumexp(logp, 1, keepdim=True) - torch.log(torch.tensor(float(logp.shape[1])))
            kl, n = block_kl(logp, target[..., start:stop, :stop], ok)
            total, counted = total + kl, counted + n
        self.per_layer[layer] = total / counted.clamp_min(1.0)
