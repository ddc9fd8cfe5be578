"""The stage registry: every unit of cached work uzr knows, what it needs and which config it reads.

A stage is a name, the stages whose artifacts it needs, the config groups it reads, a version (bump it
when its artifact changes meaning, so old caches are rebuilt rather than misread) and an
implementation (a class with ``key_payload``, ``build``, ``load`` and ``report``, see :class:`Stage`).
The implementation is named by import path and imported only when the stage runs: this module, and
config validation that reads it, stay free of torch.

A need that depends on the config (the dominance stage needs the controller only when it measures an
injected student) is declared by the stage line too: ``needs_when`` names a torch-free function
``(cfg) -> {stage: why}``, and the planner (:func:`plan`) adds those stages like fixed needs, the runner
builds them when missing (:func:`builders`) and a config lacking a group they read is told why. The converse,
``unneeded_when``, names the fixed needs that some settings do without (the evaluate stage needs no controller for
``inject.source=emphasis``, which steers the student's own attention): the planner leaves them out.

``python -m uzr.stages`` prints the registry: the built-in lines of :data:`REGISTRY` and those of systems
plugged in through ``uzr.systems`` entry points (:mod:`uzr.config.systems`). Neither the runner
(:mod:`uzr.runner`) nor the schema changes for a new system.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from uzr.config import RunConfig
    from uzr.runner import RunContext


class Stage(Protocol):
    """What a stage's implementation provides (one instance per run)."""

    def key_payload(self, cfg: RunConfig, upstream: Mapping[str, str]) -> dict:
        """Everything that determines the artifact, as JSON-able data (``upstream``: needed stages' keys)."""

    def build(self, run: RunContext, folder: Path) -> dict | None:
        """Write the artifact into ``folder``; returns extras for its manifest."""

    def load(self, run: RunContext, folder: Path) -> Any:
        """The artifact in ``folder`` as the objects later stages use."""

    def report(self, run: RunContext, artifact: Any) -> dict | None:
        """This run's metrics of the stage (its section of ``metrics.json``), or None."""


class UncachedStage:
    """Base of a stage registered with ``cached=False`` (evaluations that run in every run): it has nothing to
    key, build or load, only :meth:`report`."""

    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        return {}

    def build(self, run, folder: Path) -> None:
        return None

    def load(self, run, folder: Path) -> None:
        return None


@dataclass(frozen=True)
class StageInfo:
    name: str
    needs: tuple[str, ...]  # stages whose artifacts this one uses
    reads: tuple[str, ...]  # config groups it needs (required and validated only when the stage runs)
    version: int  # part of the cache key
    impl: str  # "module:Class" of its Stage implementation
    cached: bool = True  # False: run every time, nothing stored in the artifact cache
    summary: str = ""
    optional: tuple[str, ...] = ()  # config groups it reads when the config has them
    default: bool = False  # selected when the config names no stages
    # "module:function" (torch-free): cfg -> {stage: why} of the stages it needs only for some settings
    needs_when: str = ""
    # "module:function" (torch-free): cfg -> {stage: why} of the fixed needs that the settings of cfg do without
    unneeded_when: str = ""

    def implementation(self) -> Stage:
        return _named(self.impl)()

    def needs_for(self, cfg: RunConfig | None) -> dict[str, str]:
        """The stages this one needs in the run of ``cfg``: ``{name: why}``, why = "" for its fixed ``needs``
        (those ``unneeded_when`` names for ``cfg`` left out; ``cfg`` None: the fixed needs only)."""
        unneeded = _named(self.unneeded_when)(cfg) if self.unneeded_when and cfg is not None else {}
        return {**dict.fromkeys((n for n in self.needs if n not in unneeded), ""), **self.settings_needs(cfg)}

    def settings_needs(self, cfg: RunConfig | None) -> dict[str, str]:
        """``{name: why}`` of the stages this one needs only for the settings of ``cfg`` (``needs_when``), beyond
        its fixed ``needs``."""
        if not self.needs_when or cfg is None:
            return {}
        return {need: why for need, why in _named(self.needs_when)(cfg).items() if need not in self.needs}


