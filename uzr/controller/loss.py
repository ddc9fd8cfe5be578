"""The controller loss and the row KL every held-out number is measured with (DESIGN.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from uzr.config.controller import ControllerSpec, coerce_spec
from uzr.masks import allowed_pairs, causal_mask, masked_log_softmax, normalised_entropy

# Floor on predicted probabilities inside row_kl, so a baseline stored in float16 that underflowed
# to 0 where the teacher has mass gets a large finite KL instead of inf.
PROB_FLOOR = 1.0e-12

def target_rows(target: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher rows restricted to allowed keys and renormalised (float16 storage does not sum to 1).

    Returns (t (B, S, S) float32, valid (B, S) bool): valid = row has allowed keys and positive mass;
    padding rows (all zero) are invalid and ignored everywhere.
    """
    t = target.float().clamp_min(0) * allowed  # (B, S, S)
    z = t.sum(-1, keepdim=True)  # (B, S, 1)
    valid = (z.squeeze(-1) > 0) & allowed.any(-1)  # (B, S)
    return t / z.clamp_min(1e-30), valid


def _norm_entropy_and_locality(p: Tensor, logp: Tensor, allowed: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Normalised entropy H_i / log(n_i) (0 when n_i <= 1) and mass on the last ``window`` keys.

    p, logp, allowed: (B, S, S). Returns two (B, S) float32.
    """
    S = p.shape[-1]
    # p * logp, not xlogy(p, p): its gradient stays finite where p == 0 (masked keys).
    H = -(p * logp).sum(-1)  # (B, S)
    n = allowed.sum(-1).float()  # (B, S)
    Hn = normalised_entropy(H, n)  # (B, S)
    idx = torch.arange(S, device=p.device)
    near = (idx[:, None] - idx[None, :]) < window  # (S, S); causality comes from `allowed`
    loc = (p * (allowed & near)).sum(-1)  # (B, S)
    return Hn, loc


# ------------------------------------------------------------------------------------------- loss
def controller_loss(logits: Tensor, target: Tensor, mask: Tensor, spec: ControllerSpec) -> dict[str, Tensor]:
    """KL + MSE (+ statistics) loss of controller logits against teacher attention rows.

    logits: (B, S, S) unmasked; target: (B, S, S) teacher rows (padding rows all zero, ignored);
    mask: (B, S) bool real tokens. Allowed pairs: ``j <= i``, both real.
    Returns scalars ``loss, kl, mse, stats``: ``kl`` = mean over real rows of
    ``sum_j t_ij (log t_ij - log p_ij)``; ``mse`` = mean squared probability error over the allowed
    triangle; ``stats`` = MSE of normalised entropy plus MSE of locality (mass on the last
    ``spec.locality_window`` keys), prediction vs target, over real rows.
    """
    spec = coerce_spec(spec)  # a standalone spec's locality window is filled in
    allowed = causal_mask(mask)  # (B, S, S)
    t, valid = target_rows(target, allowed)  # (B, S, S), (B, S)
    logp = masked_log_softmax(logits, allowed)  # (B, S, S)
    p = logp.exp()  # (B, S, S); exactly 0 off the allowed set
    n_rows = valid.sum().clamp_min(1)
    kl_row = (torch.xlogy(t, t) - t * logp).sum(-1)  # (B, S); 0 log 0 = 0, 0 * MASKED_LOGPROB = 0
    kl = (kl_row * valid).sum() / n_rows
    cells = allowed & valid[:, :, None]  # (B, S, S)
    mse = ((p - t).square() * cells).sum() / cells.sum().clamp_min(1)
    Hn_p, loc_p = _norm_entropy_and_locality(p, logp, allowed, spec.locality_window)  # (B, S) x2
    with torch.no_grad():
        Hn_t, loc_t = _norm_entropy_and_locality(t, torch.log(t.clamp_min(1e-30)), allowed, spec.locality_window)
    stats = (((Hn_p - Hn_t).square() + (loc_p - loc_t).square()) * valid).sum() / n_rows
    loss = spec.kl_weight * kl + spec.mse_weight * mse + spec.stats_weight * stats
    return {"loss": loss, "kl": kl, "mse": mse, "stats": stats}


def auxiliary_loss(aux: dict[str, Tensor], spec: ControllerSpec) -> Tensor:
    """ZeroModel's auxiliary losses of an iterative (``lru``) controller, weighted:
    ``stability_weight * stability + sparsity_weight * sparsity + ponder_weight * ponder``
    (``aux`` from :class:`uzr.reasoning.LatentReasoningUnit`; each a scalar)."""
    return (spec.stability_weight * aux["stability"] + spec.sparsity_weight * aux["sparsity"]
            + spec.ponder_weight * aux["ponder"])


def row_kl(target: Tensor, pred_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed KL(target row || predicted row) over real rows, and the number of rows.

    target, pred_probs: (B, S, S); mask: (B, S) bool real tokens (or (B, S, S) allowed pairs).
    Both sides are restricted to the allowed keys and renormalised; predictions are floored at
    ``PROB_FLOOR``. The same function scores the controller and every baseline, so numbers compare.
    Returns (kl_sum: 0-d float64, n_rows: 0-d int64); the held-out KL is ``kl_sum / n_rows``.
    """
    allowed = allowed_pairs(mask)  # (B, S, S)
    t, valid = target_rows(target, allowed)  # (B, S, S), (B, S)
    p = pred_probs.float().clamp_min(0) * allowed  # (B, S, S)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    logp = torch.log(p.clamp_min(PROB_FLOOR))  # (B, S, S)
    kl_row = (torch.xlogy(t, t) - t * logp).sum(-1)  # (B, S)
    return (kl_row.double() * valid).sum(), valid.sum()


def uniform_probs(mask: Tensor) -> Tensor:
    """Uniform attention over allowed causal keys. mask: (B, S) bool. Returns (B, S, S) float32."""
    allowed = causal_mask(mask).float()  # (B, S, S)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
