"""Attention statistics of one block of query rows, computed in float32 from causal probabilities.

Definitions (DESIGN.md §4), for query ``i`` with weights ``p_ij`` over its allowed keys:

- entropy ``H_i = -sum_j p_ij log p_ij`` in nats;
- normalised entropy ``H_i / log(n_i)`` where ``n_i`` is the number of keys the query may attend to
  (``i + 1`` for a plain causal row; fewer with left padding or a sliding window); 0 when ``n_i = 1``;
- locality: the mass on the last ``window`` positions, ``sum_{i - j < window} p_ij``;
- mean distance ``sum_j p_ij (i - j)`` in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_NAMES = ("entropy", "norm_entropy", "locality", "mean_distance")


@dataclass
class BlockGeometry:
    """Absolute positions of a block of queries against all keys (KV cache included)."""

    q_pos: torch.Tensor  # (q,) long: absolute index of each query in the key sequence
    k_pos: torch.Tensor  # (k,) long

    @classmethod
    def for_block(cls, start: int, stop: int, q_len: int, k_len: int, device) -> BlockGeometry:
        offset = k_len - q_len  # queries are the last q_len positions of the key sequence
        return cls(
            torch.arange(start + offset, stop + offset, device=device),
            torch.arange(k_len, device=device),
        )

    def distance(self) -> torch.Tensor:
        return (self.q_pos[:, None] - self.k_pos[None, :]).float()  # (q, k)


def attention_stats(
    probs: torch.Tensor, allowed: torch.Tensor, geometry: BlockGeometry, window: int
) -> dict[str, torch.Tensor]:
    """Statistics of attention rows.

    Args:
        probs: (..., q, k) float32 probabilities, zero where not allowed.
        allowed: (..., q, k) bool, broadcastable to ``probs``: keys each query may attend to.
        geometry: query/key positions of the block.
        window: locality window ``w`` in tokens.

    Returns:
        dict of (..., q) float32 tensors named as in ``STAT_NAMES``.
    """
    probs = probs.float()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (..., q)
    n_keys = allowed.sum(-1).expand(entropy.shape).float()  # (..., q)
    log_n = torch.log(n_keys.clamp(min=1))
    norm_entropy = torch.where(n_keys > 1, entropy / log_n.clamp(min=1e-12), torch.zeros_like(entropy))
    distance = geometry.distance()  # (q, k)
    local = (distance < window) & (distance >= 0)  # (q, k)
    locality = (probs * local).sum(-1)
    mean_distance = (probs * distance.clamp(min=0)).sum(-1)
    return {
        "entropy": entropy,
        "norm_entropy": norm_entropy,
        "locality": locality,
        "mean_distance": mean_distance,
    }


def distribution_stats(probs: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Statistics of full causal distributions on one grid (e.g. head-mean or aligned teacher rows).

    Args:
        probs: (..., S, S) rows that sum to 1 over ``j <= i`` (zero rows allowed for padding).
        window: locality window in tokens.

    Returns:
        dict of (..., S) float32 tensors, keys as in ``STAT_NAMES``; keys allowed = ``j <= i``.
    """
    s = probs.shape[-1]
    geometry = BlockGeometry.for_block(0, s, s, s, probs.device)
    allowed = torch.ones(s, s, dtype=torch.bool, device=probs.device).tril()
    return attention_stats(probs.float(), allowed, geometry, window)
