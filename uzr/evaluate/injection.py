"""The run's injection: its controllers, sinks and injected heads, as every stage that injects uses them.

:func:`run_injection` is :func:`uzr.injection.setup.configured_injection` on the run's loaded harvest store and
controllers, restricted to ``inject.heads`` (a per-head profile for ``auto``: :mod:`uzr.evaluate.heads`), so the
evaluate stage, the gate table, the dominance stage, the SVF comparison and the live demo inject alike.
"""

from __future__ import annotations

from dataclasses import replace

from uzr.config.controller import per_head_targets
from uzr.config.inject import AUTO, heads_by_layer, listed_heads
from uzr.controller.stage import ControllerStage
from uzr.evaluate.heads import run_profile
from uzr.harvest.head_matching import teacher_heads_of
from uzr.harvest.stage import HarvestStage
from uzr.injection.setup import Injection, configured_injection


def matched_heads(cfg, layout) -> dict[int, list[int]] | None:
    """Per-head targets (``controller.target=per_head``): ``{layer: teacher head of each student head}`` (the
    store's head matching); ``inject.teacher_head``: that teacher head for every student head; None for head-mean
    targets."""
    if cfg.inject.teacher_head is not None:
        return {layer: [cfg.inject.teacher_head] * cfg.student.num_heads for layer in cfg.inject.layers}
    if not per_head_targets(cfg):
        return None
    return {layer: teacher_heads_of(layout, layer) for layer in cfg.inject.layers}


def run_injection(run) -> Injection:
    """The run's injection: its trained controllers and harvest store (both loaded), sinks memoised in the run, on
    the heads of ``inject.heads`` (``auto``: the top ``inject.top_k_heads`` of the run's per-head profile)."""
    cfg = run.cfg
    store, controllers = run.upstream(HarvestStage), run.upstream(ControllerStage).controllers
    injection = configured_injection(cfg, store, controllers, run.memo, listed_heads(cfg.inject))
    return on_profiled_heads(run, injection, controllers, store)


def emphasis_injection(run) -> Injection:
    """The run's injection when emphasis needs no trained part (:func:`uzr.config.inject.emphasis_alone`): no
    controllers, no sinks, on the heads of ``inject.heads`` (``auto``: profiled with emphasis)."""
    cfg = run.cfg
    injection = Injection({}, cfg.alpha, cfg.inject.mode, None, listed_heads(cfg.inject))
    return on_profiled_heads(run, injection, {}, None)


def on_profiled_heads(run, injection: Injection, controllers, store) -> Injection:
    """``injection`` itself, or for ``inject.heads=auto`` restricted to the top ``inject.top_k_heads`` of the run's
    per-head profile (:func:`uzr.evaluate.heads.run_profile`, injecting ``controllers`` or the oracle of ``store``, the
    harvest store: None for emphasis alone)."""
    cfg = run.cfg
    if cfg.inject.heads != AUTO:
        return injection
    layout = None if store is None else store.layout
    profile = run_profile(run, injection, controllers, layout, None if store is None else matched_heads(cfg, layout))
    return replace(injection, heads=heads_by_layer(profile.top(cfg.inject.top_k_heads)))
