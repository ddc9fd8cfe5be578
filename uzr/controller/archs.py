"""Controller architectures: bilinear with a relative-position bias, and the reference seed MLP."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from uzr.config.controller import ControllerSpec, coerce_spec
from uzr.masks import masked_log_softmax
from uzr.reasoning import LatentReasoningUnit


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
    """Common controller API (see module docstring). Subclasses set ``query_dim`` and ``key_dim``.

    ``heads``: None predicts one distribution shared by all heads (logits (B, Sq, Sk)); an integer predicts one
    per student head (``controller.target=per_head``; logits (B, heads, Sq, Sk)).
    """

    query_dim: int
    key_dim: int

    def __init__(self, spec: ControllerSpec, hidden_size: int, heads: int | None = None):
        super().__init__()
        self.spec = spec
        self.hidden_size = int(hidden_size)
        if heads is not None and (isinstance(heads, bool) or int(heads) < 1):
            raise ValueError(f"controller heads={heads!r} is invalid; valid: None (head mean) or an integer >= 1")
        self.heads = None if heads is None else int(heads)
        self.n_out = self.heads or 1  # distributions predicted per query

    def _shaped(self, logits: Tensor) -> Tensor:
        """(B, n_out, Sq, Sk) -> (B, Sq, Sk) for a head-mean controller, unchanged per head."""
        return logits if self.heads else logits[:, 0]

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
        """h: (B, S, D) -> unmasked logits (B, S, S) (per head: (B, heads, S, S)), positions ``arange(S)``."""
        pos = torch.arange(h.shape[1], device=h.device)
        return self.logits_from_features(self.query_features(h), self.key_features(h), pos, pos)


class BilinearController(Controller):
    """``logits_ij = q(h_i) . k(h_j) / sqrt(key_dim) + b(bucket(i - j))`` — any length, expresses locality.

    Per head, each head has its own ``key_dim`` slice of the features and its own relative-position bias.
    """

    def __init__(self, spec: ControllerSpec, hidden_size: int, heads: int | None = None):
        super().__init__(spec, hidden_size, heads)
        D, Hd, dk = self.hidden_size, spec.mlp_hidden, spec.key_dim
        self.query_dim = self.key_dim = dk * self.n_out
        self.norm = nn.LayerNorm(D)  # hidden-state scales vary a lot across layers and models
        self.q = nn.Sequential(nn.Linear(D, Hd), nn.GELU(), nn.Linear(Hd, self.key_dim))
        self.k = nn.Sequential(nn.Linear(D, Hd), nn.GELU(), nn.Linear(Hd, self.key_dim))
        # Start with a mild preference for the nearest tokens; training reshapes it freely.
        bias = -0.5 * torch.log1p(torch.arange(spec.num_buckets, dtype=torch.float32))  # (num_buckets,)
        self.rel_bias = nn.Parameter(bias if self.heads is None else bias.repeat(self.heads, 1))  # ([heads,] nb)

    def query_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, key_dim)."""
        return self.q(self.norm(self._cast(h)))

    def key_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, key_dim); cacheable per decoded token."""
        return self.k(self.norm(self._cast(h)))

    def logits_from_features(self, q_feat: Tensor, k_feat: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_feat (B, Sq, n dk), k_feat (B, Sk, n dk), q_pos (Sq,)|(B, Sq), k_pos (Sk,)|(B, Sk) -> (B, Sq, Sk)
        (per head: (B, n, Sq, Sk))."""
        (B, Sq, _), Sk, n = q_feat.shape, k_feat.shape[1], self.n_out
        q = q_feat.reshape(B, Sq, n, -1).transpose(1, 2)  # (B, n, Sq, dk)
        k = k_feat.to(q_feat.dtype).reshape(B, Sk, n, -1).transpose(1, 2)  # (B, n, Sk, dk)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, n, Sq, Sk)
        q_pos = _positions(q_pos, Sq, q_feat.device)
        k_pos = _positions(k_pos, Sk, q_feat.device)
        rel = q_pos[..., :, None] - k_pos[..., None, :]  # (Sq, Sk) or (B, Sq, Sk)
        bucket = relative_bucket(rel, self.spec.num_buckets, self.spec.max_distance)
        bias = self.rel_bias.view(n, -1)[:, bucket]  # (n, Sq, Sk) or (n, B, Sq, Sk)
        if bias.dim() == 4:
            bias = bias.transpose(0, 1)
        return self._shaped(scores + bias.to(scores.dtype))


