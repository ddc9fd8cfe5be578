"""The prompt-level gate beside the token gate, on the prompt labels the prompt gate was trained for.

A prompt gate answers "would the teacher answer this prompt confidently and correctly?"; the token gate predicts
the teacher's next-token entropy at a position. Both read the student only. On the held-out prompts, this module
scores each gate's value at the prompt's last token against the prompt labels (AUROC of CONFIDENT vs the rest, with
the paired bootstrap interval of the difference) and averages both gates by kind of prompt: answerable and known to
the teacher (it states the fact-table answer), answerable and not known, and without an answer (false premises,
invented entities, questions no one can answer) — the live demo's "capital of France" against "capital of Mars".
The gate stage computes the values (:func:`uzr.gate.stage.gate_comparison`); this module only compares them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Console

from uzr.config.gate import CONFIDENT
from uzr.gate.model import auroc
from uzr.intervals import BOOTSTRAP_SAMPLES, LEVEL, _percentiles, _resamples
from uzr.report.table import numbers_table

KNOWN, UNKNOWN, NO_ANSWER = "answerable, teacher right", "answerable, teacher wrong", "no answer"


def auroc_difference(scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[bool],
                     level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """AUROC of ``scores_a`` minus AUROC of ``scores_b`` on the same (n,) items and labels, with a paired bootstrap
    ``level`` interval (resamples holding one class only are skipped): ``{"estimate", "low", "high", "n"}``."""
    a, b, y = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64), np.asarray(labels, bool)
    idx = _resamples(len(y), samples, seed)  # (samples, n): the draws of uzr.intervals' other differences
    low, high = _percentiles(np.array([auroc(a[i], y[i]) - auroc(b[i], y[i]) for i in idx if 0 < y[i].sum() < len(i)]),
                             level)
    return {"estimate": auroc(a, y) - auroc(b, y), "low": float(low), "high": float(high), "n": int(len(y))}


def prompt_group(row: Mapping[str, Any]) -> str:
    """:data:`KNOWN`, :data:`UNKNOWN` or :data:`NO_ANSWER` of a ``labels.jsonl`` row."""
    if row["kind"] != "answerable":
        return NO_ANSWER
    return KNOWN if row["correct"] else UNKNOWN


def compare_gates(rows: Sequence[Mapping[str, Any]], values: Mapping[str, Sequence[float]],
                  demo: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """Gates side by side on the held-out ``rows`` of a prompt gate's ``labels.jsonl``. ``values``: ``{gate name:
    (len(rows) + len(demo),) values}``, the rows' first, then the ``demo`` questions'; the first two names are
    compared. Returns ``{"auroc": {name}, "difference": first - second with its interval, "mean_gate": {group:
    {name..., "n"}}, "demo": {question: {name}}, "n_heldout", "positives"}``."""
    n = len(rows)
    y = [r["label"] == CONFIDENT for r in rows]
    groups = [prompt_group(r) for r in rows]
    mean_gate = {g: {**{name: float(np.mean([v for v, gg in zip(vals[:n], groups) if gg == g]))
                        for name, vals in values.items()}, "n": groups.count(g)}
                 for g in (KNOWN, UNKNOWN, NO_ANSWER) if g in groups}
    first, second = list(values)[:2]
    return {"n_heldout": n, "positives": int(sum(y)),
            "auroc": {name: auroc(vals[:n], y) for name, vals in values.items()},
            "difference": auroc_difference(values[first][:n], values[second][:n], y, seed=seed),
            "mean_gate": mean_gate,
            "demo": {q: {name: float(vals[n + i]) for name, vals in values.items()} for i, q in enumerate(demo)}}


def print_gate_comparison(result: Mapping[str, Any], console=None) -> None:
    """The prompt gate against the token gate: AUROC on the held-out prompt labels, mean gate by kind, the demo pair."""
    names = list(result["auroc"])
    rows = [["AUROC (CONFIDENT vs rest)", *(result["auroc"][n] for n in names)]]
    rows += [[f"mean gate: {g} (n={v['n']})", *(v[n] for n in names)] for g, v in result["mean_gate"].items()]
    rows += [[f"demo: {q}", *(v[n] for n in names)] for q, v in result["demo"].items()]
    console = console or Console()
    console.print(numbers_table(f"prompt gate vs token gate: {result['n_heldout']} held-out prompts, "
                                f"{result['positives']} CONFIDENT", ["", *names], rows))
    d = result["difference"]
    verdict = "no difference" if d["low"] <= 0 <= d["high"] else ("higher" if d["estimate"] > 0 else "lower")
    console.print(f"• AUROC {names[0]} - {names[1]}: {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                  f"(paired bootstrap 95 %): {verdict}")
