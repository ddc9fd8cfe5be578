"""The systems uzr runs: their config groups and, for systems outside this package, their stage lines.

A system is a torch-free module that exports ``CONFIG_GROUPS`` (:class:`~uzr.config.groups.ConfigGroup`
descriptors) and ``STAGES`` (:class:`~uzr.stages.StageInfo` lines; the built-in stages' lines are the table
in :data:`uzr.stages.REGISTRY`). The built-in modules are :data:`BUILTIN`. A system in another distribution
registers through one entry point of group ``uzr.systems`` naming its module, e.g. in its ``pyproject.toml``::

    [project.entry-points."uzr.systems"]
    my_system = "my_system"

Nothing else names it: the schema (:class:`uzr.config.RunConfig`), validation, the planner and
``python -m uzr.stages`` pick it up. Such a module must not import :mod:`uzr.config` names that are built from
the systems (``RunConfig``) at import time: it is imported while the schema is built.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from types import ModuleType

from uzr.config import (
    adapt,
    controller,
    corpus,
    dominance,
    evaluate,
    gate,
    harvest,
    inject,
    lru_mla,
    model,
    platform,
    svf,
)
from uzr.config.groups import ConfigGroup

ENTRY_POINTS = "uzr.systems"
# In schema order: the config file's keys follow it (teacher, student, data, inject, ...).
BUILTIN = (model, corpus, inject, controller, gate, dominance, svf, lru_mla, adapt, harvest, evaluate, platform)


@functools.cache
def plugged_in() -> tuple[ModuleType, ...]:
    """The system modules registered through ``uzr.systems`` entry points, by entry-point name."""
    points = {(ep.name, ep.value): ep for ep in entry_points(group=ENTRY_POINTS)}  # one per name, also if found twice
    return tuple(points[key].load() for key in sorted(points))


def config_groups() -> list[ConfigGroup]:
    """Every config group, in schema order: the built-in and plugged-in groups a config selects, then the groups
    every config has (``always``)."""
    groups = [group for system in (*BUILTIN, *plugged_in()) for group in system.CONFIG_GROUPS]
    names = [group.name for group in groups]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"config group(s) {twice} registered twice (uzr.systems entry points: "
                         f"{[m.__name__ for m in plugged_in()]})")
    return [g for g in groups if not g.always] + [g for g in groups if g.always]


def plugged_in_stages() -> list:
    """The :class:`~uzr.stages.StageInfo` lines of the plugged-in systems."""
    return [info for system in plugged_in() for info in getattr(system, "STAGES", ())]
