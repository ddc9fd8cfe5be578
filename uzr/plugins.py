"""Systems plugged in from outside uzr: modules registered under the ``uzr.systems`` entry-point group.

A system's module exports ``CONFIG_GROUPS`` (read by :mod:`uzr.config.systems`) and ``STAGES`` (read by
:func:`uzr.stages.registry`). This module imports nothing of uzr, so both can import it at the top.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from types import ModuleType

ENTRY_POINTS = "uzr.systems"


@functools.cache
def plugged_in() -> tuple[ModuleType, ...]:
    """The system modules registered through ``uzr.systems`` entry points, by entry-point name."""
    points = {(ep.name, ep.value): ep for ep in entry_points(group=ENTRY_POINTS)}  # one per name, also if found twice
    return tuple(points[key].load() for key in sorted(points))


def plugged_in_stages() -> list:
    """The :class:`~uzr.stages.StageInfo` lines of the plugged-in systems."""
    return [info for system in plugged_in() for info in getattr(system, "STAGES", ())]
