"""Compare two runs' metrics.json number by number: did a change of code change any result?

    python scripts/compare_metrics.py BEFORE/metrics.json AFTER/metrics.json [--rtol 1e-6] [--atol 1e-9]

Prints every numeric leaf that differs beyond the tolerance (and every key present in only one file),
then the largest absolute and relative differences; exits 1 if anything differs beyond tolerance.
Keys that name a run rather than a result (``name``, artifact paths and built/reused flags) are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SKIP = ("name", "artifacts.", "gate.heldout.resumed")


def leaves(tree, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def compare(before: dict, after: dict, rtol: float, atol: float) -> tuple[list[str], float, float]:
    a, b = leaves(before), leaves(after)
    problems, max_abs, max_rel = [], 0.0, 0.0
    for key in sorted(set(a) | set(b)):
        if key == "name" or any(key.startswith(s) for s in SKIP if s.endswith(".")):
            continue
        if key not in a or key not in b:
            problems.append(f"{key}: only in {'after' if key in b else 'before'}")
            continue
        x, y = a[key], b[key]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            if math.isnan(x) and math.isnan(y):
                continue
            diff = abs(x - y)
            rel = diff / max(abs(x), abs(y), 1e-300)
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel if diff > atol else 0.0)
            if diff > atol + rtol * max(abs(x), abs(y)):
                problems.append(f"{key}: {x!r} -> {y!r} (|diff| {diff:.3g}, rel {rel:.3g})")
        elif x != y:
            problems.append(f"{key}: {x!r} -> {y!r}")
    return problems, max_abs, max_rel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-9)
    args = parser.parse_args(argv)
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    problems, max_abs, max_rel = compare(before, after, args.rtol, args.atol)
    for line in problems:
        print(line)
    n = len(leaves(before))
    print(f"{n} values compared; largest |diff| {max_abs:.3g}, largest relative diff {max_rel:.3g}; "
          f"{len(problems)} beyond rtol={args.rtol:g}, atol={args.atol:g}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
