"""The causal-loop task generator's config (``conf/tasks/causal_loop.yaml``; torch-free).

``python -m uzr.tasks.causal_loop n=100000 levels=[1,2,3,4] seed=0 out=DIR`` composes that file with the
overrides, builds :class:`CausalLoopSpec` and validates it before anything is generated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.fields import from_mapping

LEVELS = (1, 2, 3, 4)  # 1 chain, 2 simple cycle, 3 converging paths, 4 nested interacting cycles
CYCLIC_LEVELS = (2, 4)
MIN_VARS = {1: 3, 2: 2, 3: 3, 4: 4}  # the fewest variables each level's structure needs
MAX_VARS = 8  # letters A..H; keeps every value of the acyclic levels within 6 digits
UPDATES = ("parallel", "sequential")


@dataclass
class CausalLoopSpec:
    """What ``uzr.tasks.causal_loop`` generates (README "Causal-loop tasks")."""

    n: int = 1000  # samples
    levels: list[int] = field(default_factory=lambda: list(LEVELS))  # drawn uniformly per sample
    seed: int = 0
    out: str | None = None  # dataset folder (``datasets.load_from_disk``); null: generate only
    # parallel: a round updates every variable from the previous round's values; sequential: the rules
    # apply one after another in the order the prompt lists them, each reading the newest values.
    update: str = "parallel"
    max_vars: int = 6  # variables per sample, drawn from [MIN_VARS[level], max_vars]
    max_rounds: int = 8  # cyclic levels: the stated round count is drawn from [1, max_rounds]
    min_modulus: int = 5  # cyclic levels: every value is taken modulo M, M drawn from [min_modulus, max_modulus]
    max_modulus: int = 10
    # cyclic levels: an instance that settles within max_rounds asks for its fixed point with this
    # probability; every other cyclic instance states a round count (cycles that never settle always do)
    fixed_point_fraction: float = 0.5
    trajectory: bool = False  # also store the state after every round (list of lists, letter order)
    chunk_size: int = 65536  # samples generated per step (the output depends on it; the progress bar counts them)


def validate_causal_loop(spec: CausalLoopSpec) -> CausalLoopSpec:
    """Check every field; raise ValueError naming the key, its value and what is valid."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"causal_loop.{key}={getattr(spec, key)!r} is invalid; valid: {valid}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("n", "max_rounds", "chunk_size"):
        if not is_int(getattr(spec, key)) or getattr(spec, key) < 1:
            raise bad(key, "an integer >= 1")
    if not is_int(spec.seed) or spec.seed < 0:
        raise bad("seed", "an integer >= 0")
    levels = spec.levels
    if not isinstance(levels, (list, tuple)) or not levels:
        raise bad("levels", f"a non-empty list drawn from {list(LEVELS)}, e.g. levels=[1,2]")
    unknown = [lv for lv in levels if not is_int(lv) or lv not in LEVELS]
    if unknown:
        raise ValueError(f"causal_loop.levels={list(levels)!r}: unknown level(s) {unknown}; valid levels: "
                         f"{list(LEVELS)} (1 chain, 2 cycle, 3 converging paths, 4 nested cycles)")
    if len(set(levels)) != len(levels):
        raise bad("levels", "each level at most once")
    if spec.update not in UPDATES:
        raise bad("update", " | ".join(UPDATES))
    need = max(MIN_VARS[lv] for lv in levels)
    if not is_int(spec.max_vars) or not need <= spec.max_vars <= MAX_VARS:
        raise bad("max_vars", f"an integer in [{need}, {MAX_VARS}] (level(s) {list(levels)} need at least {need})")
    if not is_int(spec.min_modulus) or spec.min_modulus < 2:
        raise bad("min_modulus", "an integer >= 2")
    if not is_int(spec.max_modulus) or not spec.min_modulus <= spec.max_modulus <= 1000:
        raise bad("max_modulus", f"an integer in [min_modulus={spec.min_modulus}, 1000]")
    f = spec.fixed_point_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and 0 <= f <= 1):
        raise bad("fixed_point_fraction", "a number in [0, 1]")
    if not isinstance(spec.trajectory, bool):
        raise bad("trajectory", "true | false")
    return spec


def coerce_causal_loop(spec: CausalLoopSpec | Mapping[str, Any] | None) -> CausalLoopSpec:
    """CausalLoopSpec from a spec, a mapping or None (defaults); validated."""
    return validate_causal_loop(from_mapping(CausalLoopSpec, spec, "causal_loop"))
