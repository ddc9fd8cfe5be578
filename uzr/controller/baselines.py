"""The recency baseline: the best attention prior that knows only distances."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from uzr.controller.loss import target_rows
from uzr.masks import causal_mask, masked_log_softmax


class RecencyPrior:
    """Recency baseline ``p_ij ∝ w(i - j)`` over allowed keys, fitted by maximum likelihood.

    Distances are exact below ``max_distance``; longer ones share the last weight. Fitting streams
    sufficient statistics over training rows (row-normalised teacher mass per distance ``A(d)``, and
    the count of rows with ``n`` allowed keys ``C(n)``), then minimises the convex objective
    ``-sum_d A(d) log w(d) + sum_n C(n) log sum_{d<n} w(d)`` — the average KL of the prior to the
    teacher up to a constant — with L-BFGS, starting from the mean estimator
    ``w(d) = mean_rows t_{i,i-d}``. The MLE is exact for any row length (the mean estimator is biased
    when rows of different lengths are pooled), so it is the strongest recency-only baseline.
    """

    def __init__(self, max_distance: int = 1024, smoothing: float = 1e-4):
        self.max_distance = int(max_distance)
        self.smoothing = float(smoothing)  # weight of uniform pseudo-rows; keeps every log w finite
        self.reset()

    def reset(self) -> None:
        D = self.max_distance
        self.mass = torch.zeros(D, dtype=torch.float64)  # A(d): (D,)
        self.rows_by_len = torch.zeros(D + 1, dtype=torch.float64)  # C(n), n clamped to D: (D + 1,)
        self.log_weights: Tensor | None = None  # (D,) once fitted

    @property
    def fitted(self) -> bool:
        return self.log_weights is not None

    def _distances(self, S: int, device: torch.device) -> Tensor:
        idx = torch.arange(S, device=device)
        return (idx[:, None] - idx[None, :]).clamp(0, self.max_distance - 1)  # (S, S)

    @torch.no_grad()
    def accumulate(self, target: Tensor, mask: Tensor) -> None:
        """Add one batch. target: (B, S, S) teacher rows; mask: (B, S) bool real tokens."""
        allowed = causal_mask(mask)  # (B, S, S)
        t, valid = target_rows(target, allowed)  # (B, S, S), (B, S)
        cells = allowed & valid[:, :, None]  # (B, S, S)
        d = self._distances(t.shape[-1], t.device).expand_as(cells)[cells]  # (N,)
        self.mass += torch.zeros_like(self.mass).index_add_(0, d.cpu(), t[cells].double().cpu())
        n = allowed.sum(-1)[valid].clamp_max(self.max_distance)  # (R,)
        self.rows_by_len += torch.bincount(n.cpu(), minlength=self.max_distance + 1).double()

    def finalize(self, max_iter: int = 200) -> RecencyPrior:
        """Fit ``log_weights`` from the accumulated statistics."""
        C = self.rows_by_len  # (D + 1,)
        if C.sum() <= 0:
            raise ValueError("RecencyPrior has no training rows: pass batches with real tokens and targets")
        D = self.max_distance
        n = torch.arange(D + 1, dtype=torch.float64)
        # rows_with_d[d] = number of rows in which distance d is an allowed key (n > d); U = uniform mass.
        rows_with_d = C.flip(0).cumsum(0).flip(0)[1:]  # (D,)
        uniform_mass = (C[1:] / n[1:]).flip(0).cumsum(0).flip(0)  # (D,)
        A = self.mass + self.smoothing * uniform_mass  # (D,)
        Cs = C * (1 + self.smoothing)  # pseudo-rows count in the normaliser too
        seen = rows_with_d > 0
        theta0 = torch.log(A.clamp_min(1e-300) / rows_with_d.clamp_min(1))  # mean estimator
        theta = theta0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)
        total = C.sum()

        def closure() -> Tensor:
            opt.zero_grad()
            lz = torch.logcumsumexp(theta, 0)  # (D,): lz[n-1] = log sum_{d<n} w(d)
            f = (-(A * theta).sum() + (Cs[1:] * lz).sum()) / total
            f.backward()
            return f

        opt.step(closure)
        theta = theta.detach()
        # Distances never seen in training (longer rows at evaluation) reuse the last seen weight.
        last = int(seen.nonzero().max())
        theta[last + 1 :] = theta[last]
        self.log_weights = (theta - theta[: last + 1].max()).float()  # (D,)
        return self

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> RecencyPrior:
        """Fit on an iterable of ``(target (B, S, S), mask (B, S))``."""
        self.reset()
        for target, mask in batches:
            self.accumulate(target, mask)
        return self.finalize()

    def probs(self, mask: Tensor) -> Tensor:
        """Prior attention. mask: (B, S) bool. Returns (B, S, S) float32 rows over allowed keys."""
        if self.log_weights is None:
            raise RuntimeError("RecencyPrior.probs called before fit()")
        allowed = causal_mask(mask)  # (B, S, S)
        logits = self.log_weights.to(mask.device)[self._distances(mask.shape[-1], mask.device)]  # (S, S)
        return masked_log_softmax(logits.expand(allowed.shape), allowed).exp()
