"""Controller: predicts, from the student's hidden state entering an injected layer, the teacher's
head-mean attention distribution there (DESIGN.md §5).

Uniform controller API (used by the injector, including during decoding with a key cache)::

    qf = ctrl.query_features(h_q)          # (B, Sq, ctrl.query_dim)
    kf = ctrl.key_features(h_k)            # (B, Sk, ctrl.key_dim); cache these per layer like K
    logits = ctrl.logits_from_features(qf, kf, q_pos, k_pos)   # (B, Sq, Sk), unmasked

``q_pos``/``k_pos`` are absolute token positions, ``(Sq,)``/``(Sk,)`` or ``(B, Sq)``/``(B, Sk)`` long.
The bilinear controller only uses their difference (so left padding shifts nothing); the seed MLP
reads absolute key positions, so with left padding pass positions counted from the first real token.
``ctrl(h)`` is the same with ``q_pos = k_pos = arange(S)``. Mask the causal triangle and padding with
:func:`masked_log_softmax` / :func:`causal_mask`.

Also here: the loss (:func:`controller_loss`), the baselines every held-out KL is reported against
(uniform causal attention, a fitted :class:`RecencyPrior`, the student's own attention), the Lightning
module that trains one controller per injected layer, and checkpoint I/O (safetensors + JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from uzr.cache import atomic_write, file_digest

__all__ = [
    "ARCHS",
    "MASKED_LOGPROB",
    "BilinearController",
    "Controller",
    "ControllerModule",
    "ControllerSpec",
    "RecencyPrior",
    "SeedMLPController",
    "build_controller",
    "causal_mask",
    "coerce_spec",
    "controller_loss",
    "load_controller",
    "masked_log_softmax",
    "relative_bucket",
    "row_kl",
    "save_controller",
    "uniform_probs",
    "validate_spec",
]

ARCHS = ("bilinear", "seed_mlp")
# Log-prob given to disallowed keys: finite (so 0 * it is 0, never NaN) yet exp() of it is exactly 0
# in float32, and it stays representable in float16 for an additive attention bias.
MASKED_LOGPROB = -1.0e4
# Floor on predicted probabilities inside row_kl, so a baseline stored in float16 that underflowed
# to 0 where the teacher has mass gets a large finite KL instead of inf.
PROB_FLOOR = 1.0e-12
CHECKPOINT_FORMAT = "uzr.controller"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "controller.safetensors"
META_FILE = "controller.json"
METHODS = ("controller", "uniform", "recency", "student_self")


# ----------------------------------------------------------------------------------------- config
@dataclass
class ControllerSpec:
    """Controller architecture, loss weights and training hyperparameters (Hydra structured config)."""

    arch: str = "bilinear"  # "bilinear" | "seed_mlp"
    key_dim: int = 64  # bilinear: width of query/key features
    mlp_hidden: int = 128  # bilinear: hidden width of the q/k MLPs
    num_buckets: int = 32  # bilinear: relative-distance buckets (exact below num_buckets // 2, log beyond)
    max_distance: int = 1024  # distance mapped to the last bucket; also the recency prior's range
    max_len: int = 256  # seed_mlp only: number of absolute key positions it can address
    kl_weight: float = 1.0
    mse_weight: float = 0.1
    stats_weight: float = 0.0
    locality_window: int = 8  # keys with i - j < window count as local (DESIGN.md §4)
    lr: float = 3e-3
    weight_decay: float = 0.01
    max_epochs: int = 20
    batch_size: int = 8


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ControllerSpec))


def validate_spec(spec: ControllerSpec) -> ControllerSpec:
    """Check every field; raise ValueError naming the key, its value and what is valid."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"controller.{key}={getattr(spec, key)!r} is invalid; valid: {valid}")

    if spec.arch not in ARCHS:
        raise bad("arch", " | ".join(ARCHS))
    for key in ("key_dim", "mlp_hidden", "max_len", "locality_window", "max_epochs", "batch_size"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, "an integer >= 1")
    if isinstance(spec.num_buckets, bool) or not isinstance(spec.num_buckets, int) or spec.num_buckets < 2:
        raise bad("num_buckets", "an integer >= 2")
    if not isinstance(spec.max_distance, int) or spec.max_distance <= spec.num_buckets // 2:
        raise bad("max_distance", f"an integer > num_buckets // 2 = {spec.num_buckets // 2}")
    for key in ("kl_weight", "mse_weight", "stats_weight", "weight_decay"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(key, "a finite number >= 0")
    if spec.kl_weight + spec.mse_weight + spec.stats_weight <= 0:
        raise bad("kl_weight", "at least one of kl_weight, mse_weight, stats_weight > 0")
    if isinstance(spec.lr, bool) or not isinstance(spec.lr, (int, float)) or not (0 < spec.lr < math.inf):
        raise bad("lr", "a finite number > 0")
    return spec


def coerce_spec(spec: ControllerSpec | Mapping[str, Any] | None) -> ControllerSpec:
    """ControllerSpec from a spec, a mapping (dict / OmegaConf DictConfig) or None (defaults); validated."""
    if spec is None:
        spec = ControllerSpec()
    elif not isinstance(spec, ControllerSpec):
        unknown = sorted(set(spec) - set(_SPEC_FIELDS))
        if unknown:
            raise ValueError(f"unknown controller key(s) {unknown}; valid keys: {', '.join(_SPEC_FIELDS)}")
        spec = ControllerSpec(**{k: spec[k] for k in spec})
    return validate_spec(spec)


# ------------------------------------------------------------------------------------ mask helpers
def causal_mask(mask: Tensor) -> Tensor:
    """Allowed (query, key) pairs: ``j <= i`` and both real tokens.

    mask: (B, S) bool, True = real token. Returns (B, S, S) bool.
    """
    mask = mask.bool()
    S = mask.shape[-1]
    tril = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()  # (S, S)
    return tril & mask[:, :, None] & mask[:, None, :]  # (B, S, S)


def _allowed(mask: Tensor) -> Tensor:
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


def _target_rows(target: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
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
    Hn = torch.where(n > 1, H / n.clamp_min(2).log(), torch.zeros_like(H))  # (B, S)
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
    allowed = causal_mask(mask)  # (B, S, S)
    t, valid = _target_rows(target, allowed)  # (B, S, S), (B, S)
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


def row_kl(target: Tensor, pred_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed KL(target row || predicted row) over real rows, and the number of rows.

    target, pred_probs: (B, S, S); mask: (B, S) bool real tokens (or (B, S, S) allowed pairs).
    Both sides are restricted to the allowed keys and renormalised; predictions are floored at
    ``PROB_FLOOR``. The same function scores the controller and every baseline, so numbers compare.
    Returns (kl_sum: 0-d float64, n_rows: 0-d int64); the held-out KL is ``kl_sum / n_rows``.
    """
    allowed = _allowed(mask)  # (B, S, S)
    t, valid = _target_rows(target, allowed)  # (B, S, S), (B, S)
    p = pred_probs.float().clamp_min(0) * allowed  # (B, S, S)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    logp = torch.log(p.clamp_min(PROB_FLOOR))  # (B, S, S)
    kl_row = (torch.xlogy(t, t) - t * logp).sum(-1)  # (B, S)
    return (kl_row.double() * valid).sum(), valid.sum()


def uniform_probs(mask: Tensor) -> Tensor:
    """Uniform attention over allowed causal keys. mask: (B, S) bool. Returns (B, S, S) float32."""
    allowed = causal_mask(mask).float()  # (B, S, S)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)


# -------------------------------------------------------------------------------------- baselines
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
        t, valid = _target_rows(target, allowed)  # (B, S, S), (B, S)
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


# ------------------------------------------------------------------------------------ controllers
def relative_bucket(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket index of relative distance ``i - j`` (negative clamped to 0).

    Exact for distances below ``num_buckets // 2``, log-spaced up to ``max_distance``, where the last
    bucket starts. distance: any shape, long. Returns the same shape, long in [0, num_buckets).
    """
    d = distance.clamp_min(0)
    exact = num_buckets // 2
    ratio = torch.log(d.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    far = (exact + (ratio * (num_buckets - exact)).long()).clamp(exact, num_buckets - 1)
    return torch.where(d < exact, d, far)


def _positions(pos: Tensor | None, S: int, device: torch.device) -> Tensor:
    return torch.arange(S, device=device) if pos is None else pos.to(device=device, dtype=torch.long)


class Controller(nn.Module):
    """Common controller API (see module docstring). Subclasses set ``query_dim`` and ``key_dim``."""

    query_dim: int
    key_dim: int

    def __init__(self, spec: ControllerSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.hidden_size = int(hidden_size)

    def _cast(self, h: Tensor) -> Tensor:
        # Hidden states come from the store as float16; compute in the parameters' dtype (float32).
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"controller expects hidden size {self.hidden_size}, got {tuple(h.shape)}")
        return h.to(next(self.parameters()).dtype)

    def query_features(self, h: Tensor) -> Tensor:  # (B, S, D) -> (B, S, query_dim)
        raise NotImplementedError

    def key_features(self, h: Tensor) -> Tensor:  # (B, S, D) -> (B, S, key_dim)
        raise NotImplementedError

    def logits_from_features(self, q_feat: Tensor, k_feat: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> unmasked logits (B, S, S), positions ``arange(S)``."""
        pos = torch.arange(h.shape[1], device=h.device)
        return self.logits_from_features(self.query_features(h), self.key_features(h), pos, pos)


class BilinearController(Controller):
    """``logits_ij = q(h_i) . k(h_j) / sqrt(key_dim) + b(bucket(i - j))`` — any length, expresses locality."""

    def __init__(self, spec: ControllerSpec, hidden_size: int):
        super().__init__(spec, hidden_size)
        D, Hd, dk = self.hidden_size, spec.mlp_hidden, spec.key_dim
        self.query_dim = self.key_dim = dk
        self.norm = nn.LayerNorm(D)  # hidden-state scales vary a lot across layers and models
        self.q = nn.Sequential(nn.Linear(D, Hd), nn.GELU(), nn.Linear(Hd, dk))
        self.k = nn.Sequential(nn.Linear(D, Hd), nn.GELU(), nn.Linear(Hd, dk))
        # Start with a mild preference for the nearest tokens; training reshapes it freely.
        self.rel_bias = nn.Parameter(-0.5 * torch.log1p(torch.arange(spec.num_buckets, dtype=torch.float32)))

    def query_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, key_dim)."""
        return self.q(self.norm(self._cast(h)))

    def key_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, key_dim); cacheable per decoded token."""
        return self.k(self.norm(self._cast(h)))

    def logits_from_features(self, q_feat: Tensor, k_feat: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_feat (B, Sq, dk), k_feat (B, Sk, dk), q_pos (Sq,)|(B, Sq), k_pos (Sk,)|(B, Sk) -> (B, Sq, Sk)."""
        k_feat = k_feat.to(q_feat.dtype)
        scores = q_feat @ k_feat.transpose(-1, -2) / math.sqrt(self.key_dim)  # (B, Sq, Sk)
        q_pos = _positions(q_pos, q_feat.shape[1], q_feat.device)
        k_pos = _positions(k_pos, k_feat.shape[1], q_feat.device)
        rel = q_pos[..., :, None] - k_pos[..., None, :]  # (Sq, Sk) or (B, Sq, Sk)
        bucket = relative_bucket(rel, self.spec.num_buckets, self.spec.max_distance)
        return scores + self.rel_bias[bucket].to(scores.dtype)  # (B, Sq, Sk)


class SeedMLPController(Controller):
    """Reference ``Linear(D, 512) -> ReLU -> LayerNorm -> Linear(512, max_len)``: logits over absolute
    key positions ``0 .. max_len - 1``, a function of the query alone.

    Query features are those ``max_len`` logits; key features are empty ``(B, Sk, 0)`` and
    ``logits_from_features`` gathers the query's logits at the absolute key positions.
    """

    def __init__(self, spec: ControllerSpec, hidden_size: int):
        super().__init__(spec, hidden_size)
        self.query_dim, self.key_dim = spec.max_len, 0
        self.net = nn.Sequential(nn.Linear(self.hidden_size, 512), nn.ReLU(), nn.LayerNorm(512),
                                 nn.Linear(512, spec.max_len))

    def query_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, max_len) logits over absolute key positions."""
        return self.net(self._cast(h))

    def key_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, 0): the seed MLP has no key side."""
        return h.new_zeros(*h.shape[:2], 0, dtype=torch.float32)

    def logits_from_features(self, q_feat: Tensor, k_feat: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_feat (B, Sq, max_len), k_feat (B, Sk, 0), k_pos (Sk,)|(B, Sk) -> (B, Sq, Sk); q_pos unused."""
        B, Sq, _ = q_feat.shape
        k_pos = _positions(k_pos, k_feat.shape[1], q_feat.device)
        if k_pos.numel() and int(k_pos.max()) >= self.spec.max_len:
            raise ValueError(
                f"seed_mlp controller covers key positions < max_len={self.spec.max_len}, got position "
                f"{int(k_pos.max())}; use arch=bilinear for long inputs or retrain with a larger controller.max_len")
        if k_pos.dim() == 1:
            k_pos = k_pos.expand(B, -1)
        return q_feat.gather(-1, k_pos[:, None, :].expand(B, Sq, -1))  # (B, Sq, Sk)

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, S) logits (the first S absolute positions)."""
        if h.shape[1] > self.spec.max_len:
            raise ValueError(
                f"seed_mlp controller handles sequences up to max_len={self.spec.max_len} tokens, got "
                f"{h.shape[1]}; shorten the inputs, raise controller.max_len and retrain, or use arch=bilinear")
        return self.query_features(h)[:, :, : h.shape[1]]


def build_controller(spec: ControllerSpec | Mapping[str, Any] | None, hidden_size: int) -> Controller:
    """Instantiate the architecture named by ``spec.arch``."""
    spec = coerce_spec(spec)
    return {"bilinear": BilinearController, "seed_mlp": SeedMLPController}[spec.arch](spec, hidden_size)


# ----------------------------------------------------------------------------------------- module
class ControllerModule(L.LightningModule):
    """Trains one controller per injected student layer and reports held-out KL against baselines.

    Batch: ``{"mask": (B, S) bool, "hidden": {str(layer): (B, S, D)}, "target": {str(layer): (B, S, S)},
    "student_self": {str(layer): (B, S, S)}}`` (``student_self`` optional). The recency prior is fitted
    once at fit start from the datamodule's (or the trainer's) train dataloader, or by calling
    :meth:`fit_baselines` beforehand.
    """

    def __init__(self, hidden_size: int, layers: Sequence[int],
                 spec: ControllerSpec | Mapping[str, Any] | None = None):
        super().__init__()
        self.spec = coerce_spec(spec)
        self.hidden_size = int(hidden_size)
        self.layers = [int(x) for x in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(layers)!r} is invalid; valid: a non-empty list of distinct layer indices")
        self.save_hyperparameters({"hidden_size": self.hidden_size, "layers": self.layers,
                                   "spec": dataclasses.asdict(self.spec)})
        self.controllers = nn.ModuleDict({str(x): build_controller(self.spec, self.hidden_size) for x in self.layers})
        # Baselines are not parameters and are not part of the controller artifact.
        self.recency = {str(x): RecencyPrior(self.spec.max_distance) for x in self.layers}
        self._report: dict[str, float] = {}
        self._warned_no_recency = False

    # -- baselines
    @torch.no_grad()
    def fit_baselines(self, train_dataloader: Iterable[Mapping[str, Any]]) -> None:
        """Fit the per-layer recency priors on training batches."""
        for prior in self.recency.values():
            prior.reset()
        for batch in train_dataloader:
            for key, prior in self.recency.items():
                prior.accumulate(batch["target"][key], batch["mask"])
        trainer = self._trainer
        for prior in self.recency.values():
            if trainer is not None and trainer.world_size > 1:
                # Shards differ per rank; the MLE only depends on the pooled statistics.
                prior.mass = trainer.strategy.reduce(prior.mass.to(self.device), reduce_op="sum").cpu()
                prior.rows_by_len = trainer.strategy.reduce(prior.rows_by_len.to(self.device), reduce_op="sum").cpu()
            prior.finalize()

    def on_fit_start(self) -> None:
        if all(p.fitted for p in self.recency.values()):
            return
        dm = self.trainer.datamodule
        if dm is not None:
            loader = dm.train_dataloader()
        else:
            self.trainer.fit_loop.setup_data()
            loader = self.trainer.train_dataloader
        if loader is None:  # e.g. limit_train_batches=0: nothing to fit on; validation skips the prior
            warnings.warn("no train dataloader to fit the recency prior on", stacklevel=2)
            return
        self.fit_baselines(loader)

    # -- training
    def _layer_losses(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        mask = batch["mask"].bool()  # (B, S)
        total, outs, logits = 0.0, {}, {}
        for key, ctrl in self.controllers.items():
            logits[key] = ctrl(batch["hidden"][key])  # (B, S, S)
            outs[key] = controller_loss(logits[key], batch["target"][key], mask, self.spec)
            total = total + outs[key]["loss"]
        return total, outs, logits

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        total, outs, _ = self._layer_losses(batch)
        B = batch["mask"].shape[0]
        for key, out in outs.items():
            self.log(f"train/kl/L{key}", out["kl"], batch_size=B)
        self.log("train/loss", total, prog_bar=True, batch_size=B)
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # No weight decay on biases, LayerNorm and the relative-position bias: decay would pull them to 0.
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.spec.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.spec.lr)

    # -- validation
    def on_validation_epoch_start(self) -> None:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        n = len(self.layers)
        self._kl_sum = torch.zeros(n, len(METHODS), dtype=dtype, device=self.device)  # (layers, methods)
        self._rows = torch.zeros(n, len(METHODS), dtype=dtype, device=self.device)
        self._loss_sum = torch.zeros(2, dtype=dtype, device=self.device)  # (sum of B * loss, sum of B)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        total, _, logits = self._layer_losses(batch)
        mask = batch["mask"].bool()  # (B, S)
        B = mask.shape[0]
        self._loss_sum += torch.stack([total.detach() * B, total.new_tensor(float(B))]).to(self._loss_sum.dtype)
        allowed = causal_mask(mask)  # (B, S, S)
        uniform = uniform_probs(mask)  # (B, S, S)
        for li, key in enumerate(self.controllers.keys()):
            target = batch["target"][key]
            preds = {"controller": masked_log_softmax(logits[key], allowed).exp(), "uniform": uniform}
            if self.recency[key].fitted:
                preds["recency"] = self.recency[key].probs(mask)
            elif not self._warned_no_recency:
                warnings.warn("recency prior not fitted (call fit_baselines); its KL is not reported", stacklevel=2)
                self._warned_no_recency = True
            if key in batch.get("student_self", {}):
                preds["student_self"] = batch["student_self"][key]
            for name, probs in preds.items():
                kl_sum, n = row_kl(target, probs, allowed)
                mi = METHODS.index(name)
                self._kl_sum[li, mi] += kl_sum.to(self._kl_sum.dtype)
                self._rows[li, mi] += n.to(self._rows.dtype)

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        kl_sum = strategy.reduce(self._kl_sum, reduce_op="sum")  # (layers, methods)
        rows = strategy.reduce(self._rows, reduce_op="sum")
        loss_sum = strategy.reduce(self._loss_sum, reduce_op="sum")
        report: dict[str, float] = {}
        for li, key in enumerate(self.controllers.keys()):
            report[f"val/rows/L{key}"] = float(rows[li, 0])
            for mi, name in enumerate(METHODS):
                if rows[li, mi] > 0:
                    report[f"val/kl/L{key}/{name}"] = float(kl_sum[li, mi] / rows[li, mi])
        for mi, name in enumerate(METHODS):
            # Pool rows over layers: a row-weighted mean, not a mean of batch means. Only reported when
            # every layer has the method, so the mean always covers the same layers.
            if bool((rows[:, mi] > 0).all()):
                report[f"val/kl/{name}"] = float(kl_sum[:, mi].sum() / rows[:, mi].sum())
        if loss_sum[1] > 0:
            report["val/loss"] = float(loss_sum[0] / loss_sum[1])
        for name, value in report.items():
            if not name.startswith("val/rows/"):
                self.log(name, value, prog_bar=name in ("val/loss", "val/kl/controller"))
        self._report = report

    def heldout_report(self) -> dict[str, float]:
        """Last validation numbers as plain floats: ``val/kl/L{layer}/{method}``, ``val/kl/{method}``
        (row-weighted over layers), ``val/rows/L{layer}`` and ``val/loss``; methods: controller,
        uniform, recency, student_self."""
        return dict(self._report)


# ----------------------------------------------------------------------------------- checkpoints
def _unpack(obj: Any) -> tuple[dict[str, Controller], ControllerSpec, int]:
    if isinstance(obj, ControllerModule):
        return dict(obj.controllers.items()), obj.spec, obj.hidden_size
    if isinstance(obj, (Mapping, nn.ModuleDict)):
        ctrls = {str(k): v for k, v in obj.items()}
        if not ctrls or not all(isinstance(c, Controller) for c in ctrls.values()):
            raise TypeError("save_controller expects a ControllerModule or a non-empty {layer: Controller} mapping")
        first = next(iter(ctrls.values()))
        if any(c.spec != first.spec or c.hidden_size != first.hidden_size for c in ctrls.values()):
            raise ValueError("all controllers saved together must share one spec and hidden size")
        return ctrls, first.spec, first.hidden_size
    raise TypeError(f"save_controller expects a ControllerModule or a {{layer: Controller}} mapping, got {type(obj)}")




def save_controller(module_or_controllers: ControllerModule | Mapping[str, Controller], path_dir: str | os.PathLike,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``controller.safetensors`` + ``controller.json`` into ``path_dir``, each atomically.

    ``metadata`` (JSON-serialisable; e.g. ``student``, cache key, harvest key) is stored beside the
    framework's own fields: ``hidden_size``, ``layers``, ``spec``, format version and the weights'
    sha256 (so a half-written or modified pair is detected on load). Returns ``path_dir``.
    """
    controllers, spec, hidden_size = _unpack(module_or_controllers)
    layers = sorted(int(k) for k in controllers)
    own = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "hidden_size": hidden_size,
           "layers": layers, "spec": dataclasses.asdict(spec)}
    meta = dict(metadata or {})
    for key, value in own.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata[{key!r}]={meta[key]!r} contradicts the controllers' {key}={value!r}")
    meta.update(own)
    meta.setdefault("student", None)
    json.dumps(meta)  # fail before writing anything if the caller's metadata is not JSON-serialisable
    tensors = {f"{key}.{name}": t.detach().cpu().contiguous()
               for key, ctrl in controllers.items() for name, t in ctrl.state_dict().items()}
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": CHECKPOINT_FORMAT}))
    meta["weights_sha256"] = file_digest(out / WEIGHTS_FILE)

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    atomic_write(out / META_FILE, write_json)
    return out


def _normalise(field: str, value: Any) -> Any:
    if field == "layers" and value is not None:
        return [int(x) for x in value]
    if field == "hidden_size" and value is not None:
        return int(value)
    return value


def _rebuild_hint(d: Path) -> str:
    return (f"delete {d} and run again with 'controller' in stages=[...] to retrain it, "
            f"or restore the checkpoint from a trusted copy")


def _check_safetensors_file(wpath: Path, d: Path) -> None:
    """Refuse, before anything parses it, a weights file that is not safetensors (e.g. a pickle).

    A safetensors file starts with an 8-byte little-endian header length N followed by a JSON header
    (``{``) of N bytes. Pickles (``torch.save`` zips, raw pickles) are named as such: uzr never
    unpickles weights, since unpickling can run arbitrary code.
    """
    size = wpath.stat().st_size
    with open(wpath, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save zip archive" if head[:2] == b"PK" else "a pickle"
        raise ValueError(
            f"refusing to load {wpath}: it is {kind}, not a safetensors file. uzr reads controller weights "
            f"only with safetensors and never unpickles them (unpickling can run arbitrary code); "
            f"{_rebuild_hint(d)}")
    raise ValueError(f"{wpath} is not a valid safetensors file (damaged or truncated header, {size} bytes); "
                     f"{_rebuild_hint(d)}")


def load_controller(path_dir: str | os.PathLike, expected: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Controller], dict[str, Any]]:
    """Rebuild controllers saved by :func:`save_controller` (weights via safetensors, never pickle).

    ``expected``: fields the current run requires (``student``, ``hidden_size``, ``layers``, or any
    other metadata key); a mismatch raises ValueError naming the field and both values.
    Returns ``({str(layer): Controller in eval mode}, metadata)``.
    """
    d = Path(path_dir)
    wpath, mpath = d / WEIGHTS_FILE, d / META_FILE
    for p in (mpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"controller checkpoint incomplete: {p} is missing; train the controller "
                                    f"(stages=[controller]) or point to a folder holding {WEIGHTS_FILE} and {META_FILE}")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged: {_rebuild_hint(d)}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{mpath} is not a uzr controller checkpoint (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{mpath} has format_version={meta.get('format_version')!r}, this uzr reads "
                         f"{CHECKPOINT_VERSION}; retrain the controller")
    for field, current in (expected or {}).items():
        ckpt, cur = _normalise(field, meta.get(field)), _normalise(field, current)
        if ckpt != cur:
            raise ValueError(
                f"controller checkpoint {d} does not match this run: {field}={ckpt!r} in the checkpoint, "
                f"{field}={cur!r} now; retrain the controller for this configuration (stages=[controller]) "
                f"or point to the checkpoint trained for it")
    _check_safetensors_file(wpath, d)
    if "weights_sha256" in meta and file_digest(wpath) != meta["weights_sha256"]:
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath}: the weights file is truncated, "
                         f"modified or from another save; {_rebuild_hint(d)}")
    try:
        tensors = load_file(wpath)
    except Exception as e:  # safetensors raises its own error type on damaged headers / short files
        raise ValueError(f"cannot read {wpath}: {e}; the file is damaged: {_rebuild_hint(d)}") from e
    spec = coerce_spec(meta["spec"])
    controllers: dict[str, Controller] = {}
    for layer in meta["layers"]:
        key = str(layer)
        ctrl = build_controller(spec, meta["hidden_size"])
        state = {name[len(key) + 1 :]: t for name, t in tensors.items() if name.startswith(key + ".")}
        try:
            ctrl.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wpath} does not fit the architecture in {mpath} (layer {key}): {e}") from e
        controllers[key] = ctrl.eval()
    return controllers, meta