def _named(path: str) -> Any:
    """The object that ``"module:name"`` names."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, StageInfo] = {s.name: s for s in (
    StageInfo("harvest", (), ("teacher", "student", "data", "harvest", "trainer"), 3,
              "uzr.harvest.stage:HarvestStage", optional=("inject",), default=True,  # stores harvest + inject layers
              summary="teacher and student attention statistics on a corpus -> Arrow store"),
    StageInfo("controller", ("harvest",), ("student", "inject", "controller", "trainer"), 1,
              "uzr.controller.stage:ControllerStage", default=True,
              summary="controllers predicting the teacher's attention from student states -> safetensors"),
    StageInfo("gate", ("controller",), ("teacher", "student", "inject", "alpha", "gate", "evaluate", "trainer"), 1,
              "uzr.gate.stage:GateStage", default=True,
              summary="when to inject, and gated vs constant alpha on facts QA and bits per byte"),
    StageInfo("evaluate", ("controller",), ("teacher", "student", "inject", "alpha", "gate", "harvest", "evaluate"),
              1, "uzr.evaluate.stage:EvaluateStage", cached=False, default=True,
              unneeded_when="uzr.config.inject:evaluate_unneeded",  # emphasis alone: no controller, no harvest
              summary="bits per byte, facts QA, habit distance and heatmaps, injected vs not vs teacher"),
    StageInfo("dominance", (), ("dominance",), 1, "uzr.dominance.stage:DominanceStage", cached=False,
              optional=("teacher", "student", "data", "inject", "alpha"),
              needs_when="uzr.config.dominance:injection_needs",  # the controller when it measures "injected"
              summary="attention dominance (MDI / AEI / A_T) per layer and stage on two token groups"),
    StageInfo("svf", (), ("student", "svf", "trainer"), 1, "uzr.adapters.stage:SVFStage",
              optional=("teacher",),  # svf.objective=distill
              summary="one singular-value (SVF) expert per domain, REINFORCE or distilled -> safetensors"),
    StageInfo("svf_baselines", (), ("student", "svf", "trainer"), 1, "uzr.adapters.baselines:SVFBaselinesStage",
              summary="LoRA and IA3 (peft) per domain at an SVF expert's parameter count, lr tuned on validation"),
    StageInfo("svf_eval", ("svf",), ("student", "svf"), 1, "uzr.adapters.evaluation:SVFEvalStage", cached=False,
              optional=("alpha",), needs_when="uzr.config.svf:injection_needs",  # svf.injection: its row
              summary="SVF accuracy matrix (base + experts x domains) and adaptation strategies vs base"),
    StageInfo("adapt", ("harvest",), ("teacher", "student", "inject", "alpha", "adapt", "harvest", "evaluate",
                                       "gate", "trainer"), 1, "uzr.adapters.adapt_stage:AdaptStage",
              optional=("controller",),  # controller.target: per-head or head-mean teacher rows
              needs_when="uzr.config.adapt:controller_needs",  # the controller for adapt.inject=controller
              summary="LoRA trained around the teacher's attention (attention copy / distillation) vs plain LoRA"),
    StageInfo("lru_mla", (), ("lru_mla", "trainer"), 1, "uzr.reasoning.stage:LRUMLAStage",
              summary="four groups trained on causal-loop tasks: attention, MLA, MLA + LRU fixed, MLA + LRU + ACT"),
    StageInfo("lru_mla_pretrained", (), ("lru_mla", "student", "trainer"), 1,
              "uzr.reasoning.pretrained_stage:PretrainedLRUMLAStage",
              summary="the four groups on the pretrained student's top layers (MLA converted from its weights), "
                      "few-shot"),
)}


def registry() -> dict[str, StageInfo]:
    """Every stage: :data:`REGISTRY` and the lines of the systems plugged in through entry points."""
    # Not at the top: uzr.config imports this module, and a plugged-in system imports uzr.config (its groups), which
    # builds the schema from the plugged-in systems; loading them through uzr.config keeps that order.
    from uzr.config.systems import plugged_in_stages

    stages = dict(REGISTRY)
    for info in plugged_in_stages():
        if info.name in stages:
            raise ValueError(f"stage {info.name!r} of a plugged-in system is already registered: "
                             f"{stages[info.name].impl} and {info.impl}")
        stages[info.name] = info
    return stages


def unknown_stages(names: Iterable[str]) -> list[str]:
    stages = registry()
    return [n for n in names if n not in stages]


def plan(selected: Iterable[str], cfg: RunConfig | None = None) -> list[StageInfo]:
    """The selected stages and everything they need in the run of ``cfg`` (fixed needs only when None),
    in dependency order (needs first)."""
    stages, selected = registry(), list(selected)
    order: list[StageInfo] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"stage dependency cycle: {' -> '.join((*path, name))}")
        if any(s.name == name for s in order):
            return
        info = stages[name]
        for need in info.needs_for(cfg):
            visit(need, (*path, name))
        order.append(info)

    bad = unknown_stages(selected)
    if bad:
        raise ValueError(f"stages={selected}: unknown {bad}; valid stages: {', '.join(stages)}")
    for name in stages:  # registry order breaks ties, so the plan is stable
        if name in selected:
            visit(name, ())
    return order


def conditional_needs(planned: Iterable[StageInfo], cfg: RunConfig) -> dict[str, list[str]]:
    """``{stage: [why, ...]}``: the stages of a plan that only a setting of another planned stage needs."""
    why: dict[str, list[str]] = {}
    for info in planned:
        for need, reason in info.settings_needs(cfg).items():
            why.setdefault(need, []).append(reason)
    return why


def builders(selected: Iterable[str], cfg: RunConfig | None) -> set[str]:
    """The stages of the plan that build their artifact when it is missing: the selected ones, and a stage that
    a building stage needs only for its settings, with everything that one needs (the controller a dominance
    run injects is built like a selected stage). A fixed need that is not selected must be cached."""
    build = set(selected)
    for info in reversed(plan(selected, cfg)):  # dependents before their needs
        if info.name in build:
            for need in info.settings_needs(cfg):
                build |= {s.name for s in plan([need], cfg)}
    return build


def groups_read(selected: Iterable[str], cfg: RunConfig | None = None) -> tuple[set[str], set[str]]:
    """(required, optional) config groups of the selected stages and the stages they need."""
    return groups_of(plan(selected, cfg))


def groups_of(stages: Iterable[StageInfo]) -> tuple[set[str], set[str]]:
    """(required, optional) config groups of ``stages`` (a plan)."""
    stages = list(stages)
    required = {group for info in stages for group in info.reads}
    return required, {group for info in stages for group in info.optional} - required


def describe() -> str:
    stages = registry()
    rows = [("stage", "needs", "reads config groups", "version", "cached", "default"), *(
        (s.name, ", ".join((*s.needs, *(["+cfg"] if s.needs_when else []), *(["-cfg"] if s.unneeded_when else [])))
         or "-",
         ", ".join((*s.reads, *(f"{g}?" for g in s.optional))), str(s.version),
         "yes" if s.cached else "no (per run)", "yes" if s.default else "no")
        for s in stages.values())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["(group?: read when the config has it; +cfg: more needs depending on the config, from its needs_when; "
              "-cfg: fixed needs some settings do without, from its unneeded_when)",
              "", *(f"{s.name}: {s.summary} ({s.impl}{'; needs_when ' + s.needs_when if s.needs_when else ''}"
                    f"{'; unneeded_when ' + s.unneeded_when if s.unneeded_when else ''})" for s in stages.values())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
