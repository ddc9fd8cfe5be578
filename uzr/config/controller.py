"""The ``controller`` config group: architecture, loss weights and training knobs (torch-free)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.fields import from_mapping
from uzr.config.keys import KEYED_UNLESS_DEFAULT

ARCHS = ("bilinear", "seed_mlp", "lru")
# What the controller predicts (issue 13): the teacher's head-mean distribution, shared by every student head,
# or one distribution per student head, from the teacher head matched to it (uzr.harvest.head_matching).
TARGETS = ("head_mean", "per_head")
HALTING = ("act", "fixed", "latent", "kl")  # uzr.reasoning.act.MODES
LOCALITY_WINDOW = 8  # the default locality window (tokens), for the harvest and the controller alike


@dataclass
class ControllerSpec:
    """Controller architecture, loss weights and training hyperparameters (Hydra structured config)."""

    arch: str = "bilinear"  # "bilinear" | "seed_mlp" | "lru" (bilinear whose features an LRU refines)
    # one of TARGETS; per_head: one distribution per student (query) head (keyed unless the default: head-mean
    # controllers keep the keys they had before targets existed)
    target: str = field(default="head_mean", metadata=KEYED_UNLESS_DEFAULT)
    key_dim: int = 64  # bilinear: width of query/key features
    mlp_hidden: int = 128  # bilinear: hidden width of the q/k MLPs
    num_buckets: int = 32  # bilinear: relative-distance buckets (exact below num_buckets // 2, log beyond)
    max_distance: int = 1024  # distance mapped to the last bucket; also the recency prior's range
    max_len: int = 256  # seed_mlp only: number of absolute key positions it can address
    kl_weight: float = 1.0
    mse_weight: float = 0.1
    stats_weight: float = 0.0
    # Keys with i - j < window count as local (DESIGN.md §4). None: harvest.locality_window in a run
    # (the loss must measure the habit the store holds), LOCALITY_WINDOW standalone.
    locality_window: int | None = None
    # lru only: the latent reasoning unit refining the query/key features (uzr.reasoning)
    lru_max_steps: int = 8  # T_max
    lru_halting: str = "act"  # act | fixed | latent | kl
    lru_threshold: float = 0.99  # act: halt when the summed halting probabilities reach it (1 - eps)
    lru_exit_tol: float = 0.01  # latent | kl: exit when the change falls below it
    stability_weight: float = 0.1  # ZeroModel's auxiliary loss weights (prediction = kl/mse above)
    sparsity_weight: float = 0.01
    ponder_weight: float = 0.001
    lr: float = 3e-3
    weight_decay: float = 0.01
    max_epochs: int = 20
    batch_size: int = 8


def validate_spec(spec: ControllerSpec) -> ControllerSpec:
    """Check every field; raise ValueError naming the key, its value and what is valid."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"controller.{key}={getattr(spec, key)!r} is invalid; valid: {valid}")

    if spec.arch not in ARCHS:
        raise bad("arch", " | ".join(ARCHS))
    if spec.target not in TARGETS:
        raise bad("target", " | ".join(TARGETS))
    for key in ("key_dim", "mlp_hidden", "max_len", "locality_window", "max_epochs", "batch_size"):
        v = getattr(spec, key)
        if key == "locality_window" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, "an integer >= 1")
    if isinstance(spec.num_buckets, bool) or not isinstance(spec.num_buckets, int) or spec.num_buckets < 2:
        raise bad("num_buckets", "an integer >= 2")
    if not isinstance(spec.max_distance, int) or spec.max_distance <= spec.num_buckets // 2:
        raise bad("max_distance", f"an integer > num_buckets // 2 = {spec.num_buckets // 2}")
    for key in ("kl_weight", "mse_weight", "stats_weight", "weight_decay", "stability_weight", "sparsity_weight",
                "ponder_weight", "lru_exit_tol"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(key, "a finite number >= 0")
    if spec.kl_weight + spec.mse_weight + spec.stats_weight <= 0:
        raise bad("kl_weight", "at least one of kl_weight, mse_weight, stats_weight > 0")
    if spec.lru_halting not in HALTING:
        raise bad("lru_halting", " | ".join(HALTING))
    if isinstance(spec.lru_max_steps, bool) or not isinstance(spec.lru_max_steps, int) or spec.lru_max_steps < 1:
        raise bad("lru_max_steps", "an integer >= 1")
    t = spec.lru_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise bad("lru_threshold", "a number in (0, 1] (1 - eps; 1 runs lru_max_steps steps)")
    if isinstance(spec.lr, bool) or not isinstance(spec.lr, (int, float)) or not (0 < spec.lr < math.inf):
        raise bad("lr", "a finite number > 0")
    return spec


def coerce_spec(spec: ControllerSpec | Mapping[str, Any] | None) -> ControllerSpec:
    """ControllerSpec from a spec, a mapping (dict / OmegaConf DictConfig) or None (defaults); validated."""
    spec = from_mapping(ControllerSpec, spec, "controller")
    if spec.locality_window is None:
        spec = dataclasses.replace(spec, locality_window=LOCALITY_WINDOW)
    return validate_spec(spec)
