"""The stage registry: every unit of cached work uzr knows, what it needs and which config it reads.

A stage is a name, the stages whose artifacts it needs, the config groups it reads, a version (bump it
when its artifact changes meaning, so old caches are rebuilt rather than misread) and an
implementation (a class with ``key_payload``, ``build``, ``load`` and ``report``, see :class:`Stage`).
The implementation is named by import path and imported only when the stage runs: this module, and
config validation that reads it, stay free of torch.

``python -m uzr.stages`` prints the registry. Adding a system adds its stage modules and one line each
in :data:`REGISTRY`; the runner (:mod:`uzr.runner`) does not change.
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

    def implementation(self) -> Stage:
        module, name = self.impl.split(":")
        return getattr(importlib.import_module(module), name)()


REGISTRY: dict[str, StageInfo] = {s.name: s for s in (
    StageInfo("harvest", (), ("teacher", "student", "data", "harvest", "trainer"), 3,
              "uzr.harvest.stage:HarvestStage", optional=("inject",),  # stores harvest.layers + inject.layers
              summary="teacher and student attention statistics on a corpus -> Arrow store"),
    StageInfo("controller", ("harvest",), ("student", "inject", "controller", "trainer"), 1,
              "uzr.controller.stage:ControllerStage",
              summary="controllers predicting the teacher's attention from student states -> safetensors"),
    StageInfo("gate", ("controller",), ("teacher", "student", "inject", "alpha", "gate", "evaluate", "trainer"), 1,
              "uzr.gate.stage:GateStage",
              summary="when to inject, and gated vs constant alpha on facts QA and bits per byte"),
    StageInfo("evaluate", ("controller",), ("teacher", "student", "inject", "alpha", "gate", "harvest", "evaluate"),
              1, "uzr.evaluate.stage:EvaluateStage", cached=False,
              summary="bits per byte, facts QA, habit distance and heatmaps, injected vs not vs teacher"),
    StageInfo("dominance", (), ("dominance",), 1, "uzr.dominance.stage:DominanceStage", cached=False,
              optional=("teacher", "student", "data", "inject", "alpha"),  # + controller when it injects
              summary="attention dominance (MDI / AEI / A_T) per layer and stage on two token groups"),
    StageInfo("svf", (), ("student", "svf", "trainer"), 1, "uzr.adapters.stage:SVFStage",
              optional=("teacher",),  # svf.objective=distill
              summary="one singular-value (SVF) expert per domain, REINFORCE or distilled -> safetensors"),
    StageInfo("svf_baselines", (), ("student", "svf", "trainer"), 1, "uzr.adapters.baselines:SVFBaselinesStage",
              summary="LoRA and IA3 (peft) per domain at an SVF expert's parameter count, lr tuned on validation"),
    StageInfo("svf_eval", ("svf",), ("student", "svf"), 1, "uzr.adapters.evaluation:SVFEvalStage", cached=False,
              summary="SVF accuracy matrix (base + experts x domains) and adaptation strategies vs base"),
    StageInfo("lru_mla", (), ("lru_mla", "trainer"), 1, "uzr.reasoning.stage:LRUMLAStage",
              summary="four groups trained on causal-loop tasks: attention, MLA, MLA + LRU fixed, MLA + LRU + ACT"),
)}


def unknown_stages(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in REGISTRY]


def plan(selected: Iterable[str]) -> list[StageInfo]:
    """The selected stages and everything they need, in dependency order (needs first)."""
    order: list[StageInfo] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"stage dependency cycle: {' -> '.join((*path, name))}")
        if any(s.name == name for s in order):
            return
        info = REGISTRY[name]
        for need in info.needs:
            visit(need, (*path, name))
        order.append(info)

    bad = unknown_stages(selected)
    if bad:
        raise ValueError(f"stages={list(selected)}: unknown {bad}; valid stages: {', '.join(REGISTRY)}")
    for name in REGISTRY:  # registry order breaks ties, so the plan is stable
        if name in selected:
            visit(name, ())
    return order


def groups_read(selected: Iterable[str]) -> tuple[set[str], set[str]]:
    """(required, optional) config groups of the selected stages and the stages they need."""
    stages = plan(selected)
    required = {group for info in stages for group in info.reads}
    return required, {group for info in stages for group in info.optional} - required


def describe() -> str:
    rows = [("stage", "needs", "reads config groups", "version", "cached"), *(
        (s.name, ", ".join(s.needs) or "-", ", ".join((*s.reads, *(f"{g}?" for g in s.optional))), str(s.version),
         "yes" if s.cached else "no (per run)")
        for s in REGISTRY.values())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["(group?: read when the config has it)", "", *(f"{s.name}: {s.summary} ({s.impl})" for s in REGISTRY.values())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
