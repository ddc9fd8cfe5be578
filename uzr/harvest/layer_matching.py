"""Layer matching: which teacher layer each injected student layer learns from (``inject.teacher_layers=auto``).

Proportional depth (the default map) assumes the two models stage their work alike; issue 13 asks for
evidence instead. A harvest with ``teacher_layers=auto`` stores every teacher layer's aligned head-mean rows
(``teacher_dist_T{t}``, the leading ``max_dist_len`` block); afterwards each injected student layer ``l``
takes the teacher layer ``t`` of least mean row KL ``KL(teacher layer t || student layer l)`` on the
student's token grid: the teacher attention that the student's own attention is closest to, so the injected
prior asks the least change of that layer. KL runs in the same direction as the controller's loss and its
held-out KL.

The map is chosen on the *training* texts, as the head matching is: the held-out texts are the ones the
evaluation scores, and a map chosen on them would be tuned to its own test. The held-out KL matrix is
recorded beside the training one, so a reader sees whether the choice holds on unseen text. Layers are
matched independently (two student layers may take one teacher layer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from uzr.harvest.head_matching import head_kl


def kl_matrix(rows, layers: list[int], teacher_num_layers: int) -> tuple[np.ndarray, int]:
    """(L_t, len(layers)) mean row KL(teacher layer t || student layer l) over ``rows`` (store rows with the
    ``teacher_dist_T{t}`` candidates), and the rows counted per student layer (the fewest)."""
    sums = torch.zeros(teacher_num_layers, len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    for i in range(len(rows)):
        row = rows[i]
        teacher = torch.from_numpy(np.stack([np.asarray(row[f"teacher_dist_T{t}"]) for t in range(teacher_num_layers)]))
        for k, layer in enumerate(layers):
            kl, n = head_kl(teacher, torch.from_numpy(np.asarray(row[f"student_dist_L{layer}"]))[None])  # (L_t, 1)
            sums[:, k] += kl[:, 0]
            counts[k] += n
    return (sums / counts.clamp_min(1)).numpy(), int(counts.min()) if len(layers) else 0


def match_layers(train, heldout, layers: list[int], teacher_num_layers: int) -> dict:
    """``layout.layer_matching``: the teacher layer of least training KL for each of ``layers``.

    Returns ``{"teacher_layers": [...], "student_layers": layers, "train_kl": (L_t, n), "heldout_kl": (L_t, n)
    or None, "train_rows": ..., "heldout_rows": ..., "method": ...}`` (KL in nats per row).
    """
    if len(train) == 0:
        raise ValueError("inject.teacher_layers=auto needs training texts in the harvest store (the train split "
                         "is empty)")
    train_kl, train_rows = kl_matrix(train, layers, teacher_num_layers)
    held_kl, held_rows = kl_matrix(heldout, layers, teacher_num_layers) if len(heldout) else (None, 0)
    return {
        "teacher_layers": [int(t) for t in train_kl.argmin(0)], "student_layers": list(layers),
        "train_kl": np.round(train_kl, 6).tolist(), "train_rows": train_rows,
        "heldout_kl": None if held_kl is None else np.round(held_kl, 6).tolist(), "heldout_rows": held_rows,
        "method": "min mean row KL(teacher layer || student layer), training texts",
    }


def layer_kl_figure(path: Path, matching: dict) -> Path:
    """Heatmaps of the training and held-out KL matrices (teacher layer x injected student layer), the chosen
    teacher layer of each student layer boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = {"training texts (chooses)": matching["train_kl"]}
    if matching.get("heldout_kl") is not None:
        panels["held-out texts"] = matching["heldout_kl"]
    layers = matching["student_layers"]
    n_teacher = len(matching["train_kl"])
    vmin = min(float(np.min(kl)) for kl in panels.values())
    vmax = max(float(np.max(kl)) for kl in panels.values())  # one colour scale for both panels
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 + 1.6 * len(layers) * len(panels), 1.5 + 0.3 * n_teacher),
                             squeeze=False, layout="constrained")
    for ax, (title, kl) in zip(axes[0], panels.items()):
        kl = np.asarray(kl)  # (L_t, n)
        image = ax.imshow(kl, cmap="viridis_r", aspect="auto", vmin=vmin, vmax=vmax)
        for (t, k), value in np.ndenumerate(kl):
            ax.text(k, t, f"{value:.3f}", ha="center", va="center", fontsize=7, color="white")
        for k, t in enumerate(matching["teacher_layers"]):
            ax.add_patch(Rectangle((k - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(n_teacher))
        ax.set_xlabel("injected student layer")
        ax.set_title(title)
    axes[0, 0].set_ylabel("teacher layer")
    fig.colorbar(image, ax=axes[0, -1], label="mean row KL (nats)")
    fig.suptitle("inject.teacher_layers=auto: KL(teacher layer || student layer), chosen boxed")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
