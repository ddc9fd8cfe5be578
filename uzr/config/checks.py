"""Checks of single config values, shared by every group's validation (torch-free).

Each check raises ``ValueError("<key>=<value!r> is invalid; valid: <what is valid>")``: the key as written on
the command line, the value given and what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, never a count to a config)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def invalid(key: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"{key}={value!r} is invalid; valid: {valid}")


def check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              valid: str | None = None) -> None:
    """``value`` is an integer in ``[minimum, maximum]`` (either bound optional)."""
    ok = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if valid is None:
            valid = ("an integer" if minimum is None and maximum is None else
                     f"an integer >= {minimum}" if maximum is None else
                     f"an integer <= {maximum}" if minimum is None else f"an integer in [{minimum}, {maximum}]")
        raise invalid(key, value, valid)


def check_float(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                open_low: bool = False, open_high: bool = False, valid: str | None = None) -> None:
    """``value`` is a finite number within the bounds (closed unless ``open_low`` / ``open_high``)."""
    ok = is_number(value) and (low is None or (value > low if open_low else value >= low)) and (
        high is None or (value < high if open_high else value <= high))
    if not ok:
        raise invalid(key, value, valid or _range_text(low, high, open_low, open_high))


def _range_text(low, high, open_low: bool, open_high: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>' if open_low else '>='} {low}"
    if low is None:
        return f"a finite number {'<' if open_high else '<='} {high}"
    return f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def check_choice(key: str, value: Any, choices: Iterable[Any], valid: str | None = None) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise invalid(key, value, valid or " | ".join(str(c) for c in choices))


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid(key, value, "true | false")


def check_distinct(key: str, values: Iterable[Any], choices: Iterable[Any], valid: str | None = None, *,
                   non_empty: bool = True) -> None:
    """``values`` is a list of distinct members of ``choices`` (non-empty unless ``non_empty=False``)."""
    values, choices = list(values), tuple(choices)
    if (non_empty and not values) or any(v not in choices for v in values) or len(set(values)) != len(values):
        raise invalid(key, values, valid or f"a {'non-empty ' if non_empty else ''}list of distinct names from "
                                            f"{list(choices)}")
