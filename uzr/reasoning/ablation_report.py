"""The ``lru_mla`` stage's section of ``metrics.json``: accuracy by level with intervals, paired differences between
groups on the same held-out items, iterations by level and their correlation with level, convergence, size, time.

- Accuracy of one group: Wilson 95% interval. Two groups: :func:`uzr.intervals.accuracy_difference` (paired
  bootstrap + McNemar) on the same items; an interval containing 0 reads "no difference".
- Iterations vs level: Spearman's rho over items (item = ACT's N averaged over its positions and LRU layers), with
  a bootstrap interval over items.
"""

from __future__ import annotations

import math

import numpy as np

from uzr.config.lru_mla import GROUP_LETTERS
from uzr.intervals import accuracy_difference

PAIRS = (("mla", "baseline"), ("mla_lru_fixed", "mla"), ("mla_lru_act", "mla"), ("mla_lru_act", "mla_lru_fixed"),
         ("mla_lru_fixed", "baseline"), ("mla_lru_act", "baseline"))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)))


def spearman_interval(x: np.ndarray, y: np.ndarray, samples: int = 1000, seed: int = 0) -> dict:
    """Spearman's rho of x and y with a 95% bootstrap interval over items."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(samples):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            reps.append(spearmanr(x[idx], y[idx]).statistic)
    low, high = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"), float("nan"))
    return {"rho": round(rho, 4), "low": round(float(low), 4), "high": round(float(high), 4), "n": len(x)}


def accuracy_rows(exact: np.ndarray, partial: np.ndarray, level: np.ndarray) -> dict:
    rows = {}
    for name, sel in [("all", np.ones_like(level, bool)), *((f"level_{lv}", level == lv) for lv in np.unique(level))]:
        k, n = int(exact[sel].sum()), int(sel.sum())
        low, high = wilson(k, n)
        rows[name] = {"exact": round(k / max(n, 1), 4), "low": round(low, 4), "high": round(high, 4), "n": n,
                      "partial": round(float(partial[sel].mean()), 4)}
    return rows


def group_section(result: dict, level: np.ndarray) -> dict:
    exact, partial = np.asarray(result["exact"], bool), np.asarray(result["partial"], float)
    section = {"letter": result["letter"], "parameters": result["parameters"], "ffn": result["ffn"],
               "train_seconds": result["train_seconds"], "steps": result["steps"],
               "final_train_loss": result["loss_by_epoch"][-1] if result["loss_by_epoch"] else None,
               "accuracy": accuracy_rows(exact, partial, level)}
    iters = np.asarray(result["iterations"], float)
    if not np.isnan(iters).all():
        section["iterations"] = {f"level_{lv}": round(float(iters[level == lv].mean()), 3) for lv in np.unique(level)}
        section["iterations"]["all"] = round(float(iters.mean()), 3)
        section["iterations_by_epoch"] = result["iterations_by_epoch"]
        section["iterations_vs_level"] = (spearman_interval(level.astype(float), iters) if np.ptp(iters) > 0
                                          else {"rho": None, "note": "every item ran the same number of steps"})
        section["convergence_ratio"] = round(result["convergence_ratio"], 4)
    return section


def paired_section(groups: dict, level: np.ndarray, seed: int) -> dict:
    out = {}
    for a, b in PAIRS:
        if a not in groups or b not in groups:
            continue
        ea, eb = np.asarray(groups[a]["exact"], bool), np.asarray(groups[b]["exact"], bool)
        rows = {}
        for name, sel in [("all", np.ones_like(level, bool)), *((f"level_{lv}", level == lv) for lv in np.unique(level))]:
            d = accuracy_difference(ea[sel], eb[sel], seed=seed)
            rows[name] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in d.as_dict().items()},
                          "verdict": d.verdict(higher_is_better=True)}
        out[f"{GROUP_LETTERS[a]}-{GROUP_LETTERS[b]} ({a} - {b})"] = rows
    return out


def summarise(run, artifact: dict) -> dict:
    level, groups = artifact["level"], artifact["groups"]
    section = {"groups": {g: group_section(r, level) for g, r in groups.items()},
               "paired_exact": paired_section(groups, level, run.cfg.seed),
               "heldout_items": int(len(level)),
               "heldout_per_level": {f"level_{lv}": int((level == lv).sum()) for lv in np.unique(level)}}
    header = ["group", "params", "train s", *[f"acc {k}" for k in section["groups"][next(iter(groups))]["accuracy"]],
              "mean N", "rho(N, level)", "conv. ratio"]
    rows = []
    for g, s in section["groups"].items():
        acc = [f"{v['exact']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for v in s["accuracy"].values()]
        it = s.get("iterations", {})
        rho = s.get("iterations_vs_level", {}).get("rho")
        rows.append([f"{s['letter']} {g}", str(s["parameters"]), f"{s['train_seconds']:.0f}", *acc,
                     f"{it['all']:.2f}" if it else "-", "-" if rho is None else f"{rho:+.3f}",
                     f"{s['convergence_ratio']:.3f}" if "convergence_ratio" in s else "-"])
    run.tables["lru_mla"] = (header, rows)
    if run.cfg.lru_mla.figure:
        from uzr.reasoning.ablation_figure import figure

        run.images["lru_mla"] = figure(run.out_dir / "figures" / "lru_mla.png", section)
    return section


def present(run, section: dict) -> None:
    """Print the groups' table and the paired differences of exact accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170))
    header, rows = run.tables["lru_mla"]
    table = Table(title="LRU/MLA ablation: exact accuracy [95% Wilson] by level, held-out items")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    paired = Table(title="paired differences of exact accuracy (same items): estimate [95% bootstrap], verdict")
    levels = list(next(iter(section["paired_exact"].values()), {}))
    for column in ["pair", *levels]:
        paired.add_column(column)
    for pair, rows_ in section["paired_exact"].items():
        paired.add_row(pair, *(f"{r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] {r['verdict']}"
                               for r in rows_.values()))
    console.print(paired)
