"""The ``lru_mla_pretrained`` stage's section of ``metrics.json``, its tables and the few-shot figure.

Per group: exact and partial accuracy by level (Wilson 95%), answer loss in bits per answer token, the same before
training, iterations by level with Spearman's rho against level and the convergence ratio (C, D), D with Huginn's
KL exit in place of ACT, trainable parameters, wall and CPU seconds. Between groups, on the same items: paired
differences of exact (bootstrap + McNemar), partial credit (bootstrap) and answer loss (bootstrap), the pairs of
:data:`uzr.reasoning.ablation_report.PAIRS`. Few-shot: exact and partial accuracy at each number of demonstrations
per group, paired between groups at each ``k`` and against the same group's 0-shot. Conversion: bits per byte of
held-out text per latent rank before training, paired against the unconverted top.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console

from uzr.config.lru_mla import GROUP_LETTERS
from uzr.intervals import accuracy_difference, mean_difference
from uzr.reasoning.ablation_figure import fewshot_figure
from uzr.reasoning.ablation_report import (
    PAIRS,
    _levels,
    _rounded,
    accuracy_rows,
    blind_reference,
    paired_section,
    print_table,
    spearman_interval,
    wilson,
)


def _per_token(rows: dict) -> dict:
    """:func:`accuracy_rows` and :func:`paired_section` name the answer loss per character (the from-scratch
    tokens are characters); here a token is a BPE token."""
    return {k: (_per_token(v) if isinstance(v, dict) else v) for k, v in
            ((k.replace("bits_per_char", "bits_per_token"), v) for k, v in rows.items())}


def iteration_section(result: dict, level: np.ndarray) -> dict:
    iters = np.asarray(result["iterations"], float)
    if np.isnan(iters).all():
        return {}
    return {"iterations": {name: round(float(iters[sel].mean()), 3) for name, sel in _levels(level)},
            "iterations_vs_level": (spearman_interval(level.astype(float), iters) if np.ptp(iters) > 0
                                    else {"rho": None, "note": "every item ran the same number of steps"}),
            "convergence_ratio": round(result["convergence_ratio"], 4)}


def group_section(result: dict, level: np.ndarray) -> dict:
    history = result["history"]
    tail = history[-max(1, len(history) // 10):]
    before = result["before_training"]
    section = {"letter": result["letter"], "trainable_parameters": result["parameters"], "steps": result["steps"],
               "train_time": result["train_time"], "eval_time": result["eval_time"],
               "final_train_loss": round(float(np.mean([h["loss"] for h in tail])), 4),
               "accuracy": _per_token(accuracy_rows(result, level)),
               "before_training": {"exact": round(float(np.mean(before["exact"])), 4),
                                   "partial": round(float(np.mean(before["partial"])), 4)},
               **iteration_section(result, level)}
    if history and "iterations" in history[0]:
        section["train_iterations_first_last"] = [round(history[0]["iterations"], 3),
                                                  round(float(np.mean([h["iterations"] for h in tail])), 3)]
    if "kl_exit" in result:
        exit_ = result["kl_exit"]
        section["kl_exit"] = {"accuracy": _per_token(accuracy_rows(exit_, level)),
                              **iteration_section(exit_, level),
                              "minus_act_exact": _rounded(accuracy_difference(exit_["exact"], result["exact"]))}
    return section


def _pairs(groups: dict):
    return [(a, b) for a, b in PAIRS if a in groups and b in groups]


def _name(a: str, b: str) -> str:
    return f"{GROUP_LETTERS[a]}-{GROUP_LETTERS[b]} ({a} - {b})"


def _difference(diff, higher_is_better: bool = True) -> dict:
    return {**_rounded(diff), "verdict": diff.verdict(higher_is_better=higher_is_better)}


def partial_pairs(groups: dict, seed: int) -> dict:
    return {_name(a, b): _difference(mean_difference(groups[a]["partial"], groups[b]["partial"], seed=seed))
            for a, b in _pairs(groups)}


def fewshot_section(groups: dict, seed: int) -> dict:
    """Per group and k: exact (Wilson) and partial; paired between groups at each k and against 0-shot."""
    out = {"groups": {}, "paired": {}, "versus_zero_shot": {}}
    for g, r in groups.items():
        rows = {}
        for k, s in r["fewshot"].items():
            exact = np.asarray(s["exact"], bool)
            low, high = wilson(int(exact.sum()), len(exact))
            rows[k] = {"exact": round(float(exact.mean()), 4), "low": round(low, 4), "high": round(high, 4),
                       "partial": round(float(np.mean(s["partial"])), 4), "n": len(exact)}
        out["groups"][g] = rows
        if "0" in r["fewshot"]:
            out["versus_zero_shot"][g] = {
                k: {"partial": _difference(mean_difference(s["partial"], r["fewshot"]["0"]["partial"], seed=seed)),
                    "exact": _difference(accuracy_difference(s["exact"], r["fewshot"]["0"]["exact"], seed=seed))}
                for k, s in r["fewshot"].items() if k != "0"}
    for a, b in _pairs(groups):
        fa, fb = groups[a]["fewshot"], groups[b]["fewshot"]
        out["paired"][_name(a, b)] = {
            k: {"exact": _difference(accuracy_difference(fa[k]["exact"], fb[k]["exact"], seed=seed)),
                "partial": _difference(mean_difference(fa[k]["partial"], fb[k]["partial"], seed=seed))} for k in fa}
    return out


def summarise(run, artifact: dict) -> dict:
    groups, data = artifact["groups"], artifact["data"]
    level = np.asarray(data["heldout_level"])
    seed = run.cfg.seed
    section = {"groups": {g: group_section(r, level) for g, r in groups.items()},
               "chance": blind_reference(data["train_answers"], data["heldout_answers"], level),
               "paired": _per_token(paired_section(groups, level, seed)),
               "paired_partial": partial_pairs(groups, seed),
               "fewshot": fewshot_section(groups, seed),
               "conversion": artifact["conversion"],
               "heldout_items": int(len(level)),
               "heldout_per_level": {f"level_{lv}": int((level == lv).sum()) for lv in np.unique(level)},
               "train_items": data["train_items"], "tokens_per_item": data["tokens_per_item"],
               "prefix_time": data["prefix_time"]}
    header = ["group", "trainable", "train wall/CPU s", "exact all", "partial all", "bits/token", "before: exact",
              "before: partial", "mean N", "rho(N, level)", "conv."]
    rows = []
    for g, s in section["groups"].items():
        a = s["accuracy"]["all"]
        rho = s.get("iterations_vs_level", {}).get("rho")
        rows.append([f"{s['letter']} {g}", f"{s['trainable_parameters']:,}",
                     f"{s['train_time']['seconds']:.0f}/{s['train_time']['cpu_seconds']:.0f}",
                     f"{a['exact']:.3f} [{a['low']:.3f}, {a['high']:.3f}]", f"{a['partial']:.3f}",
                     f"{a['bits_per_token']:.3f}", f"{s['before_training']['exact']:.3f}",
                     f"{s['before_training']['partial']:.3f}",
                     f"{s['iterations']['all']:.2f}" if "iterations" in s else "-",
                     "-" if rho is None else f"{rho:+.3f}",
                     f"{s['convergence_ratio']:.3f}" if "convergence_ratio" in s else "-"])
    run.tables["lru_mla_pretrained"] = (header, rows)
    if run.cfg.lru_mla.figure:
        run.images["lru_mla_pretrained_fewshot"] = fewshot_figure(
            run.out_dir / "figures" / "lru_mla_pretrained_fewshot.png", section)
    return section


def present(run, section: dict) -> None:
    """Print the groups' table, the conversion's cost and the few-shot curve."""
    console = Console(width=max(Console().width, 170))
    print_table(console, "pretrained LRU/MLA ablation: held-out items, teacher-forced [95% Wilson]",
                *run.tables["lru_mla_pretrained"])
    rows = []
    for name, r in section["conversion"]["ranks"].items():
        d = r.get("minus_original")
        rows.append([name, f"{r['bits_per_byte']:.4f}",
                     f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {r['verdict']}" if d else ""])
    print_table(console, "MLA conversion before training: bits per byte of held-out text",
                ["latent", "bits/byte", "minus original [95% paired]"], rows)
    groups = section["fewshot"]["groups"]
    shots = list(next(iter(groups.values())))
    print_table(console, "few-shot: exact / partial by number of demonstrations", ["group", *shots],
                [[g, *(f"{r[k]['exact']:.3f} / {r[k]['partial']:.3f}" for k in shots)] for g, r in groups.items()])
