"""The runner: walks the selected stages in dependency order over the shared artifact cache.

For each stage of the plan (:func:`uzr.stages.plan`: the selected stages and what they need, including
needs that depend on the config) the runner computes its cache key from the config and the keys of the
stages it needs, takes its artifact from the cache or builds it (:func:`uzr.stages.builders`: selected
stages and what they need only for their settings build; any other needed stage must be cached, and the
error names it), loads it, and asks it for its section of ``metrics.json``.
A stage reads the artifacts of the stages it needs with :meth:`RunContext.upstream` (typed by the stage class)
and makes any smaller cached piece of its work (a trained group, a domain's store, a memoised score) with
:meth:`RunContext.artifact`. ``metrics.json`` → ``artifacts`` records each artifact's key, path and whether this
run built it (stages by name, sub-artifacts as ``kind/key``), and ``timing`` the wall and process CPU seconds of
each stage (its build or load, then its report: models load lazily inside the first stage that needs them, so
their load counts there).
Nothing here knows a particular stage or system (:mod:`uzr.config.systems`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from uzr.cache import ArtifactCache, content_key
from uzr.config import RunConfig
from uzr.report.table import flat_metrics, print_results, results_rows
from uzr.stages import Stage, StageInfo, builders, plan, registry
from uzr.timing import stopwatch

log = logging.getLogger(__name__)


class ModelPool:
    """Loads teacher and student on first use, once per run. A pruned model to be healed (``<role>.prune.heal_steps``)
    is healed on the run's training texts, or its cached heal loaded, through ``artifact`` (the run's
    :meth:`RunContext.artifact`, set by the run context that uses the pool)."""

    def __init__(self, cfg: RunConfig, artifact: Callable | None = None):
        self.cfg, self.artifact, self._loaded = cfg, artifact, {}

    def get(self, role: str):
        if role not in self._loaded:
            # transformers: imported only when a model loads, not by code that keys or loads artifacts
            from uzr.models import load_model

            spec = getattr(self.cfg, role)
            start = time.perf_counter()
            self._loaded[role] = load_model(spec, device=self.cfg.device, cache_dir=self.cfg.cache_dir, role=role)
            if spec.prune.heal_steps:
                self._heal(role)
            log.info("loaded %s %s in %.1fs", role, spec.name, time.perf_counter() - start)
        return self._loaded[role]

    def _heal(self, role: str) -> None:
        from uzr.models import load_model  # transformers, as in get()
        from uzr.models.heal import healed  # torch: only when a pruned model is healed

        def load_full(spec):
            return load_model(spec, device=self.cfg.device, cache_dir=self.cfg.cache_dir, role=f"{role} (unpruned)")

        if self.artifact is None:
            raise RuntimeError(f"{role}.prune.heal_steps: a heal is a cached artifact of a run; load the models "
                               "through a RunContext(cfg, out_dir, pool), which gives its pool the run's cache")
        model, tok = self._loaded[role]
        healed(model, tok, getattr(self.cfg, role), self.cfg, self.artifact, load_full, role)


MEMO_VERSION = 1  # bump when what a stored memo holds changes
Loaded = TypeVar("Loaded", covariant=True)


class LoadsArtifact(Protocol[Loaded]):
    """A stage class, typed by what its ``load`` returns (what :meth:`RunContext.upstream` hands back)."""

    def load(self, run: Any, folder: Path) -> Loaded: ...


def unmemoised(key: Any, compute: Callable[[], Any]) -> Any:
    """The :meth:`RunContext.memo` signature without a run: computes every time (callers given no memo)."""
    return compute()


@dataclass
class RunContext:
    """What the stages of one run share: config, models, loggers, the artifacts loaded so far.

    Outside a run (the live demo, tests) ``RunContext(cfg, out_dir)`` is the same context: models load on first use
    and sub-artifacts go to ``cfg``'s cache."""

    cfg: RunConfig
    out_dir: Path
    models: ModelPool | None = None  # None: a pool of cfg's models
    loggers: list = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # stage name -> loaded artifact
    info: dict[str, dict] = field(default_factory=dict)  # stage name -> {"key", "built", "path"}
    sub_artifacts: dict[str, dict] = field(default_factory=dict)  # "kind/key" -> {"key", "built", "path"}
    images: dict[str, Path] = field(default_factory=dict)  # logged figures
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)  # logged tables
    timing: dict[str, dict] = field(default_factory=dict)  # stage name -> {"wall_s", "cpu_s"} (stopwatch)
    _memo: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.models is None:
            self.models = ModelPool(self.cfg)
        if self.models.artifact is None:  # a heal the pool builds or loads is recorded as this run's sub-artifact
            self.models.artifact = self.artifact

    def upstream(self, stage: type[LoadsArtifact[Loaded]]) -> Loaded:
        """The loaded artifact of ``stage`` (a registered stage class, e.g. ``ControllerStage``), typed as its
        ``load`` returns it. Fails naming the stage when this run has not loaded it."""
        name = stage_name(stage)
        if name not in self.artifacts:
            loaded = ", ".join(self.artifacts) or "none"
            raise LookupError(
                f"the {name!r} artifact is not loaded in this run (loaded: {loaded}): the stage reading it must need "
                f"{name!r} (StageInfo.needs in uzr/stages.py), or select it: stages=[..., {name}]")
        return self.artifacts[name]

    def artifact(self, kind: str, payload: dict, build: Callable[[Path], dict | None], *,
                 version: int) -> tuple[Path, bool]:
        """The cache folder of the sub-artifact ``kind`` keyed by the content of (``kind``, ``payload``,
        ``version``) and whether this call built it: ``build(folder)`` fills it when it is missing (atomically,
        once even across concurrent jobs; returns extras for its manifest). Recorded in ``metrics.json`` →
        ``artifacts`` as ``kind/key``; bump ``version`` when what ``build`` writes changes meaning."""
        key = content_key(kind, payload, version)
        folder, built = ArtifactCache(self.cfg.cache_dir).get_or_build(kind, key, payload, build)
        # the first record of the run stays: "built" says this run built it, even when asked again later
        self.sub_artifacts.setdefault(f"{kind}/{key}", {"key": key, "built": built, "path": str(folder)})
        return folder, built

    def artifact_records(self) -> dict[str, dict]:
        """``metrics.json`` → ``artifacts``: each stage's record by name, then each sub-artifact's as ``kind/key``."""
        return {**self.info, **self.sub_artifacts}

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run for ``key``: stages share measurements (e.g. the plain student's
        facts-QA accuracy) without passing them to each other."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def stored(self, key: Any, compute: Callable[[], Any]) -> Any:
        """:meth:`memo`, and kept in the artifact cache across runs (``memo/<hash>``): for JSON-able results
        that depend only on ``key`` (JSON-able) and the run's artifacts (every artifact key so far, which
        fixes the models, controllers and gate) and its device, e.g. the injected facts-QA scores that a warm
        re-run or the next job of a sweep would otherwise compute again."""
        def from_cache() -> Any:
            # the stages' keys only: sub-artifacts follow from them, and listing them would tie the key to what
            # happened to run before
            payload = {"key": json.loads(json.dumps(key, default=str)), "device": self.cfg.device,
                       "artifacts": {name: info["key"] for name, info in sorted(self.info.items())}}

            def build(folder: Path) -> None:
                (folder / "value.json").write_text(json.dumps(compute()))

            folder, _ = self.artifact("memo", payload, build, version=MEMO_VERSION)
            return json.loads((folder / "value.json").read_text())

        return self.memo(key, from_cache)


