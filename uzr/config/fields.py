"""Building a group's dataclass from a plain mapping (a dict, or a DictConfig turned into one)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: T | Mapping[str, Any] | None, group: str) -> T:
    """``cls`` itself, its defaults (``None``) or built from ``values``; an unknown key fails naming the
    valid keys of the ``group``. Sequences become lists (Hydra hands over ListConfig-like sequences)."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {group} key(s) {unknown}; valid keys: {', '.join(known)}")
    return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})
