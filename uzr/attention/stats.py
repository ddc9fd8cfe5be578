"""Attention statistics of blocks of query rows, computed in float32.

Definitions (DESIGN.md §4), for query ``i`` with weights ``p_ij`` over its allowed keys:

- entropy ``H_i = -sum_j p_ij log p_ij`` in nats;
- normalised entropy ``H_i / log(n_i)`` where ``n_i`` is the number of keys the query may attend to
  (``i + 1`` for a plain causal row; fewer with left padding or a sliding window); 0 when ``n_i = 1``;
- locality: the mass on the last ``window`` positions, ``sum_{0 <= i - j < window} p_ij``;
- mean distance ``sum_j p_ij max(i - j, 0)`` in tokens.

Two ways in:

- :func:`attention_stats` / :func:`distribution_stats` from probabilities (the reference definitions,
  used for head-mean or aligned distributions);
- :func:`score_block_stats` from the exponentiated, max-shifted scores of one block inside the
  attention function (via the :class:`~uzr.attention.reducers.HabitStats` reducer). It never forms the
  probabilities: ``H_i = log Z_i - sum_j e_ij t_ij / Z_i``
  (``t = s - max s``, ``e = exp t``, ``Z = sum e``), the distance sum is one matrix-vector product and
  locality reads only the ``window`` diagonals next to the query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uzr.masks import normalised_entropy

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
    norm_entropy = normalised_entropy(entropy, n_keys)
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


def _diagonal_band_sum(e: torch.Tensor, base: int, window: int) -> torch.Tensor:
    """``sum_{d < window} e[..., i, i + base - d]`` for every row ``i`` (columns outside ``e`` count 0).

    ``e``: (..., q, k) contiguous. Reads only ``window`` diagonals: a strided view when the whole band lies
    inside the block, otherwise one diagonal at a time.
    """
    rows, cols = e.shape[-2], e.shape[-1]
    first = base - window + 1  # column of the band's left edge in row 0
    if e.is_contiguous() and first >= 0 and rows - 1 + base <= cols - 1:
        size = (*e.shape[:-2], rows, window)
        stride = (*e.stride()[:-2], cols + 1, 1)
        return e.as_strided(size, stride, e.storage_offset() + first).sum(-1)
    out = e.new_zeros(e.shape[:-1])
    for d in range(window):
        offset = base - d
        diag = torch.diagonal(e, offset=offset, dim1=-2, dim2=-1)  # (..., n)
        if diag.shape[-1] == 0:
            continue
        row0 = max(-offset, 0)
        out[..., row0:row0 + diag.shape[-1]] += diag
    return out


def score_block_stats(
    t: torch.Tensor,
    e: torch.Tensor,
    z: torch.Tensor,
    inv_z: torch.Tensor,
    valid: torch.Tensor,
    bad: torch.Tensor,
    n_keys: torch.Tensor,
    q_first: int,
    k_first: int,
    window: int,
    future: torch.Tensor | None = None,
) -> torch.Tensor:
    """Statistics of one block of attention rows from shifted scores, without forming probabilities.

    Args:
        t: (B, H, q, k) float32 scores minus their row maximum (disallowed keys hugely negative).
        e: (B, H, q, k) ``exp(t)``: 0 at disallowed keys; contiguous.
        z: (B, H, q) row sums of ``e``; ``inv_z``: (B, H, q) ``1 / z`` on valid rows, 0 elsewhere.
        valid: (B, H, q) bool: rows with allowed keys and finite scores; ``bad``: rows with allowed keys
            and a non-finite score (NaN, inf).
        n_keys: (B, H, q) float32 number of allowed keys per row (0 for padding rows).
        q_first: absolute position of the block's first query; queries are consecutive.
        k_first: absolute position of the block's first key (column 0 of ``t``/``e``); keys are consecutive.
        window: locality window in tokens.
        future: optional (q, k) float32 weights ``max(j - i, 0)``, given only when the mask lets some query
            see keys after itself (never for causal masks).

    Returns:
        (4, B, H, q) float32 statistics stacked in ``STAT_NAMES`` order. Padding rows (no allowed key) get
        0 statistics, bad rows NaN statistics.
    """
    rows, cols = e.shape[-2], e.shape[-1]
    device = e.device
    # distances relative to the block's first query keep float32 sums exact to ~rows * eps
    rel = (q_first - k_first) - torch.arange(cols, device=device, dtype=torch.float32)  # (k,) = q_first - j
    dist = e @ rel  # sum_j e_ij (q_first - j)
    et = torch.einsum("bhqk,bhqk->bhq", e, t)  # sum_j e_ij t_ij
    entropy = torch.log(z) - et * inv_z
    offsets = torch.arange(rows, device=device, dtype=torch.float32)  # i - q_first
    mean_distance = offsets + dist * inv_z
    if future is not None:
        mean_distance = mean_distance + torch.einsum("bhqk,qk->bhq", e, future) * inv_z
    locality = _diagonal_band_sum(e, q_first - k_first, window) * inv_z
    norm_entropy = entropy / torch.log(n_keys.clamp(min=2))
    stacked = torch.stack([entropy, norm_entropy, locality, mean_distance])  # (4, B, H, q) in STAT_NAMES order
    fill = torch.where(bad, float("nan"), 0.0)  # padding rows 0, rows with non-finite scores NaN
    stacked = torch.where(valid, stacked, fill)
    stacked[1] = torch.where(n_keys > 1, stacked[1], fill)  # one allowed key: normalised entropy 0
    return stacked
