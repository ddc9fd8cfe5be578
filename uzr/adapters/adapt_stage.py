"""The ``adapt`` stage: a LoRA adapter trained on the student around the teacher's attention (cached, resumable).

One artifact per arm (``adapt.*``: the attached map and the distillation weight, the adapter and its training):
``adapter.safetensors`` + ``adapter.json`` (plan, arm, per-step log, validation learning curve, time), written through
:mod:`uzr.checkpoint` and refused on load when damaged. Its key holds the harvest's key, the ``adapt`` and student
groups, the seed and trainer, and only what the arm reads besides: ``inject.*``/``alpha.*`` for an injecting arm, the
controller's key for the controller arm, the targets for distillation — so the control arm (``adapt.inject=none``,
λ = 0) of every run on one harvest is one artifact, which the report of any arm builds or reads
(:func:`control_arm`) to compare against. Training writes a Lightning checkpoint every ``adapt.checkpoint_every``
steps into the artifact's work folder: running the same command after a kill resumes there.

The report (every run, not cached) scores the arm beside the control arm and the frozen student
(:mod:`uzr.adapters.adapt_eval`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from uzr.adapters.adapt_arms import distill_targets, layers_or_all, train_texts, training_edit
from uzr.adapters.adapt_eval import adapt_report
from uzr.adapters.adapt_train import AdaptModule, step_batches
from uzr.adapters.peft_edit import BaselinePlan, PeftTrainable
from uzr.adapters.svd import target_matrices
from uzr.attention import decoder_of
from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.config.adapt import distilled_layers
from uzr.config.controller import per_head_targets
from uzr.config.keys import key_of
from uzr.harvest.stage import HarvestStage
from uzr.resumable_fit import fit_resumable
from uzr.stages import REGISTRY
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)
ADAPTER_FORMAT, ADAPTER_VERSION = "uzr.adapt", 1
WEIGHTS_FILE, META_FILE = "adapter.safetensors", "adapter.json"


@dataclasses.dataclass
class AdaptedArm:
    """A trained arm: its adapter's plan and tensors, its metadata (``adapter.json``) and its cache key."""

    plan: BaselinePlan
    state: dict
    meta: dict
    key: str

    @property
    def arm(self) -> str:
        return self.meta["arm"]["inject"]

    def adapter(self, model) -> PeftTrainable:
        """The trained adapter as an edit of ``model``."""
        return PeftTrainable(model, self.plan, self.state, self.meta["lora_alpha"])


def is_control(adapt) -> bool:
    """Whether ``adapt`` is the control arm: nothing attached, no distillation."""
    return adapt.inject == "none" and adapt.distill_weight == 0


def control_config(cfg):
    """``cfg`` with its arm replaced by the control arm (the adapter and its training unchanged)."""
    return dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, inject="none", distill_weight=0.0,
                                                              distill_layers=None))


class AdaptStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        adapt = cfg.adapt
        payload = {"harvest": upstream["harvest"], "adapt": key_of(adapt, "adapt"), "seed": cfg.seed,
                   "student": key_of(cfg.student, "adapt"), "trainer": key_of(cfg.trainer, "adapt")}
        if adapt.inject != "none":  # what the attached injector does
            payload["inject"], payload["alpha"] = key_of(cfg.inject, "adapt"), key_of(cfg.alpha, "adapt")
        if adapt.inject == "controller":
            payload["controller"] = upstream["controller"]
        if adapt.inject == "teacher" or adapt.distill_weight:  # which teacher rows: per head or head means
            payload["targets"] = {"per_head": per_head_targets(cfg), "layers": distilled_layers(cfg),
                                  "teacher_head": cfg.inject.teacher_head}
        return payload

    def build(self, run, folder: Path) -> dict:
        """Train the arm; Lightning checkpoints in ``folder/checkpoints`` let a killed run resume where it stopped."""
        cfg, adapt = run.cfg, run.cfg.adapt
        store = run.upstream(HarvestStage)
        model, _ = run.models.get("student")
        texts, curve = split_texts(train_texts(store, "train", 0, adapt.max_length, cfg.device), adapt.curve_texts)
        plan = adapter_plan(model, adapt)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial adapter for every arm
        adapter = PeftTrainable(model, plan, lora_alpha=adapt.lora_alpha)
        targets = distill_targets(run, store) if adapt.distill_weight else None
        module = AdaptModule(model, adapter, texts, step_batches(len(texts), adapt.steps, adapt.batch_size, cfg.seed),
                             training_edit(run, store, adapt.inject), targets, adapt.distill_weight, adapt.lr,
                             adapt.schedule, adapt.warmup_steps, curve, adapt.checkpoint_every)
        loader = DataLoader(list(range(adapt.checkpoint_every)), batch_size=None)  # an epoch: checkpoint_every steps
        t, clock = cfg.trainer, Stopwatch()
        resumed = fit_resumable(module, folder / "checkpoints", f"adapt ({arm_name(adapt)})", dict(
            max_epochs=-1, max_steps=adapt.steps,
            accelerator=t.accelerator, devices=1, precision=t.precision, deterministic=t.deterministic,
            logger=False, default_root_dir=str(run.out_dir), enable_model_summary=False, enable_progress_bar=False,
            num_sanity_val_steps=0), train_dataloaders=loader)
        training = {"steps": len(module.history), "train_texts": len(texts), "curve_texts": len(curve),
                    **clock.read(), "resumed": resumed}
        meta = {"student": cfg.student.name, "arm": {"inject": adapt.inject, "distill_weight": adapt.distill_weight},
                "plan": {**dataclasses.asdict(plan), "layers": list(plan.layers)}, "lora_alpha": adapt.lora_alpha,
                "parameters": plan.parameters, "history": module.history, "curve": module.curve, "training": training}
        save_checkpoint(folder, WEIGHTS_FILE, META_FILE, adapter.state(), meta, ADAPTER_FORMAT, ADAPTER_VERSION)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the finished artifact is the safetensors file
        log.info("adapt %s: %s", arm_name(adapt), training)
        return {"training": training}

    def load(self, run, folder: Path) -> AdaptedArm:
        hint = f"delete {folder} and run again with 'adapt' in stages=[...] to train the arm again"
        tensors, meta = load_checkpoint(folder, WEIGHTS_FILE, META_FILE, ADAPTER_FORMAT, ADAPTER_VERSION,
                                        {"student": run.cfg.student.name}, hint)
        plan = BaselinePlan(**{**meta["plan"], "layers": tuple(meta["plan"]["layers"])})
        return AdaptedArm(plan, dict(tensors), meta, folder.name)

    def report(self, run, artifact: AdaptedArm) -> dict:
        """The arm beside the control arm (built when missing; ``adapt.compare_control``) and the frozen student."""
        adapt = run.cfg.adapt
        roles = {"adapted": artifact}
        if adapt.compare_control and not is_control(adapt):
            roles["control"] = control_arm(run, artifact)
        return {"arm": arm_name(adapt), "adapter": {"parameters": artifact.meta["parameters"], **artifact.meta["plan"],
                                                     "lora_alpha": artifact.meta["lora_alpha"]},
                **adapt_report(run, roles)}


def split_texts(texts: list, curve_texts: int) -> tuple[list, list]:
    """(training texts, validation texts): the last ``curve_texts`` of the store's training split validate (the
    learning curve, and the learning rate's choice on the control arm); the evaluated held-out texts never do."""
    if len(texts) <= curve_texts:
        raise ValueError(f"adapt.curve_texts={curve_texts} leaves no training text of the store's {len(texts)}: lower "
                         "it or harvest more texts (data.num_texts)")
    return texts[:-curve_texts], texts[-curve_texts:]


def arm_name(adapt) -> str:
    """``control``, ``controller``, ``teacher``, ``distill λ=1`` or ``controller + distill λ=1``."""
    parts = [] if adapt.inject == "none" else [adapt.inject]
    if adapt.distill_weight:
        parts.append(f"distill λ={adapt.distill_weight:g}")
    return " + ".join(parts) or "control"


def adapter_plan(model, adapt) -> BaselinePlan:
    """LoRA of rank ``adapt.rank`` on ``adapt.matrices`` of ``adapt.layers``: the same for every arm."""
    layers = layers_or_all(adapt.layers, len(decoder_of(model).layers))
    parameters = sum(adapt.rank * (lin.in_features + lin.out_features)
                     for lin in target_matrices(model, adapt.matrices, list(layers)).values())
    return BaselinePlan("lora", adapt.matrices, layers, adapt.rank, parameters, parameters)


def control_arm(run, arm: AdaptedArm) -> AdaptedArm:
    """The control arm of this run (``arm`` itself when it is the control): the adapt stage's artifact of the run's
    config with ``adapt.inject=none``, λ = 0, built when missing (keyed and built by the stage itself)."""
    if is_control(run.cfg.adapt):
        return arm
    cfg = control_config(run.cfg)
    control_run = dataclasses.replace(run, cfg=cfg)  # shares the run's models, memo and artifact records
    stage = AdaptStage()
    upstream = {"harvest": run.info["harvest"]["key"]}
    folder, _ = control_run.artifact("adapt", stage.key_payload(cfg, upstream), lambda f: stage.build(control_run, f),
                                     version=REGISTRY["adapt"].version)
    return stage.load(control_run, folder)
