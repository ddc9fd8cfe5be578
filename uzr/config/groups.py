"""The descriptor every config group exports, so the schema and its validation loop over groups.

A group is a key of the run config (``cfg.<name>``), a dataclass (its schema: every default, the YAML
options under ``conf/<name>/`` hold only what differs) and one validation function. A system's torch-free
module exports its groups as ``CONFIG_GROUPS`` (built-in ones are listed in :mod:`uzr.config.systems`,
others register through the ``uzr.systems`` entry points there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConfigGroup:
    name: str  # the key in the run config and the folder of its options under conf/
    spec: type  # the dataclass of the group
    # validate(cfg): raise ValueError naming the key, the value and what is valid. ``cfg`` is the run config as
    # the planned stages read it: a group no planned stage reads is None there. Runs only when a stage reads it.
    validate: Callable[[Any], None] | None = None
    # True: in every config with its defaults (harvest, trainer, ...); False: None unless an option selects it
    always: bool = False
    # options registered in Hydra's ConfigStore (name -> spec instance), beside any conf/<name>/*.yaml:
    # how a system outside this repository ships its options (`+<name>=<option>` on the command line)
    options: Mapping[str, Any] = field(default_factory=dict)

    def check(self, cfg: Any) -> None:
        if self.validate is not None:
            self.validate(cfg)
