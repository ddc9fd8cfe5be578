"""The ablation's figure: exact accuracy by level per group (Wilson 95% bars) and ACT / fixed iterations by level."""

from __future__ import annotations

from pathlib import Path


def figure(path: Path, section: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = section["groups"]
    levels = [k for k in next(iter(groups.values()))["accuracy"] if k != "all"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(groups)
    x = np.arange(len(levels))
    for i, (g, s) in enumerate(groups.items()):
        acc = np.array([s["accuracy"][lv]["exact"] for lv in levels])
        err = np.array([[acc[j] - s["accuracy"][lv]["low"], s["accuracy"][lv]["high"] - acc[j]]
                        for j, lv in enumerate(levels)]).T
        ax1.bar(x + i * width, acc, width, yerr=err, capsize=2, label=f"{s['letter']} {g} ({s['parameters']:,} p)")
        if "iterations" in s:
            ax2.plot(x, [s["iterations"][lv] for lv in levels], marker="o", label=f"{s['letter']} {g}")
    ax1.set_xticks(x + 0.4 - width / 2, [lv.replace("level_", "level ") for lv in levels])
    ax1.set_ylabel("exact accuracy (held-out, 95% Wilson)")
    ax1.legend(fontsize=7)
    ax2.set_xticks(x, [lv.replace("level_", "level ") for lv in levels])
    ax2.set_ylabel("mean LRU iterations per position")
    ax2.legend(fontsize=7)
    fig.suptitle(f"LRU/MLA ablation on causal-loop tasks ({section['heldout_items']} held-out items)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fewshot_figure(path: Path, section: dict) -> Path:
    """The pretrained ablation's few-shot curve: exact (Wilson 95% bars) and partial accuracy against the number of
    demonstrations, one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for g, rows in section["fewshot"]["groups"].items():
        shots = [int(k) for k in rows]
        label = f"{section['groups'][g]['letter']} {g}"
        exact = [rows[k]["exact"] for k in rows]
        err = [[r["exact"] - r["low"] for r in rows.values()], [r["high"] - r["exact"] for r in rows.values()]]
        ax1.errorbar(shots, exact, yerr=err, marker="o", capsize=2, label=label)
        ax2.plot(shots, [rows[k]["partial"] for k in rows], marker="o", label=label)
    for ax, what in ((ax1, "exact accuracy (95% Wilson)"), (ax2, "partial credit (share of variables right)")):
        ax.set_xlabel("solved demonstrations in the prompt")
        ax.set_ylabel(what)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.legend(fontsize=7)
    n = next(iter(next(iter(section["fewshot"]["groups"].values())).values()))["n"]
    fig.suptitle(f"Few-shot efficiency after fine-tuning, pretrained SmolLM2-135M ({n} held-out items per point)")
    return _save(fig, path)
