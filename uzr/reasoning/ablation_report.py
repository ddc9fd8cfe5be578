"""The ``lru_mla`` stage's section of ``metrics.json``: accuracy by level with intervals, paired differences between
groups on the same held-out items, iterations by level and their correlation with level, convergence, size, time.

- Accuracy of one group: Wilson 95% interval. Two groups: :func:`uzr.intervals.accuracy_difference` (paired
  bootstrap + McNemar) on the same items; an interval containing 0 reads "no difference".
- Answer loss: bits per answer character (and eos), teacher-forced; pairs by the paired bootstrap of
  :func:`uzr.intervals.bits_per_byte_difference` (every character is one byte). It separates groups when exact
  accuracy does not.
- Chance: the best prompt-blind answer (each variable's most frequent training value), scored the same way.
- Iterations vs level: Spearman's rho over items (item = ACT's N averaged over its positions and LRU layers), with
  a bootstrap interval over items.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from uzr.config.lru_mla import GROUP_LETTERS
from uzr.intervals import accuracy_difference, bits_per_byte_difference
from uzr.reasoning.ablation_figure import figure
from uzr.reasoning.groups import load_group_model
from uzr.reasoning.training import evaluate, greedy_agreement
from uzr.tasks.causal_loop import parse_assignments, score_answer

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
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(samples):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            reps.append(spearmanr(x[idx], y[idx]).statistic)
    low, high = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"), float("nan"))
    return {"rho": round(rho, 4), "low": round(float(low), 4), "high": round(float(high), 4), "n": len(x)}


def _levels(level: np.ndarray):
    return [("all", np.ones_like(level, bool)), *((f"level_{lv}", level == lv) for lv in np.unique(level))]


def accuracy_rows(result: dict, level: np.ndarray) -> dict:
    exact, partial = np.asarray(result["exact"], bool), np.asarray(result["partial"], float)
    nll, tokens = np.asarray(result["nll"], float), np.asarray(result["tokens"], float)
    right = np.asarray(result["tokens_right"], float)
    rows = {}
    for name, sel in _levels(level):
        k, n = int(exact[sel].sum()), int(sel.sum())
        low, high = wilson(k, n)
        rows[name] = {"exact": round(k / max(n, 1), 4), "low": round(low, 4), "high": round(high, 4), "n": n,
                      "partial": round(float(partial[sel].mean()), 4),
                      "bits_per_char": round(float(nll[sel].sum() / tokens[sel].sum() / math.log(2)), 4),
                      "token_accuracy": round(float(right[sel].sum() / tokens[sel].sum()), 4)}
    return rows


def blind_reference(train_answers: list[str], heldout_answers: list[str], level: np.ndarray) -> dict:
    """Chance: exact and partial credit of the best prompt-blind answer (each variable's most frequent value)."""
    counts: dict[str, Counter] = {}
    for a in train_answers:
        for k, v in parse_assignments(a).items():
            counts.setdefault(k, Counter())[v] += 1
    guess = ", ".join(f"{k}={c.most_common(1)[0][0]}" for k, c in sorted(counts.items()))
    scores = np.asarray([score_answer(guess, a) for a in heldout_answers], float)  # (n, 2)
    return {"answer": guess, **{name: {"exact": round(float(scores[sel, 0].mean()), 4),
                                       "partial": round(float(scores[sel, 1].mean()), 4)} for name, sel in _levels(level)}}


def group_section(result: dict, level: np.ndarray) -> dict:
    section = {"letter": result["letter"], "parameters": result["parameters"], "ffn": result["ffn"],
               "train_seconds": result["train_seconds"], "steps": result["steps"],
               "final_train_loss": result["loss_by_epoch"][-1] if result["loss_by_epoch"] else None,
               "loss_by_epoch": result["loss_by_epoch"], "accuracy": accuracy_rows(result, level)}
    iters = np.asarray(result["iterations"], float)
    if not np.isnan(iters).all():
        section["iterations"] = {name: round(float(iters[sel].mean()), 3) for name, sel in _levels(level)}
        section["iterations_by_epoch"] = result["iterations_by_epoch"]
        section["iterations_vs_level"] = (spearman_interval(level.astype(float), iters) if np.ptp(iters) > 0
                                          else {"rho": None, "note": "every item ran the same number of steps"})
        section["convergence_ratio"] = round(result["convergence_ratio"], 4)
    if "greedy_agreement" in result:
        section["greedy_agreement"] = result["greedy_agreement"]
    return section


def _rounded(d) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.as_dict().items()}


