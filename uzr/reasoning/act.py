"""Halting for iterated latent updates: Adaptive Computation Time and the zero-shot exits of
recurrent-depth LMs (DESIGN.md §9).

:func:`iterate` applies ``h <- step(h)`` up to ``max_steps`` times and combines the states per
position (``B, S``) according to ``mode``:

- ``act`` (Graves 2016): halting probability ``p_n = sigmoid(halting(h_n))``; position halts at the
  first ``N`` with ``sum_{n<=N} p_n >= threshold`` (``threshold = 1 - eps``, default 0.99) or at
  ``max_steps``. Weights: ``p_n`` for ``n < N``, the remainder ``R = 1 - sum_{n<N} p_n`` at ``N``;
  output ``sum_n w_n h_n``; ponder cost ``rho = N + R``. ``N`` is an integer, so the ponder cost sends
  gradient to the halting unit only through ``R``. ``threshold >= 1`` (``eps = 0``) never halts early:
  every position runs ``max_steps`` steps, and a step's weight is capped at the mass left
  (``min(p_n, 1 - sum_{m<n} p_m)``) so the weights stay a distribution. Below 1 the cap never binds.
- ``fixed``: ``max_steps`` steps, output the last state (``N = max_steps``, ``R = 0``).
- ``latent`` (Huginn-style zero-shot exit): stop at the first step whose relative change
  ``||h_n - h_{n-1}|| / ||h_{n-1}||`` falls below ``exit_tol``; output that state (``R = 0``).
- ``kl``: stop when ``KL(softmax(readout(h_{n-1})) || softmax(readout(h_n)))`` falls below
  ``exit_tol``; ``readout`` maps a state to logits (any trailing size).

Positions outside ``mask`` (padding) never run: zero weights, zero output, ``N = R = 0``. All
positions are updated every step (a step may mix positions); a halted position's later states do not
reach its output. The loop stops early once no position is running, unless ``stop_early=False`` (decoding
with a cache needs every step's states of earlier positions; the output, weights, N and R do not change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from uzr.config.checks import check_int

MODES = ("act", "fixed", "latent", "kl")


class Halted(NamedTuple):
    """What :func:`iterate` returns; ``T`` = steps actually run (<= max_steps)."""

    output: Tensor  # (B, S, D): halting-weighted sum of the states
    weights: Tensor  # (T, B, S): weight of each step's state; sums to 1 over T at every real position
    steps: Tensor  # (B, S) long: N, the step at which each position halted
    remainder: Tensor  # (B, S): R (act; 0 otherwise)
    ponder: Tensor  # (B, S): N + R
    residuals: Tensor  # (T, B, S): ||h_t - h_{t-1}|| per position (h_0 the input state)


def iterate(step: Callable[[Tensor], Tensor], h0: Tensor, *, max_steps: int = 8, mode: str = "act",
            halting: Callable[[Tensor], Tensor] | None = None, threshold: float = 0.99,
            exit_tol: float = 1e-2, readout: Callable[[Tensor], Tensor] | None = None,
            mask: Tensor | None = None, stop_early: bool = True) -> Halted:
    """Iterate ``step`` from ``h0`` (B, S, D) with halting ``mode`` (module docstring).

    halting: (B, S, D) -> (B, S) logits (``act``). readout: (B, S, D) -> (B, S, V) logits (``kl``).
    mask: (B, S) bool, True at real positions (default: all).
    """
    if mode not in MODES:
        raise ValueError(f"halting mode {mode!r} is invalid; valid: {' | '.join(MODES)}")
    check_int("max_steps", max_steps, minimum=1)
    if mode == "act" and halting is None:
        raise ValueError("halting mode 'act' needs a halting unit (h -> logits)")
    if mode == "kl" and readout is None:
        raise ValueError("halting mode 'kl' needs a readout (h -> logits) to compare distributions")
    B, S, _ = h0.shape
    running = torch.ones(B, S, dtype=torch.bool, device=h0.device) if mask is None else mask.bool().clone()
    zeros = h0.new_zeros(B, S)
    cum, remainder, out = zeros, zeros, torch.zeros_like(h0)
    steps = torch.zeros(B, S, dtype=torch.long, device=h0.device)
    weights, residuals = [], []
    prev, prev_logp = h0, None
    for n in range(1, max_steps + 1):
        h = step(prev)
        residual = (h - prev).norm(dim=-1)
        residuals.append(residual)
        last = n == max_steps
        if mode == "act":
            p = torch.sigmoid(halting(h))
            left = 1 - cum
            stop = running & (torch.full_like(running, last) |
                              ((cum + p >= threshold) if threshold < 1 else torch.zeros_like(running)))
            w = torch.where(stop, left, torch.where(running, torch.minimum(p, left), zeros))
            remainder = torch.where(stop, left, remainder)
            cum = cum + torch.where(running & ~stop, w, zeros)
        else:
            if mode == "fixed":
                converged = torch.zeros_like(running)
            elif mode == "latent":
                converged = residual / prev.norm(dim=-1).clamp_min(1e-12) < exit_tol
            else:
                logp = torch.log_softmax(readout(h).float(), -1)
                if prev_logp is None:
                    prev_logp = torch.log_softmax(readout(prev).float(), -1)
                converged = (prev_logp.exp() * (prev_logp - logp)).sum(-1) < exit_tol
                prev_logp = logp
            stop = running & (converged | last)
            w = stop.to(h.dtype)
        steps = torch.where(stop, n, steps)
        running = running & ~stop
        out = out + w.unsqueeze(-1) * h
        weights.append(w)
        prev = h
        if stop_early and not bool(running.any()):
            break
    return Halted(out, torch.stack(weights), steps, remainder, steps.to(h0.dtype) + remainder,
                  torch.stack(residuals))
