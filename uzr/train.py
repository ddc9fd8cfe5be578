"""Hydra entry point: ``python -m uzr.train +experiment=NAME key=value ...`` (``-m`` for sweeps)."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from uzr.config import resolve_config

# Offline first: nothing in a default run may reach the network (DESIGN.md §10).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_name(hydra_cfg) -> str:
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("+experiment")]
    return ",".join(overrides) or "default"


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_cfg = resolve_config(cfg)  # fails before any model loads
    from uzr.pipeline import run  # heavy imports after validation

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    metrics = run(run_cfg, out_dir, config_dict, f"{cfg.name}:{run_name(hydra_cfg)}")
    ev = metrics.get("evaluate")
    return ev["bits_per_byte"]["injected"] if ev else None


if __name__ == "__main__":
    main()
