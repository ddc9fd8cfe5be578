"""The latent reasoning unit (LRU): a GRU-style gated update iterated on a latent with halting, and its
auxiliary losses (DESIGN.md §9).

One step, with ``u = c`` the latent being refined (fixed) and ``h`` the running state (``h_0 = c``)::

    r  = sigmoid(W_r [h; u])          z = sigmoid(W_z [h; u])
    h~ = tanh(W_c [r * h; u])         h' = (1 - z) * h + z * h~
    h' = LayerNorm(h' + causal_mix(h'))      # depthwise causal conv over positions (kernel ``mix_kernel``)

iterated by :func:`uzr.reasoning.act.iterate` with a halting unit ``p = sigmoid(w . h + b)``
(``w`` starts at 0 and ``b`` at ``halt_bias``, default -2 as in DESIGN.md §9).

Halting at the start: every position has ``p = sigmoid(b)`` at every step, so ACT halts at
``N = ceil(threshold / sigmoid(b))`` if that is below ``max_steps``. At ``b = -2`` (0.119) and threshold
0.99 that is 9 steps: with ``max_steps = 8`` no position can halt early, and it is the ponder cost (weight
0.001) alone that has to move ``b`` past -1.9 (``N = 8`` still) before anything changes — the
"halting never stops early" of the LRU controller. :func:`initial_steps` gives ``N`` for a bias; the
ablation starts at ``b = -0.5`` (3 of its 4 steps) so that the halting unit can learn both directions.

Decoding with a cache: the position mix of step ``t`` reads the gated states of the ``mix_kernel - 1``
positions before; ``forward(..., past=...)`` takes them per step and returns the window for the next call.

Losses (ZeroModel's table; weights in :data:`AUX_WEIGHTS`): stability (residuals must shrink across
iterations), sparsity (1 - normalised Hoyer-square of the output latent), ponder (mean N + R).
"""

from __future__ import annotations

import math
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


def initial_steps(halt_bias: float, threshold: float = 0.99, max_steps: int = 8) -> int:
    """ACT's ``N`` at initialisation (halting weight 0, so ``p = sigmoid(halt_bias)`` at every step)."""
    p = 1 / (1 + math.exp(-halt_bias))
    return max_steps if threshold >= 1 else min(max_steps, math.ceil(threshold / p - 1e-9))


class LRUOutput(NamedTuple):
    output: Tensor  # (B, S, D) the refined latent
    halted: Halted
    aux: dict[str, Tensor]  # stability, sparsity, ponder (unweighted), and "total" = weighted sum
    window: Tensor | None = None  # (T, B, k-1, D) gated states of the last k-1 positions per step (with past)


class LatentReasoningUnit(nn.Module):
    """GRU-style gated latent update with a causal position mix, iterated with halting.

    ``forward(c, mask)``: c (B, S, D) -> :class:`LRUOutput`. ``mode``: ``act`` | ``fixed`` | ``latent`` |
    ``kl`` (:mod:`uzr.reasoning.act`); ``kl`` compares softmax over the latent's features.
    """

    def __init__(self, dim: int, max_steps: int = 8, mode: str = "act", threshold: float = 0.99,
                 exit_tol: float = 1e-2, mix_kernel: int = 3, aux_weights: dict[str, float] | None = None,
                 halt_bias: float = HALT_BIAS_INIT):
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
        nn.init.constant_(self.halt.bias, halt_bias)
        self.aux_weights = dict(AUX_WEIGHTS if aux_weights is None else aux_weights)

    def gated(self, h: Tensor, u: Tensor) -> Tensor:
        """The GRU-style update before the position mix. h, u: (B, S, D) -> (B, S, D)."""
        r, z = torch.sigmoid(self.gates(torch.cat([h, u], -1))).chunk(2, -1)
        cand = torch.tanh(self.candidate(torch.cat([r * h, u], -1)))
        return (1 - z) * h + z * cand

    def mixed(self, g: Tensor, before: Tensor | None = None) -> Tensor:
        """Causal depthwise mix + LayerNorm. g: (B, S, D) gated states; before: (B, k-1, D) those of the k-1
        positions before g's first (None: the sequence starts at g, zeros as padding). -> (B, S, D)."""
        k = self.mix.kernel_size[0]
        x = g.transpose(1, 2)
        x = F.pad(x, (k - 1, 0)) if before is None else torch.cat([before.transpose(1, 2), x], -1)
        return self.norm(g + self.mix(x).transpose(1, 2))  # position i sees i-k+1..i

    def step(self, h: Tensor, u: Tensor) -> Tensor:
        """One gated update. h, u: (B, S, D) -> (B, S, D)."""
        return self.mixed(self.gated(h, u))

    def forward(self, c: Tensor, mask: Tensor | None = None, past: Tensor | None = None,
                keep_window: bool = False) -> LRUOutput:
        """c: (B, S, D). past: (T_max, B, k-1, D) gated states of the positions before c (decoding with a
        cache). With ``past`` or ``keep_window``, every one of ``max_steps`` steps runs (a later position needs
        them) and :attr:`LRUOutput.window` holds the last k-1 positions' gated states for the next call."""
        k, windows = self.mix.kernel_size[0], []

        def step(h: Tensor) -> Tensor:
            g = self.gated(h, c)
            before = None if past is None else past[len(windows)]
            if past is not None or keep_window:
                full = g if before is None else torch.cat([before, g], 1)
                if full.shape[1] < k - 1:
                    full = F.pad(full, (0, 0, k - 1 - full.shape[1], 0))
                windows.append(full[:, full.shape[1] - (k - 1):])
            return self.mixed(g, before)

        tracking = past is not None or keep_window
        halted = iterate(step, c, max_steps=self.max_steps, mode=self.mode,
                         halting=lambda h: self.halt(h).squeeze(-1), threshold=self.threshold,
                         exit_tol=self.exit_tol, readout=lambda h: h, mask=mask, stop_early=not tracking)
        aux = {
            "stability": stability_loss(halted, mask),
            "sparsity": _masked_mean(1 - hoyer_sparsity(halted.output), mask),
            "ponder": _masked_mean(halted.ponder, mask),
        }
        aux["total"] = sum(self.aux_weights[k] * v for k, v in aux.items())
        return LRUOutput(halted.output, halted, aux, torch.stack(windows) if tracking else None)
