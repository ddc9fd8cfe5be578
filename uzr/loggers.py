"""Experiment loggers: W&B (offline unless the user opts in) through Lightning, and CSV."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from uzr.environment import package_versions


def wandb_config(config: dict, prefix: str = "") -> dict:
    """The run config flattened to ``{"alpha.value": 0.5, "inject.layers": "[8,15,22]", ...}``.

    Flat dotted keys are what the W&B UI offers as axes and group-by keys; lists of scalars become
    strings spelled like the command-line override (``[8,15,22]``), so a layer set is one category.
    """
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(wandb_config(value, name + "."))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value):
            flat[name] = "[" + ",".join(str(v) for v in value) + "]"
        else:
            flat[name] = value
    return flat


def make_loggers(spec, out_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """Loggers for one run; W&B files go to ``out_dir/wandb`` (sync later with ``wandb sync``).

    One W&B run per Hydra job: named by the job's overrides, grouped by ``spec.group`` (a multirun
    sets it to the sweep folder), with the flattened config (:func:`wandb_config`) and the versions of
    the packages it ran with (``versions.transformers``, ...).
    """
    loggers: list[Logger] = []
    if spec.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    if spec.wandb and spec.wandb_mode != "disabled":
        # Offline by default: the environment may pin it (WANDB_MODE) but a config opt-in wins.
        mode = spec.wandb_mode if spec.wandb_mode == "online" else os.environ.get("WANDB_MODE", "offline")
        loggers.append(wandb_logger(
            project=spec.project, name=run_name, group=spec.group, save_dir=str(out_dir), mode=mode,
            config=wandb_config({**config, "versions": package_versions()}), reinit="finish_previous",
        ))
    return loggers


def wandb_logger(**kwargs) -> WandbLogger:
    """Lightning's WandbLogger without the ``anonymous`` argument it always hands to ``wandb.init``.

    Lightning passes ``anonymous=None`` when not asked for anything, and wandb (0.31 in the lock) warns "The
    anonymous setting has no effect and will be removed" for *any* value passed; left out, the setting is
    unset and wandb stays quiet. Only Lightning's own default is removed: uzr never asks for anonymity.
    """
    logger = WandbLogger(**kwargs)
    init = getattr(logger, "_wandb_init", None)  # the keyword arguments of the deferred wandb.init
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


def log_summary(loggers: list[Logger], metrics: dict[str, float], images: dict[str, Path] | None = None,
                tables: dict[str, tuple[list[str], list[list]]] | None = None) -> None:
    """Final numbers (flat ``name -> float``), figures and tables (``key -> (header, rows)``)."""
    for logger in loggers:
        logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            for key, path in (images or {}).items():
                logger.log_image(key=key, images=[str(path)])
            for key, (header, rows) in (tables or {}).items():
                logger.log_table(key=key, columns=header, data=rows)
            logger.experiment.summary.update(metrics)
        logger.save()


def finish(loggers: list[Logger]) -> None:
    """Close the W&B run: each job of a Hydra multirun must get its own."""
    for logger in loggers:
        logger.finalize("success")
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
