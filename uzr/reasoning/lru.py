"""The latent reasoning unit (LRU): a GRU-style gated update iterated on a latent with halting, and its
auxiliary losses (DESIGN.md §9).

One step, with ``u = c`` the latent being refined (fixed) and ``h`` the running state (``h_0 = c``)::

    r  = sigmoid(W_r [h; u])          z = sigmoid(W_z [h; u])
    h~ = tanh(W_c [r * h; u])         h' = (1 - z) * h + z * h~
    h' = LayerNorm(h' + causal_mix(h'))      # depthwise causal conv over positions (kernel ``mix_kernel``)

iterated by :func:`uzr.reasoning.act.iterate` with a halting unit ``p = sigmoid(w . h + b)``
(``b`` initialised at -2, so early on a position runs ~ 1 / sigmoid(-2) = 8 steps).

Losses (ZeroModel's table; weights in :data:`AUX_WEIGHTS`): stability (residuals must shrink across
iterations), sparsity (1 - normalised Hoyer-square of the output latent), ponder (mean N + R).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from uzr.reasoning.act import MODES, Halted, iterate

# prediction 1.0 (the caller's own loss), stability 0.1, sparsity 0.01, ponder 0.001
AUX_WEIGHTS = {"stability": 0.1, "sparsity": 0.01, "ponder": 0.001}
HALT_BIAS_INIT = -2.0


def hoyer_sparsity(a: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Normalised Hoyer-square sparsity of ``a`` along ``dim`` (size n >= 2), in [0, 1].

    ``H = ||a||_1^2 / ||a||_2^2`` ranges over [1, n] (1: one nonzero entry, n: all magnitudes equal);
    returns ``(n - H) / (n - 1)``: 0 for a uniform vector, 1 for a one-hot one. A zero vector counts 1.
    Shape: ``a`` with ``dim`` removed.
    """
    n = a.shape[dim]
    if n < 2:
        raise ValueError(f"Hoyer sparsity needs at least 2 entries along dim {dim}, got {n}")
    h = a.abs().sum(dim).pow(2) / a.pow(2).sum(dim).clamp_min(eps)
    return ((n - h) / (n - 1)).clamp(0, 1)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1)


def mean_residuals(halted: Halted, mask: Tensor | None = None) -> Tensor:
    """Mean residual ``||h_t - h_{t-1}||`` over real positions, per step: (T,)."""
    return torch.stack([_masked_mean(r, mask) for r in halted.residuals])


def stability_loss(halted: Halted, mask: Tensor | None = None) -> Tensor:
    """Residuals must shrink: mean over steps of ``relu(r_{t+1} - r_t) / r_1`` (mean residuals over
    real positions; 0 when they never grow; scale-free). A single step gives 0."""
    r = mean_residuals(halted, mask)
    if len(r) < 2:
        return r.sum() * 0
    return F.relu(r[1:] - r[:-1]).mean() / r[0].detach().clamp_min(1e-12)


def convergence_ratio(halted: Halted, mask: Tensor | None = None) -> float:
    """Last mean residual / first mean residual (< 1: the iteration contracts)."""
    r = mean_residuals(halted, mask).detach()
    return float(r[-1] / r[0].clamp_min(1e-12))


class LRUOutput(NamedTuple):
    output: Tensor  # (B, S, D) the refined latent
    halted: Halted
    aux: dict[str, Tensor]  # stability, sparsity, ponder (unweighted), and "total" = weighted sum


class LatentReasoningUnit(nn.Module):
    """GRU-style gated latent update with a causal position mix, iterated with halting.

    ``forward(c, mask)``: c (B, S, D) -> :class:`LRUOutput`. ``mode``: ``act`` | ``fixed`` | ``latent`` |
    ``kl`` (:mod:`uzr.reasoning.act`); ``kl`` compares softmax over the latent's features.
    """

    def __init__(self, dim: int, max_steps: int = 8, mode: str = "act", threshold: float = 0.99,
                 exit_tol: float = 1e-2, mix_kernel: int = 3, aux_weights: dict[str, float] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LRU halting mode {mode!r} is invalid; valid: {' | '.join(MODES)}")
        self.dim, self.max_steps, self.mode = dim, max_steps, mode
        self.threshold, self.exit_tol = threshold, exit_tol
        self.gates = nn.Linear(2 * dim, 2 * dim)  # W_r and W_z together
        self.candidate = nn.Linear(2 * dim, dim)
        self.mix = nn.Conv1d(dim, dim, mix_kernel, groups=dim, bias=False)
        nn.init.zeros_(self.mix.weight)  # starts as the identity mix
        self.norm = nn.LayerNorm(dim)
        self.halt = nn.Linear(dim, 1)
        nn.init.zeros_(self.halt.weight)
        nn.init.constant_(self.halt.bias, HALT_BIAS_INIT)
        self.aux_weights = dict(AUX_WEIGHTS if aux_weights is None else aux_weights)

    def step(self, h: Tensor, u: Tensor) -> Tensor:
        """One gated update. h, u: (B, S, D) -> (B, S, D)."""
        r, z = torch.sigmoid(self.gates(torch.cat([h, u], -1))).chunk(2, -1)
        cand = torch.tanh(self.candidate(torch.cat([r * h, u], -1)))
        h = (1 - z) * h + z * cand
        k = self.mix.kernel_size[0]
        mixed = self.mix(F.pad(h.transpose(1, 2), (k - 1, 0))).transpose(1, 2)  # position i sees i-k+1..i
        return self.norm(h + mixed)

    def forward(self, c: Tensor, mask: Tensor | None = None) -> LRUOutput:
        halted = iterate(lambda h: self.step(h, c), c, max_steps=self.max_steps, mode=self.mode,
                         halting=lambda h: self.halt(h).squeeze(-1), threshold=self.threshold,
                         exit_tol=self.exit_tol, readout=lambda h: h, mask=mask)
        aux = {
            "stability": stability_loss(halted, mask),
            "sparsity": _masked_mean(1 - hoyer_sparsity(halted.output), mask),
            "ponder": _masked_mean(halted.ponder, mask),
        }
        aux["total"] = sum(self.aux_weights[k] * v for k, v in aux.items())
        return LRUOutput(halted.output, halted, aux)
