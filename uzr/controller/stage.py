"""The controller stage: one controller per injected layer, trained on the harvest store (Lightning)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning as L

from uzr.config import RunConfig
from uzr.config.controller import per_head_targets
from uzr.config.keys import key_of
from uzr.controller.checkpoint import load_controller, save_controller
from uzr.controller.data import StoreDataModule
from uzr.controller.module import METHODS, ControllerModule
from uzr.harvest.stage import HarvestStage
from uzr.resumable_fit import fit_resumable


class ControllerStage:
    def key_payload(self, cfg: RunConfig, upstream: Mapping[str, str]) -> dict:
        return {"harvest": upstream["harvest"], "controller": key_of(cfg.controller, "controller"),
                "layers": list(cfg.inject.layers), "seed": cfg.seed, "trainer": key_of(cfg.trainer, "controller")}

    def build(self, run, folder: Path) -> dict:
        """Fit the controllers; Lightning checkpoints in ``folder`` let a killed run resume where it stopped."""
        cfg, store = run.cfg, run.upstream(HarvestStage)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        per_head = per_head_targets(cfg)
        datamodule = StoreDataModule(store, cfg.inject.layers, cfg.controller.batch_size, cfg.seed, per_head)
        heads = store.layout.student_num_heads if per_head else None  # one distribution per student head
        module = ControllerModule(store.layout.hidden_size, cfg.inject.layers, cfg.controller, heads)
        t = cfg.trainer
        checkpoints = folder / "checkpoints"
        resumed = fit_resumable(module, checkpoints, "controller", dict(
            max_epochs=cfg.controller.max_epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
            precision=t.precision, deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
            logger=run.loggers or False, default_root_dir=str(run.out_dir), enable_model_summary=False,
        ), datamodule=datamodule)
        report = module.heldout_report()
        save_controller(module, folder, {"student": cfg.student.name, "heldout": report})
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished artifact is the safetensors file
        return {"heldout": report, "resumed": resumed}

    def load(self, run, folder: Path) -> ControllerArtifact:
        """``{layer (int): Controller}`` on the run's device, in eval mode; the metadata goes to ``self``."""
        cfg = run.cfg
        controllers, meta = load_controller(folder, expected={
            "student": cfg.student.name, "hidden_size": cfg.student.hidden_size, "layers": list(cfg.inject.layers),
        })
        return ControllerArtifact({int(k): v.to(cfg.device).eval() for k, v in controllers.items()}, meta)

    def report(self, run, artifact: ControllerArtifact) -> dict:
        return heldout_summary(artifact.meta["heldout"], run.cfg.inject.layers)


@dataclasses.dataclass
class ControllerArtifact:
    controllers: dict  # layer (int) -> Controller
    meta: dict  # controller.json: spec, layers, held-out report


def heldout_summary(report: dict, layers: list[int]) -> dict:
    """Held-out KL of the controller beside its baselines, pooled and per layer."""
    summary = {"heldout_kl": {m: report.get(f"val/kl/{m}") for m in METHODS}}
    summary["heldout_kl_by_layer"] = {
        f"L{layer}": {m: report.get(f"val/kl/L{layer}/{m}") for m in METHODS} for layer in layers
    }
    lru = {k.removeprefix("val/lru/"): v for k, v in report.items() if k.startswith("val/lru/")}
    if lru:  # controller=lru: mean iterations per text and their correlation with teacher attention entropy
        summary["lru"] = lru
    return summary
