"""The ``controller`` config group: architecture, loss weights and training knobs (torch-free)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.checks import check_choice, check_float, check_int, invalid
from uzr.config.fields import from_mapping
from uzr.config.groups import ConfigGroup
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

    def key(name: str) -> str:
        return f"controller.{name}"

    check_choice(key("arch"), spec.arch, ARCHS)
    check_choice(key("target"), spec.target, TARGETS)
    for name in ("key_dim", "mlp_hidden", "max_len", "locality_window", "max_epochs", "batch_size"):
        if not (name == "locality_window" and spec.locality_window is None):
            check_int(key(name), getattr(spec, name), minimum=1)
    check_int(key("num_buckets"), spec.num_buckets, minimum=2)
    check_int(key("max_distance"), spec.max_distance, minimum=spec.num_buckets // 2 + 1,
              valid=f"an integer > num_buckets // 2 = {spec.num_buckets // 2}")
    for name in ("kl_weight", "mse_weight", "stats_weight", "weight_decay", "stability_weight", "sparsity_weight",
                 "ponder_weight", "lru_exit_tol"):
        check_float(key(name), getattr(spec, name), low=0)
    if spec.kl_weight + spec.mse_weight + spec.stats_weight <= 0:
        raise invalid(key("kl_weight"), spec.kl_weight, "at least one of kl_weight, mse_weight, stats_weight > 0")
    check_choice(key("lru_halting"), spec.lru_halting, HALTING)
    check_int(key("lru_max_steps"), spec.lru_max_steps, minimum=1)
    check_float(key("lru_threshold"), spec.lru_threshold, 0, 1, open_low=True,
                valid="a number in (0, 1] (1 - eps; 1 runs lru_max_steps steps)")
    check_float(key("lr"), spec.lr, low=0, open_low=True, valid="a finite number > 0")
    return spec


def follow_harvest_window(cfg) -> None:
    """One locality window for the harvest's statistics and the controller's loss."""
    c, h = cfg.controller, cfg.harvest
    if c.locality_window is None:
        c.locality_window = h.locality_window
    elif c.locality_window != h.locality_window:
        raise ValueError(
            f"controller.locality_window={c.locality_window} differs from harvest.locality_window="
            f"{h.locality_window}: the controller's locality loss would measure another habit than the store "
            "holds; set only harvest.locality_window (the controller follows it)")


def validate_controller(cfg) -> None:
    follow_harvest_window(cfg)
    validate_spec(cfg.controller)


def coerce_spec(spec: ControllerSpec | Mapping[str, Any] | None) -> ControllerSpec:
    """ControllerSpec from a spec, a mapping (dict / OmegaConf DictConfig) or None (defaults); validated."""
    spec = from_mapping(ControllerSpec, spec, "controller")
    if spec.locality_window is None:
        spec = dataclasses.replace(spec, locality_window=LOCALITY_WINDOW)
    return validate_spec(spec)


CONFIG_GROUPS = (ConfigGroup("controller", ControllerSpec, validate_controller),)


def per_head_targets(cfg) -> bool:
    """Whether the run's targets are per head (``controller.target=per_head``; a harvest-only run without a
    controller group keeps head-mean rows)."""
    return cfg.controller is not None and cfg.controller.target == "per_head"
