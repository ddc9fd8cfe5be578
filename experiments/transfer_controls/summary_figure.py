"""The README's results picture: the summary table of this folder's README as a figure.

    python experiments/transfer_controls/summary_figure.py   # writes summary.png beside this file

Reads ``summary.csv`` (Δ bits per byte of each injected source against the uninjected student, paired bootstrap
95 % interval, copied from the summary table of ``README.md``); the teacher-student gaps are that table's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
GAPS = {"positive control": -0.1329, "default pair": 1.2075 - 1.1632}  # teacher - student, bits per byte
TITLES = {"positive control": "positive control: damaged Gemma 3 270M\n(the deficit lives in attention)",
          "default pair": "default pair: Gemma 3 270M -> SmolLM2-135M\n(sinks kept; teacher not ahead)"}


def main() -> None:
    rows = list(csv.DictReader((HERE / "summary.csv").open()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, pair in zip(axes, GAPS):
        mine = [r for r in rows if r["pair"] == pair]
        y = range(len(mine))
        est = [float(r["delta_bpb"]) for r in mine]
        err = [[e - float(r["low"]) for e, r in zip(est, mine)], [float(r["high"]) - e for e, r in zip(est, mine)]]
        ax.errorbar(est, y, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1, label="uninjected student")
        ax.axvline(GAPS[pair], color="tab:green", ls="--", lw=1, label="teacher")
        ax.set_yticks(list(y), [r["source"] for r in mine])
        ax.invert_yaxis()
        ax.set_xlabel("Δ bits/byte vs student, 95 % paired interval (lower = better)", fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.set_title(TITLES[pair], fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(HERE / "summary.png", dpi=110)


if __name__ == "__main__":
    main()
