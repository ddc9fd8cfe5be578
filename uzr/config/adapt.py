"""The ``adapt`` config group: a LoRA adapter trained on the student around the teacher's attention (torch-free).

Arms (``adapt.inject``): ``none`` (the control: plain LoRA), ``controller`` (the run's injector attached during
training and evaluation: attention copy of the controller's map), ``teacher`` (the oracle's stored aligned rows
attached alike: attention copy, the ceiling); ``adapt.distill_weight`` > 0 adds ``λ · KL(teacher rows || student
rows)`` at the mapped layers (attention distillation). Every arm has the same adapter, steps, schedule and data
(the budget is matched by construction: only ``inject`` and ``distill_weight`` differ between arms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uzr.config.checks import check_choice, check_float, check_int, invalid
from uzr.config.groups import ConfigGroup
from uzr.config.keys import NOT_KEYED

ARMS = ("none", "controller", "teacher")  # adapt.inject
MATRICES = ("attn", "mlp", "mlp+attn")  # uzr.adapters.svd.target_matrices
SCHEDULES = ("constant", "cosine")  # learning rate after the linear warm-up


@dataclass
class AdaptSpec:
    inject: str = "none"  # none | controller | teacher: what is attached to the student while it trains and is scored
    # λ of λ · KL(teacher's aligned rows || student's rows), mean over the mapped layers' rows (per head after the
    # store's head matching with controller.target=per_head, else of the head means); 0 = next-token loss only
    distill_weight: float = 0.0
    distill_layers: list[int] | None = None  # layers distilled (null: inject.layers, the store's mapped layers)
    matrices: str = "attn"  # LoRA on each chosen layer's attention projections (attn), MLP (mlp) or both
    layers: list[int] | None = None  # decoder layers adapted (null: every layer)
    rank: int = 2
    lora_alpha: float | None = None  # LoRA scale alpha / rank (null: alpha = rank, a scale of 1 as in svf_baselines)
    steps: int = 40  # optimiser steps (every arm the same)
    batch_size: int = 2  # training texts per step
    max_length: int = 128  # tokens of each training text (its leading ones; at most the store's rows)
    lr: float = 3e-3  # Adam; each experiment sets the rate chosen on its control arm (docs/adaptation.md)
    schedule: str = "cosine"  # constant | cosine decay to 0 after warm-up
    warmup_steps: int = 5
    checkpoint_every: int = 10  # steps between Lightning checkpoints (resume points) and held-out curve points
    # validation texts (the last ones of the harvest's training split, not trained on) whose loss is recorded every
    # checkpoint_every steps: the learning curve, and what the learning rate is chosen on (control arm)
    curve_texts: int = 6
    # evaluation of the trained arm beside the control arm and the frozen student (not part of the adapter's key)
    compare_control: bool = field(default=True, metadata=NOT_KEYED)  # train/load the control arm and compare
    # QA for the teacher arm needs the live oracle on every prompt (minutes: evaluate.oracle_qa's cost)
    teacher_qa: bool = field(default=False, metadata=NOT_KEYED)


def validate_adapt(spec: AdaptSpec, num_layers: int | None = None, inject_layers: list[int] | None = None) -> None:
    """Raise ValueError naming ``adapt.<field>``, its value and what is valid."""
    check_choice("adapt.inject", spec.inject, ARMS,
                 " | ".join(ARMS) + " (none: the control; controller / teacher: that map attached)")
    check_float("adapt.distill_weight", spec.distill_weight, low=0, valid="a number >= 0 (0 = no distillation)")
    check_choice("adapt.matrices", spec.matrices, MATRICES)
    check_choice("adapt.schedule", spec.schedule, SCHEDULES)
    for name in ("rank", "steps", "batch_size", "checkpoint_every", "curve_texts"):
        check_int(f"adapt.{name}", getattr(spec, name), minimum=1)
    check_int("adapt.max_length", spec.max_length, minimum=2)
    check_int("adapt.warmup_steps", spec.warmup_steps, minimum=0)
    check_float("adapt.lr", spec.lr, low=0, open_low=True, valid="a number > 0")
    if spec.lora_alpha is not None:
        check_float("adapt.lora_alpha", spec.lora_alpha, low=0, open_low=True, valid="null (= rank) or a number > 0")
    for name in ("layers", "distill_layers"):
        layers = getattr(spec, name)
        if layers is None:
            continue
        if not layers or len(set(layers)) != len(layers):
            raise invalid(f"adapt.{name}", layers, "null or a non-empty list of distinct layer indices")
        if num_layers is not None and any(not 0 <= x < num_layers for x in layers):
            raise invalid(f"adapt.{name}", layers, f"indices in 0..{num_layers - 1} (the student's layers)")
    if spec.distill_layers is not None and inject_layers is not None:
        unmapped = sorted(set(spec.distill_layers) - set(inject_layers))
        if unmapped:
            raise invalid("adapt.distill_layers", spec.distill_layers,
                          f"layers of inject.layers={list(inject_layers)} (the harvest stores teacher rows only for "
                          f"those; {unmapped} have none)")


def distilled_layers(cfg) -> list[int]:
    """The layers the distillation term reads: ``adapt.distill_layers``, or every injected (mapped) layer."""
    return list(cfg.adapt.distill_layers if cfg.adapt.distill_layers is not None else cfg.inject.layers)


def controller_needs(cfg) -> dict[str, str]:
    """The adapt stage needs the controller only for the controller arm."""
    if cfg.adapt is None or cfg.adapt.inject != "controller":
        return {}
    return {"controller": "adapt.inject=controller attaches the controller's injector while the adapter trains"}


def validate_adapt_group(cfg) -> None:
    """The adapt group against the student's depth and the injected layers; the arms inject through ``inject.*``."""
    student, inject = cfg.student, cfg.inject
    validate_adapt(cfg.adapt, student and student.loaded_layers, inject and list(inject.layers))
    if inject is not None and inject.heads == "auto":
        raise invalid("inject.heads", inject.heads, "null or a list of [layer, head] pairs with the adapt stage "
                                                    "(a per-head profile of an adapted student is not defined)")
    if inject is not None and inject.source != "controller":
        raise invalid("inject.source", inject.source, "controller with the adapt stage (adapt.inject chooses the "
                                                      "attached map: none | controller | teacher)")
    if cfg.alpha is not None and cfg.alpha.schedule == "gated":
        raise invalid("alpha.schedule", cfg.alpha.schedule, "constant | linear | cosine | entropy_local with the "
                                                            "adapt stage (it trains no gate)")


CONFIG_GROUPS = (ConfigGroup("adapt", AdaptSpec, validate_adapt_group),)
