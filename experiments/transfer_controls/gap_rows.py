"""Rows of the positive-control tables: each run's injected student against the damaged student on the same texts.

For each run folder: bits per byte, injected − damaged student with its paired interval (from the run's
``metrics.json``), and the share of the damage gap (damaged − undamaged teacher) that it closes; the share's interval
is the difference's interval over the same gap (the gap itself is fixed: one teacher, one damaged student, the same
texts). Two runs' injected students are paired with ``paired.py RUN_A RUN_B``; ``--contrast A B C D`` pairs two such
differences, (A − B) − (C − D) over the same texts (e.g. how much more this-text transfer, controller − shuffled,
per-head targets carry than head-mean ones).

    .venv/bin/python experiments/transfer_controls/gap_rows.py RUN... [--contrast A B C D]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from uzr.intervals import bits_per_byte_difference  # noqa: E402


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


def contrast_row(runs: list[Path], domain: str = "pydoc") -> str:
    """(A − B) − (C − D) in bits per byte with its paired bootstrap interval: the sums are linear, so the per-text
    losses combine before the texts are resampled."""
    texts = [evaluate_section(run)["domains"][domain]["per_text"] for run in runs]
    if any(t["bytes"] != texts[0]["bytes"] for t in texts):
        raise SystemExit("the runs scored different texts (byte counts differ)")
    a, b, c, d = (np.asarray(t["nll_injected"], dtype=np.float64) for t in texts)
    diff = bits_per_byte_difference(a - b, c - d, texts[0]["bytes"])
    names = [run.name for run in runs]
    return (f"| ({names[0]} − {names[1]}) − ({names[2]} − {names[3]}) | {diff.describe()} | "
            f"{diff.verdict(higher_is_better=False)} | {diff.n} texts |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*")
    parser.add_argument("--contrast", type=Path, nargs=4, metavar=("A", "B", "C", "D"))
    args = parser.parse_args(argv)
    for run in args.runs:
        print(gap_row(run))
    if args.contrast:
        print(contrast_row(args.contrast))


if __name__ == "__main__":
    main()
