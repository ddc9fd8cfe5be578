"""Markdown tables of an SVF run's ``metrics.json`` (svf / svf_baselines / svf_eval sections), as in README.md here.

    .venv/bin/python experiments/svf_default/tables.py /path/to/run/metrics.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def interval(v: dict | None) -> str:
    return f"{v['estimate']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" if v else "—"


def p_value(v: dict | None) -> str:
    return f"{v['p_value']:.2g}" if v and v.get("p_value") is not None else "—"


def matrix(section: dict) -> list[str]:
    domains = section["domains"]
    out = ["| setting | " + " | ".join(f"{d} (n={section['eval_items'][d]})" for d in domains) + " |",
           "|---|" + "---|" * len(domains)]
    for row, cols in section["matrix"].items():
        cells = [f"{cols[d]['accuracy']:.3f}" + (f" {interval(cols[d].get('vs_base'))} p={p_value(cols[d]['vs_base'])}"
                                                 f" {cols[d]['verdict']}" if "vs_base" in cols[d] else "") for d in domains]
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out


def comparison(section: dict) -> list[str]:
    out = ["| setting | accuracy | n | vs base [95% paired] | McNemar p | verdict | trainable params | routing acc. | "
           "CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in section["comparison"].items():
        routing = f"{e['routing_accuracy']:.3f}" if "routing_accuracy" in e else "—"
        out.append(f"| {name} | {e['accuracy']:.3f} | {e['n']} | {interval(e.get('vs_base'))} | {p_value(e.get('vs_base'))} | "
                   f"{e.get('verdict', '—')} | {e['trainable_parameters']:,} | {routing} | {e.get('cpu_seconds', '—')} |")
    return out


def pairs(section: dict) -> list[str]:
    """Every two rows but base on the same items (``svf_eval.pairs``; runs from before it have none)."""
    out = ["| A − B | difference [95% paired] | McNemar p | verdict |", "|---|---|---|---|"]
    for name, v in section.get("pairs", {}).items():
        out.append(f"| {name} | {interval(v)} | {p_value(v)} | {v['verdict']} |")
    return out if len(out) > 2 else []


def training(metrics: dict) -> list[str]:
    """One row per expert: its mean reward (or KL to the teacher, under distill) per step."""
    out = ["| expert | steps | mean per step | first epoch | last epoch | wall s | CPU s (sampling) |",
           "|---|---|---|---|---|---|---|"]
    for d, t in metrics.get("svf", {}).get("experts", {}).items():
        metric = "kl" if "kl_per_step" in t else "reward"
        per_step = ", ".join(f"{v:+.3f}" for v in t.get(f"{metric}_per_step", []))
        out.append(f"| {d} | {t.get('steps', '—')} | {metric}: {per_step or '—'} | "
                   f"{t.get(f'mean_{metric}_first_epoch')} | {t.get(f'mean_{metric}_last_epoch')} | "
                   f"{t.get('seconds', '—')} | {t.get('cpu_seconds', '—')} ({t.get('sampling_cpu_seconds', '—')}) |")
    return out


def main(path: str) -> None:
    metrics = json.loads(Path(path).read_text())
    section = metrics["svf_eval"]
    for title, lines in (("Training", training(metrics)), ("Accuracy matrix", matrix(section)),
                         ("Comparison (mixed held-out prompts)", comparison(section)),
                         ("Rows against each other (same items)", pairs(section))):
        if not lines:
            continue
        print(f"### {title}\n")
        print("\n".join(lines) + "\n")
    if "matrix_cell_cpu_seconds" in section:
        print(f"matrix: {section.get('matrix_seconds')} s wall, {section.get('matrix_cpu_seconds')} CPU s; CPU s per cell "
              f"(40 greedy answers unless n says otherwise): {section['matrix_cell_cpu_seconds']}\n")
    for name in ("prompt", "classifier"):
        if name in section["comparison"]:
            print(f"{name} routes (true domain -> chosen): {section['comparison'][name].get('routes')}\n")


if __name__ == "__main__":
    main(sys.argv[1])