def stage_name(stage: type) -> str:
    """The registry name of a stage implementation class; TypeError if no registered stage is it."""
    impl = f"{stage.__module__}:{stage.__qualname__}"
    for info in registry().values():
        if info.impl == impl:
            return info.name
    raise TypeError(f"{impl} is not a registered stage (uzr.stages.registry())")


def stage_key(info: StageInfo, impl: Stage, cfg: RunConfig, upstream: dict[str, str]) -> tuple[str, dict]:
    payload = impl.key_payload(cfg, upstream)
    return content_key(info.name, payload, info.version), payload


def artifact_keys(cfg: RunConfig, selected: Iterable[str]) -> dict[str, str]:
    """The cache key of every cached stage in the plan of ``selected`` (nothing is built or loaded)."""
    keys: dict[str, str] = {}
    for info in plan(list(selected), cfg):
        if info.cached:
            upstream = {need: keys[need] for need in info.needs_for(cfg)}
            keys[info.name] = stage_key(info, info.implementation(), cfg, upstream)[0]
    return keys


def load_stages(run: RunContext, selected: Iterable[str], build: Iterable[str] | None = None) -> dict[str, Stage]:
    """Bring the artifacts of ``selected`` (and what they need for ``run.cfg``) into ``run.artifacts``; the stages
    in ``build`` (default: :func:`uzr.stages.builders`) build theirs when missing. Returns the plan as
    ``{name: implementation}``, in dependency order."""
    selected = list(selected)
    build = builders(selected, run.cfg) if build is None else set(build)
    cache = ArtifactCache(run.cfg.cache_dir)
    impls: dict[str, Stage] = {}
    for info in plan(selected, run.cfg):
        impl = impls[info.name] = info.implementation()
        if not info.cached:
            continue
        upstream = {need: run.info[need]["key"] for need in info.needs_for(run.cfg)}
        key, payload = stage_key(info, impl, run.cfg, upstream)
        with stopwatch(run.timing, info.name):
            path, built = cache.get_or_build(info.name, key, payload,
                                             lambda folder, impl=impl: impl.build(run, folder),
                                             allow_build=info.name in build)
            run.info[info.name] = {"key": key, "built": built, "path": str(path)}
            run.artifacts[info.name] = impl.load(run, path)
    return impls


def run(cfg: RunConfig, out_dir: Path, config_dict: dict, run_name: str) -> dict:
    """Run the selected stages; writes ``metrics.json`` into ``out_dir`` and returns the metrics."""
    # Lightning and the loggers (wandb) take seconds to import: not for the modules that import this one only to
    # key artifacts or for RunContext.
    import lightning as L

    from uzr.loggers import finish, log_summary, make_loggers  # lightning, wandb: seconds (see above)

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_ctx = RunContext(cfg, out_dir, ModelPool(cfg), make_loggers(cfg.logger, out_dir, run_name, config_dict))
    metrics: dict = {"name": run_name}
    try:
        impls = load_stages(run_ctx, cfg.stages)
        metrics["artifacts"] = run_ctx.info
        for name, impl in impls.items():
            with stopwatch(run_ctx.timing, name):
                section = impl.report(run_ctx, run_ctx.artifacts.get(name))
            if section is not None:
                metrics[name] = section
        metrics["artifacts"] = run_ctx.artifact_records()  # now with the sub-artifacts the stages made
        metrics["timing"] = run_ctx.timing
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        header, rows = results_rows(metrics)
        if rows:
            run_ctx.tables["results"] = (header, rows)
            print_results(metrics, cfg)
        for name, impl in impls.items():
            present = getattr(impl, "present", None)
            if present is not None and name in metrics:
                present(run_ctx, metrics[name])
        log_summary(run_ctx.loggers, flat_metrics(metrics), run_ctx.images, run_ctx.tables)
    finally:
        finish(run_ctx.loggers)
    return metrics
