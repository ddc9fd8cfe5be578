"""Hydra entry point: ``python -m uzr.train +experiment=NAME key=value ...`` (``-m`` for sweeps).

A config error (a bad value, an unknown key or option) prints one line, ``error: <key>=<value> ...: <what is
valid>``, and exits with status 2; a failure of a run keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uzr.config import register_configs, resolve_config
from uzr.environment import machine_info, package_versions
from uzr.quiet import quiet_third_party

# Offline first: nothing in a default run may reach the network (DESIGN.md §10).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
quiet_third_party()  # known third-party noise only (uzr/quiet.py); every other warning still shows

register_configs()  # the schema is the first default of conf/train.yaml
JOB_INFO = "job.json"  # machine and wall time of one run, beside metrics.json (read by uzr.report)


def run_name(hydra_cfg) -> str:
    """The W&B run name: the job's own overrides (a multirun job: its point of the grid)."""
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("experiment")]
    return ",".join(overrides) or "default"


def sweep_group(hydra_cfg) -> str | None:
    """W&B group of a multirun job: its sweep folder, so every job of one sweep lands in one group.

    The folder is named relative to ``outputs/multirun`` with ``/`` -> ``_``
    (``outputs/multirun/2026-01-31/12-00-00-123456`` -> ``2026-01-31_12-00-00-123456``); a sweep
    folder elsewhere (``hydra.sweep.dir=...``) gives its own name. ``None`` for a single run.
    """
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    cwd = Path(hydra_cfg.runtime.cwd)
    sweep = Path(str(hydra_cfg.sweep.dir))
    sweep = (sweep if sweep.is_absolute() else cwd / sweep).resolve()
    try:
        parts = sweep.relative_to((cwd / "outputs" / "multirun").resolve()).parts
    except ValueError:
        parts = (sweep.name,)
    return "_".join(parts)[:128] or None  # W&B caps group names at 128 characters


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        run_cfg = resolve_config(cfg)  # fails before any model loads
    except (ValueError, FileNotFoundError) as err:
        config_error(err)
    from uzr.runner import run  # heavy imports after validation

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    config_dict = OmegaConf.to_container(OmegaConf.structured(run_cfg))  # resolved, every default filled in
    group = sweep_group(hydra_cfg)
    if run_cfg.logger.group is None and group is not None:  # an explicit logger.group wins
        run_cfg.logger.group = config_dict["logger"]["group"] = group
    OmegaConf.save(OmegaConf.create(config_dict), out_dir / "config.yaml")
    started = time.time()
    metrics = run(run_cfg, out_dir, config_dict, f"{cfg.name}:{run_name(hydra_cfg)}")
    (out_dir / JOB_INFO).write_text(json.dumps({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "started_unix": started,
        "wall_s": round(time.time() - started, 2), "machine": machine_info(), "versions": package_versions(),
        "hydra_mode": str(hydra_cfg.mode.name if hydra_cfg.mode else None), "wandb_group": run_cfg.logger.group,
    }, indent=2))
    ev = metrics.get("evaluate")
    return ev["bits_per_byte"]["injected"] if ev and "bits_per_byte" in ev else None


def config_error(err: BaseException) -> None:
    """Exit with status 2 and the error on one line of stderr: a config error is fixed by its message, and its
    traceback would only hide it."""
    text = str(err).split("Config search path")[0]  # Hydra's unknown option: keep the options, not the search path
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):  # an override Hydra could not merge: OmegaConf says why
        text += f": {cause.msg.splitlines()[0]} (key: {cause.full_key})"
    print("error: " + " ".join(text.split()), file=sys.stderr)  # Hydra's option lists span lines
    sys.exit(2)


def cli() -> None:
    """``main`` with errors of composition (an override Hydra cannot merge, an unknown option) on one line too:
    Hydra prints those itself unless it may raise them (HYDRA_FULL_ERROR)."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, MissingConfigException) as err:
        config_error(err)


if __name__ == "__main__":
    cli()
