"""Masks shared by every system: which (query, key) pairs may attend, softmax and entropy over them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Log-prob given to disallowed keys: finite (so 0 * it is 0, never NaN) yet exp() of it is exactly 0
# in float32, and it stays representable in float16 for an additive attention bias.
MASKED_LOGPROB = -1.0e4

def causal_mask(mask: Tensor) -> Tensor:
    """Allowed (query, key) pairs: ``j <= i`` and both real tokens.

    mask: (B, S) bool, True = real token. Returns (B, S, S) bool.
    """
    mask = mask.bool()
    S = mask.shape[-1]
    tril = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()  # (S, S)
    return tril & mask[:, :, None] & mask[:, None, :]  # (B, S, S)


def allowed_pairs(mask: Tensor) -> Tensor:
    """(B, S) token mask -> causal (B, S, S); a (B, Sq, Sk) mask is taken as already allowed-pairs."""
    return causal_mask(mask) if mask.dim() == 2 else mask.bool()


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over allowed keys only.

    logits: (B, Sq, Sk); mask: (B, Sq, Sk) bool, True = allowed. Returns (B, Sq, Sk) float32 log-probs;
    disallowed entries are ``MASKED_LOGPROB`` (their exp is exactly 0), and a fully masked row (padding)
    is all ``MASKED_LOGPROB`` — finite, no NaN, probabilities all 0.
    """
    x = logits.float().masked_fill(~mask, MASKED_LOGPROB)  # (B, Sq, Sk)
    return torch.log_softmax(x, dim=-1).masked_fill(~mask, MASKED_LOGPROB)


def pad_sequences(seqs: Sequence, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``(B, S)`` ids and a ``(B, S)`` bool mask of real tokens."""
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, True
    return ids, mask


def normalised_entropy(entropy: torch.Tensor, n_keys: torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum ``log n`` over a row's ``n`` allowed keys: in [0, 1], and 0 for a
    row with at most one key. entropy: (...) nats; n_keys: (...) key counts (broadcastable)."""
    n = n_keys.float()
    return torch.where(n > 1, entropy / n.clamp(min=2).log(), torch.zeros_like(entropy))
