"""The groups of every run that no stage reads: ``trainer`` (Lightning options), ``logger`` and ``paths``
(the artifact cache) (torch-free)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uzr.config.groups import ConfigGroup

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrainerSpec:
    """Lightning Trainer options for the training stages (and the harvest's accelerator)."""

    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 5


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
