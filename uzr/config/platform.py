"""The groups of every run that no stage reads: ``trainer`` (Lightning options), ``logger`` and ``paths``
(the artifact cache) (torch-free)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from uzr.config.groups import ConfigGroup
from uzr.config.keys import keyed_only_by

WANDB_MODES = ("offline", "online", "disabled")
# The artifacts whose keys hold every trainer.* field (see TrainerSpec).
TRAINER_KEYED_BY = ("controller", "svf", "svf_baselines", "lru_mla", "lru_mla_group", "lru_mla_pretrained",
                    "lru_mla_pretrained_group")


@dataclass
class TrainerSpec:
    """Lightning Trainer options for the training stages (and the harvest's accelerator)."""

    accelerator: str = "cpu"
    # log_every_n_steps never changes a trained artifact, devices and strategy not on one device; the three were in
    # the keys of the stages that existed when the key rule was written: keyed there (those keys stay), left out of
    # the gate's and of every later stage's.
    devices: int = field(default=1, metadata=keyed_only_by(*TRAINER_KEYED_BY))
    strategy: str = field(default="auto", metadata=keyed_only_by(*TRAINER_KEYED_BY))
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = field(default=5, metadata=keyed_only_by(*TRAINER_KEYED_BY))


@dataclass
class LoggerSpec:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "uzr"
    group: str | None = None
    csv: bool = True


@dataclass
class PathsSpec:
    # Shared artifact cache (harvest stores, controllers, gates, converted models), reused across runs
    # and sweeps. None: $UZR_CACHE if set, else .cache/uzr under the directory you launch from.
    cache_dir: str | None = None


def resolve_cache_dir(value: str | None = None) -> Path:
    """The artifact cache folder: ``value``, else ``$UZR_CACHE``, else ``./.cache/uzr``."""
    value = value or os.environ.get("UZR_CACHE")
    return Path(value).expanduser() if value else Path.cwd() / ".cache" / "uzr"


def validate_logger(cfg) -> None:
    if cfg.logger.wandb_mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb_mode={cfg.logger.wandb_mode!r}; valid choices: {', '.join(WANDB_MODES)}")


CONFIG_GROUPS = (
    ConfigGroup("trainer", TrainerSpec, always=True),
    ConfigGroup("logger", LoggerSpec, validate_logger, always=True),
    ConfigGroup("paths", PathsSpec, always=True),
)
