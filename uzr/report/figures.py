"""The report's figures: metric-versus-alpha curves, the layer x alpha grid, tiled heatmaps, the per-head effect map."""

from __future__ import annotations

import math
from pathlib import Path

KL_METHODS = ("controller", "student_self", "recency", "uniform")


def series_names(rows: list[dict]) -> list[str]:
    """The curves (layer sets) in the order of the rows (the sweep's order)."""
    return list(dict.fromkeys(r["series"] for r in rows))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CURVES = (
    ("bits per byte", "bpb_injected", "bpb_student"),
    ("Δ bits per byte (injected − student; band: paired 95% interval)", "bpb_delta", None),
    ("attention KL to teacher (mean over layers)", "habit_attn_kl_injected", "habit_attn_kl_student"),
    ("|Δ normalised entropy| to teacher", "habit_norm_entropy_injected", "habit_norm_entropy_student"),
    ("|Δ locality| to teacher", "habit_locality_injected", "habit_locality_student"),
    ("facts QA accuracy (chance 0.25)", "facts_qa_injected", "facts_qa_student"),
)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Metric versus alpha, one line per layer set; dashed = the same layer set without injection."""
    plt = _plt()
    series = series_names(rows)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(series)}
    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    for ax, (title, key, base) in zip(axes.flat, CURVES):
        for name in series:
            mine = sorted((r for r in rows if r["series"] == name and r.get(key) is not None and r["alpha.value"] is not None),
                          key=lambda r: r["alpha.value"])
            if not mine:
                continue
            xs = [r["alpha.value"] for r in mine]
            ax.plot(xs, [r[key] for r in mine], "o-", color=colors[name], label=f"{name} injected")
            if key == "bpb_delta" and all(r.get("bpb_delta_low") is not None for r in mine):  # each paired interval
                ax.fill_between(xs, [r["bpb_delta_low"] for r in mine], [r["bpb_delta_high"] for r in mine],
                                color=colors[name], alpha=0.15, lw=0)
            if base is not None:
                ax.plot(xs, [r[base] for r in mine], "--", color=colors[name], alpha=0.6, label=f"{name} no injection")
        if key in ("bpb_injected", "facts_qa_injected"):
            teacher_key = "bpb_teacher" if key == "bpb_injected" else "facts_qa_teacher"
            teacher = [r[teacher_key] for r in rows if r.get(teacher_key) is not None]
            if teacher:
                ax.axhline(sum(teacher) / len(teacher), color="gray", ls=":", label="teacher")
        if key == "bpb_delta":
            ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    axes.flat[7].axis("off")
    ax = axes.flat[6]  # controller held-out KL beside its baselines, per layer set
    layer_sets = list(dict.fromkeys(r["inject.layers"] for r in rows if r["heldout_kl_controller"] is not None))
    width = 0.8 / len(KL_METHODS)
    for i, method in enumerate(KL_METHODS):
        values = [next(r[f"heldout_kl_{method}"] for r in rows if r["inject.layers"] == ls) for ls in layer_sets]
        ax.bar([j + i * width for j in range(len(layer_sets))], [v if v is not None else math.nan for v in values],
               width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layer_sets))], layer_sets)
    ax.set_title("controller held-out KL vs baselines (lower = better)")
    ax.set_xlabel("injected layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(rows: list[dict], path: Path) -> None:
    """Layer set x alpha grids of what injection changed (red = worse than no injection)."""
    plt = _plt()
    import numpy as np

    series = series_names(rows)
    alphas = sorted({r["alpha.value"] for r in rows if r["alpha.value"] is not None})
    # (title, value, its no-injection baseline, +1 if higher is worse / -1 if higher is better)
    panels = [("Δ bits per byte (injected − student)", "bpb_delta", None, 1),
              ("Δ attention KL to teacher (injected − student)", "habit_attn_kl_injected", "habit_attn_kl_student", 1)]
    if any(r.get("facts_qa_injected") is not None for r in rows):
        panels.append(("Δ facts QA accuracy (injected − student)", "facts_qa_injected", "facts_qa_student", -1))
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 2.4 * len(alphas) * len(panels) / 2,
                                                      1.5 + 0.6 * len(series)), squeeze=False)
    for ax, (title, key, base, worse) in zip(axes[0], panels):
        grid = np.full((len(series), len(alphas)), np.nan)
        for r in rows:
            if r.get(key) is None or r["alpha.value"] is None:
                continue
            grid[series.index(r["series"]), alphas.index(r["alpha.value"])] = r[key] - (r[base] if base else 0.0)
        finite = grid[np.isfinite(grid)]
        span = (float(np.abs(finite).max()) if finite.size else 0.0) or 1.0
        ax.imshow(worse * grid, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.4f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_yticks(range(len(series)), series)
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tile_heatmaps(rows: list[dict], sweep: Path, path: Path) -> bool:
    """Each job's heatmaps figure (first injected layer) in a layer set x alpha grid; False if none."""
    images = {}
    for r in rows:
        figures = sorted((sweep / r["job"] / "figures").glob("heatmaps_L*.png"),
                         key=lambda p: int(p.stem.split("_L")[-1]) if p.stem.split("_L")[-1].isdigit() else 0)
        if figures:
            images[(r["series"], r["alpha.value"])] = figures[0]
    if not images:
        return False
    plt = _plt()
    import matplotlib.image as mpimg

    series = [name for name in series_names(rows) if any(key[0] == name for key in images)]
    alphas = sorted({key[1] for key in images}, key=lambda a: (a is None, a))
    fig, axes = plt.subplots(len(series), len(alphas), figsize=(6 * len(alphas), 1.9 * len(series) + 0.4),
                             squeeze=False)
    for i, name in enumerate(series):
        for j, alpha in enumerate(alphas):
            ax = axes[i][j]
            ax.axis("off")
            if (name, alpha) in images:
                ax.imshow(mpimg.imread(images[(name, alpha)]))
                ax.set_title(f"{name}, alpha {alpha}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------- command/machine


def head_effect_figure(path: Path, effects, layers: list[int], selected: list[tuple[int, int]], title: str) -> Path:
    """Per-head profile as a layer x head map of each head's effect injected alone (``effects``: (L, H) nats, the
    right candidate's mean log-likelihood change; red = helps); the selected heads are outlined."""
    import numpy as np

    plt = _plt()
    effects = np.asarray(effects, dtype=float)
    bound = float(np.nanmax(np.abs(effects))) if np.isfinite(effects).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * effects.shape[1] + 2), max(2.5, 0.5 * effects.shape[0] + 1.5)))
    image = ax.imshow(effects, cmap="RdBu_r", vmin=-bound or -1, vmax=bound or 1, aspect="auto")
    for layer, head in selected:
        row = layers.index(layer)
        ax.add_patch(plt.Rectangle((head - 0.5, row - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(effects.shape[1]))
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    ax.set_xlabel("head")
    ax.set_title(f"per-head effect: {title}", fontsize=9)
    fig.colorbar(image, ax=ax, label="Δ log-likelihood of the right answer (nats)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
