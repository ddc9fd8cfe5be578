"""Rows of the positive-control tables: each run's injected student against the damaged student on the same texts.

For each run folder: bits per byte, injected − damaged student with its paired interval (from the run's
``metrics.json``), and the share of the damage gap (damaged − undamaged teacher) that it closes; the share's interval
is the difference's interval over the same gap (the gap itself is fixed: one teacher, one damaged student, the same
texts). Two runs' injected students are paired with ``paired.py RUN_A RUN_B``.

    .venv/bin/python experiments/transfer_controls/gap_rows.py RUN...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def evaluate_section(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["evaluate"]


def gap_row(run: Path) -> str:
    """``| run | injected | Δ [interval] | verdict | share [interval] |`` for one run."""
    bpb = evaluate_section(run)["bits_per_byte"]
    d, gap = bpb["injected_minus_student"], bpb["student"] - bpb["teacher"]
    share = [-x / gap * 100 for x in (d["estimate"], d["high"], d["low"])]
    return (f"| {run.name} | {bpb['injected']:.4f} | {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
            f"{d['verdict']} | {share[0]:.1f} % [{share[1]:.0f}, {share[2]:.0f}] | "
            f"damaged {bpb['student']:.4f}, teacher {bpb['teacher']:.4f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*")
    args = parser.parse_args(argv)
    for run in args.runs:
        print(gap_row(run))


if __name__ == "__main__":
    main()
