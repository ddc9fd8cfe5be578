"""Which fields of a config group determine an artifact: the one rule every stage's cache key follows.

A field of a group's spec is part of the key of every artifact built from that group, unless its dataclass
metadata says otherwise::

    field(default=..., metadata=NOT_KEYED)              shapes no artifact (an evaluation or display switch)
    field(default=..., metadata=KEYED_UNLESS_DEFAULT)   added after artifacts were keyed without it: left out at
                                                        its default, so those artifacts keep their keys
    field(default=..., metadata=keyed_only_by("svf_baselines"))   determines only the named artifacts

:func:`key_of` applies the rule (nested specs by the same rule) and is what a stage's ``key_payload`` puts in
its payload for each group it reads. Torch-free, like the rest of :mod:`uzr.config`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

KEY = "key"  # the metadata entry holding a field's rule
_UNLESS_DEFAULT = "unless_default"
NOT_KEYED: Mapping[str, Any] = {KEY: False}
KEYED_UNLESS_DEFAULT: Mapping[str, Any] = {KEY: _UNLESS_DEFAULT}


def keyed_only_by(*artifacts: str) -> Mapping[str, Any]:
    """Metadata of a field that determines only ``artifacts`` (stage or sub-artifact kinds)."""
    return {KEY: tuple(artifacts)}


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _keyed(field: dataclasses.Field, value: Any, artifact: str) -> bool:
    rule = field.metadata.get(KEY, True)
    if rule == _UNLESS_DEFAULT:
        return value != _default(field)
    if isinstance(rule, tuple):
        return artifact in rule
    return bool(rule)


def key_of(spec: Any, artifact: str) -> dict[str, Any]:
    """The fields of ``spec`` (a config dataclass) that determine ``artifact``, as plain JSON-able data: what
    ``dataclasses.asdict`` gives, less the fields whose metadata leaves them out of this artifact's key."""
    payload = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if _keyed(field, value, artifact):
            payload[field.name] = key_of(value, artifact) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return payload