class SeedMLPController(Controller):
    """Reference ``Linear(D, H) -> ReLU -> LayerNorm -> Linear(H, max_len)`` (``H = mlp_hidden``, 512 there): logits over absolute
    key positions ``0 .. max_len - 1``, a function of the query alone.

    Query features are those ``max_len`` logits; key features are empty ``(B, Sk, 0)`` and
    ``logits_from_features`` gathers the query's logits at the absolute key positions.
    """

    def __init__(self, spec: ControllerSpec, hidden_size: int, heads: int | None = None):
        super().__init__(spec, hidden_size, heads)
        self.query_dim, self.key_dim = spec.max_len * self.n_out, 0
        width = spec.mlp_hidden  # the reference system's 512 (conf/controller/seed_mlp.yaml)
        self.net = nn.Sequential(nn.Linear(self.hidden_size, width), nn.ReLU(), nn.LayerNorm(width),
                                 nn.Linear(width, self.query_dim))

    def query_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, n max_len) logits over absolute key positions (n: 1, or heads)."""
        return self.net(self._cast(h))

    def key_features(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, 0): the seed MLP has no key side."""
        return h.new_zeros(*h.shape[:2], 0, dtype=torch.float32)

    def logits_from_features(self, q_feat: Tensor, k_feat: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_feat (B, Sq, n max_len), k_feat (B, Sk, 0), k_pos (Sk,)|(B, Sk) -> (B, Sq, Sk) (per head:
        (B, n, Sq, Sk)); q_pos unused."""
        B, Sq, _ = q_feat.shape
        n = self.n_out
        k_pos = _positions(k_pos, k_feat.shape[1], q_feat.device)
        if k_pos.numel() and int(k_pos.max()) >= self.spec.max_len:
            raise ValueError(
                f"seed_mlp controller covers key positions < max_len={self.spec.max_len}, got position "
                f"{int(k_pos.max())}; use arch=bilinear for long inputs or retrain with a larger controller.max_len")
        if k_pos.dim() == 1:
            k_pos = k_pos.expand(B, -1)
        per_key = q_feat.reshape(B, Sq, n, -1).transpose(1, 2)  # (B, n, Sq, max_len)
        return self._shaped(per_key.gather(-1, k_pos[:, None, None, :].expand(B, n, Sq, -1)))  # (B, n, Sq, Sk)

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, S, D) -> (B, S, S) logits (per head (B, heads, S, S)) over the first S absolute positions."""
        if h.shape[1] > self.spec.max_len:
            raise ValueError(
                f"seed_mlp controller handles sequences up to max_len={self.spec.max_len} tokens, got "
                f"{h.shape[1]}; shorten the inputs, raise controller.max_len and retrain, or use arch=bilinear")
        B, S, _ = h.shape
        return self._shaped(self.query_features(h).reshape(B, S, self.n_out, -1)[..., :S].transpose(1, 2))


class LRUController(BilinearController):
    """The bilinear controller whose query/key features a latent reasoning unit refines first:
    ``c = W h`` (key_dim), ``c' = LRU(c)`` iterated with halting (``spec.lru_*``), then
    ``q = W_q c'``, ``k = W_k c'`` and the bilinear logits with the relative-position bias.

    The LRU mixes no positions (``mix_kernel=1``), so each position's features depend on its own hidden
    state only and key features stay cacheable per decoded token. ``last_aux`` holds the auxiliary
    losses of the latest call and ``last_steps`` (B, S) its iterations N per position.
    """

    def __init__(self, spec: ControllerSpec, hidden_size: int, heads: int | None = None):
        super().__init__(spec, hidden_size, heads)
        dk = spec.key_dim
        self.inp = nn.Sequential(nn.Linear(self.hidden_size, spec.mlp_hidden), nn.GELU(), nn.Linear(spec.mlp_hidden, dk))
        self.lru = LatentReasoningUnit(dk, max_steps=spec.lru_max_steps, mode=spec.lru_halting,
                                       threshold=spec.lru_threshold, exit_tol=spec.lru_exit_tol, mix_kernel=1)
        self.q, self.k = nn.Linear(dk, self.key_dim), nn.Linear(dk, self.key_dim)  # key_dim = n dk
        self.last_aux: dict[str, Tensor] = {}
        self.last_steps: Tensor | None = None

    def refine(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """h: (B, S, D) -> refined latent (B, S, key_dim); records ``last_aux`` and ``last_steps``."""
        out = self.lru(self.inp(self.norm(self._cast(h))), mask)
        self.last_aux, self.last_steps = out.aux, out.halted.steps
        return out.output

    def query_features(self, h: Tensor) -> Tensor:
        return self.q(self.refine(h))

    def key_features(self, h: Tensor) -> Tensor:
        return self.k(self.refine(h))

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """h: (B, S, D) -> (B, S, S) logits; the LRU runs once for both sides (mask: (B, S) real tokens)."""
        c = self.refine(h, mask)
        pos = torch.arange(h.shape[1], device=h.device)
        return self.logits_from_features(self.q(c), self.k(c), pos, pos)


def mean_row_logprobs(logits: Tensor, allowed: Tensor) -> Tensor:
    """Log-probabilities (B, Sq, Sk) of a controller's row as one distribution: its own for a head-mean
    controller, the mean of the heads' distributions for a per-head one (what the gate's features and the
    entropy schedule read). logits: (B, Sq, Sk) or (B, H, Sq, Sk); allowed: (B|1, Sq, Sk) bool."""
    if logits.dim() == 3:
        return masked_log_softmax(logits, allowed)
    logp = masked_log_softmax(logits, allowed[:, None].expand_as(logits))  # (B, H, Sq, Sk)
    mean = torch.logsumexp(logp, 1) - math.log(logits.shape[1])  # (B, Sq, Sk)
    return torch.where(allowed, mean, logp[:, 0])


# One line per architecture (its name also goes into uzr.config.controller.ARCHS, which validates configs
# without importing torch); a new controller (e.g. an iterative latent-reasoning one) subclasses Controller.
CONTROLLERS: dict[str, type[Controller]] = {"bilinear": BilinearController, "seed_mlp": SeedMLPController,
                                             "lru": LRUController}


def build_controller(spec: ControllerSpec | Mapping[str, Any] | None, hidden_size: int,
                     heads: int | None = None) -> Controller:
    """Instantiate the architecture named by ``spec.arch``; ``heads``: one distribution per head (per_head)."""
    spec = coerce_spec(spec)
    return CONTROLLERS[spec.arch](spec, hidden_size, heads)