def paired_section(groups: dict, level: np.ndarray, seed: int) -> dict:
    """Per pair of groups and level: exact accuracy difference and bits-per-character difference, paired."""
    out = {}
    for a, b in PAIRS:
        if a not in groups or b not in groups:
            continue
        ga, gb = groups[a], groups[b]
        ea, eb = np.asarray(ga["exact"], bool), np.asarray(gb["exact"], bool)
        na, nb, t = (np.asarray(x, float) for x in (ga["nll"], gb["nll"], ga["tokens"]))
        rows = {}
        for name, sel in _levels(level):
            acc = accuracy_difference(ea[sel], eb[sel], seed=seed)
            bits = bits_per_byte_difference(na[sel], nb[sel], t[sel], seed=seed)
            rows[name] = {"exact": {**_rounded(acc), "verdict": acc.verdict(higher_is_better=True)},
                          "bits_per_char": {**_rounded(bits), "verdict": bits.verdict(higher_is_better=False)}}
        out[f"{GROUP_LETTERS[a]}-{GROUP_LETTERS[b]} ({a} - {b})"] = rows
    return out


def complete(run, artifact: dict) -> None:
    """Fill what an older artifact's ``group.json`` lacks (answer loss, greedy-decoding agreement) from its weights."""
    for group, result in artifact["groups"].items():
        if "nll" in result and "greedy_agreement" in result:
            continue
        model = load_group_model(run.cfg.lru_mla, group, run.cfg.seed, artifact["folder"] / group)
        if "nll" not in result:
            scores = evaluate(model, artifact["heldout"])
            result.update({k: scores[k] for k in ("nll", "tokens", "tokens_right")})
        result["greedy_agreement"] = greedy_agreement(model, artifact["heldout"], result["exact"])


def summarise(run, artifact: dict) -> dict:
    complete(run, artifact)
    heldout, groups = artifact["heldout"], artifact["groups"]
    level = np.asarray(heldout.level)
    section = {"groups": {g: group_section(r, level) for g, r in groups.items()},
               "chance": blind_reference(artifact["train_answers"], heldout.answers, level),
               "paired": paired_section(groups, level, run.cfg.seed),
               "heldout_items": int(len(level)),
               "heldout_per_level": {f"level_{lv}": int((level == lv).sum()) for lv in np.unique(level)}}
    names = list(section["groups"][next(iter(groups))]["accuracy"])
    header = ["group", "params", "train s", *[f"exact {k}" for k in names], "bits/char all", "mean N",
              "rho(N, level)", "conv. ratio"]
    rows = []
    for g, s in section["groups"].items():
        acc = [f"{v['exact']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for v in s["accuracy"].values()]
        it = s.get("iterations", {})
        rho = s.get("iterations_vs_level", {}).get("rho")
        rows.append([f"{s['letter']} {g}", str(s["parameters"]), f"{s['train_seconds']:.0f}", *acc,
                     f"{s['accuracy']['all']['bits_per_char']:.3f}",
                     f"{it['all']:.2f}" if it else "-", "-" if rho is None else f"{rho:+.3f}",
                     f"{s['convergence_ratio']:.3f}" if "convergence_ratio" in s else "-"])
    run.tables["lru_mla"] = (header, rows)
    if run.cfg.lru_mla.figure:
        run.images["lru_mla"] = figure(run.out_dir / "figures" / "lru_mla.png", section)
    return section


def print_table(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def present(run, section: dict) -> None:
    """Print the groups' table and the paired differences of exact accuracy."""
    console = Console(width=max(Console().width, 170))
    print_table(console, "LRU/MLA ablation: exact accuracy [95% Wilson] by level, held-out items",
                *run.tables["lru_mla"])
    for metric in ("exact", "bits_per_char"):
        paired = Table(title=f"paired differences of {metric} (same items): estimate [95% bootstrap], verdict")
        levels = list(next(iter(section["paired"].values()), {}))
        for column in ["pair", *levels]:
            paired.add_column(column)
        for pair, rows_ in section["paired"].items():
            paired.add_row(pair, *(f"{r[metric]['estimate']:+.3f} [{r[metric]['low']:+.3f}, {r[metric]['high']:+.3f}] "
                                   f"{r[metric]['verdict']}" for r in rows_.values()))
        console.print(paired)
