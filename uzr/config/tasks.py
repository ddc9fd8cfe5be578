"""The causal-loop task generator's config (``conf/tasks/causal_loop.yaml``; torch-free).

``python -m uzr.tasks.causal_loop n=100000 levels=[1,2,3,4] seed=0 out=DIR`` composes that file with the
overrides, builds :class:`CausalLoopSpec` and validates it before anything is generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.checks import check_bool, check_choice, check_float, check_int, is_int
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

    for key in ("n", "max_rounds", "chunk_size"):
        check_int(f"causal_loop.{key}", getattr(spec, key), minimum=1)
    check_int("causal_loop.seed", spec.seed, minimum=0)
    levels = spec.levels
    if not isinstance(levels, (list, tuple)) or not levels:
        raise bad("levels", f"a non-empty list drawn from {list(LEVELS)}, e.g. levels=[1,2]")
    unknown = [lv for lv in levels if not is_int(lv) or lv not in LEVELS]
    if unknown:
        raise ValueError(f"causal_loop.levels={list(levels)!r}: unknown level(s) {unknown}; valid levels: "
                         f"{list(LEVELS)} (1 chain, 2 cycle, 3 converging paths, 4 nested cycles)")
    if len(set(levels)) != len(levels):
        raise bad("levels", "each level at most once")
    check_choice("causal_loop.update", spec.update, UPDATES)
    need = max(MIN_VARS[lv] for lv in levels)
    check_int("causal_loop.max_vars", spec.max_vars, need, MAX_VARS,
              valid=f"an integer in [{need}, {MAX_VARS}] (level(s) {list(levels)} need at least {need})")
    check_int("causal_loop.min_modulus", spec.min_modulus, minimum=2)
    check_int("causal_loop.max_modulus", spec.max_modulus, spec.min_modulus, 1000,
              valid=f"an integer in [min_modulus={spec.min_modulus}, 1000]")
    check_float("causal_loop.fixed_point_fraction", spec.fixed_point_fraction, 0, 1)
    check_bool("causal_loop.trajectory", spec.trajectory)
    return spec


def coerce_causal_loop(spec: CausalLoopSpec | Mapping[str, Any] | None) -> CausalLoopSpec:
    """CausalLoopSpec from a spec, a mapping or None (defaults); validated."""
    return validate_causal_loop(from_mapping(CausalLoopSpec, spec, "causal_loop"))
