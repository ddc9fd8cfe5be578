"""What is measured on one text: a student pass (plain or edited) with its next-token loss and recorded
attention, the habit distance of that attention to the teacher's, next-token KL, and the heatmap figure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uzr.attention import LayerRecorder, attention_modules, decoder_of, recording
from uzr.attention.stats import distribution_stats
from uzr.hooks import ModelEdit, injected
from uzr.next_token import next_token_kl, next_token_stats  # noqa: F401 (next_token_kl: re-exported)

HABITS = ("norm_entropy", "locality")


@dataclass
class StudentPass:
    nll: torch.Tensor  # (S-1,) nats of tokens 1..S-1
    head_mean: dict[int, torch.Tensor]  # layer -> (S', S'), S' = min(S, dist_rows)
    final: torch.Tensor  # (1, S, D)


@torch.no_grad()
def student_pass(student, ids: torch.Tensor, layers: list[int], window: int,
                 injector: ModelEdit | None = None, dist_rows: int | None = None) -> StudentPass:
    """One forward of the student (edited by ``injector`` if given), recording head-mean attention at ``layers``
    for the leading ``dist_rows`` positions (None: all)."""
    recorders = {layer: LayerRecorder(window, keep_head_mean=True, block_size=ids.shape[1], dist_rows=dist_rows)
                 for layer in layers}
    # One flag per decoder layer (kept on the device, read only on failure): which layer went non-finite.
    finite: dict[int, torch.Tensor] = {}
    watch = [module.register_forward_hook(_finite_flag(finite, index))
             for index, module in enumerate(attention_modules(student))]
    try:
        with recording(student, recorders), injected(student, injector):
            out = decoder_of(student)(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in watch:
            handle.remove()
    head_mean = {layer: recorders[layer].result()[1][0] for layer in layers}
    # Rows whose scores were non-finite: the attention function zeroes them and counts them.
    lost = [layer for layer in layers if recorders[layer].nonfinite_rows]
    final = out.last_hidden_state
    nll = next_token_stats(student, final[:, :-1], ids[:, 1:])["nll"][0]
    # Every query row has real keys (no padding), so each recorded row must also carry probability 1.
    lost += [layer for layer, probs in head_mean.items()
             if layer not in lost and not bool(((probs.sum(-1) - 1).abs() <= 1e-3).all())]
    if not torch.isfinite(nll).all() or lost:
        raise FloatingPointError(nonfinite_message(injector, finite, lost))
    return StudentPass(nll, head_mean, final)


def _finite_flag(flags: dict[int, torch.Tensor], index: int):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        flags[index] = torch.isfinite(out).all()

    return hook


def nonfinite_message(injector, finite: dict[int, torch.Tensor], lost: list[int]) -> str:
    """What went non-finite, where, and with which injection (layers, alpha, schedule, mode)."""
    first = next((index for index in sorted(finite) if not bool(finite[index])), None)
    where = []
    if first is not None:
        where.append(f"first non-finite attention output at layer {first}")
    if lost:
        where.append(f"non-finite attention scores at layer(s) {lost}")
    detail = f" ({'; '.join(where)})" if where else ""
    if injector is None:
        return (f"non-finite values in the student forward pass without injection{detail}; "
                "check the student's dtype (try float32)")
    alpha = injector.alpha
    weights = f", layer_weights={dict(alpha.layer_weights)}" if alpha.layer_weights else ""
    return (
        f"non-finite values in the student forward pass with injection at layers {sorted(injector.prior.layers)} "
        f"(alpha={alpha.value}, schedule={alpha.schedule}{weights}, mode={injector.mode}){detail}; "
        f"check the controller's outputs or lower alpha"
    )


def habit_gap(probs: torch.Tensor, teacher: torch.Tensor, window: int) -> dict[str, float]:
    """Mean |habit(probs) - habit(teacher)| over positions, and the row KL(teacher || probs)."""
    mine, theirs = distribution_stats(probs, window), distribution_stats(teacher, window)
    gap = {name: float((mine[name] - theirs[name]).abs().mean()) for name in HABITS}
    t, p = teacher.float(), probs.float().clamp(min=1e-12)
    gap["attn_kl"] = float((torch.special.xlogy(t, t) - t * p.log()).sum(-1).mean())
    return gap


def mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([d[key] for d in dicts])) for key in dicts[0]}


def heatmap_figure(path, teacher: np.ndarray, controller: np.ndarray, student: np.ndarray, injected: np.ndarray,
                   layer: int, title: str = "") -> None:
    """teacher | controller | student | injected student head-mean attention on one text, one layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"teacher (aligned)": teacher, "controller": controller, "student": student, "injected student": injected}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    vmax = float(np.quantile(np.concatenate([p[np.tril_indices_from(p, -1)] for p in panels.values()]), 0.99))
    for ax, (name, probs) in zip(axes, panels.items()):
        image = ax.imshow(probs, cmap="magma", vmin=0, vmax=max(vmax, 1e-6))
        ax.set_title(name)
        ax.set_xlabel("key position")
    axes[0].set_ylabel("query position")
    fig.colorbar(image, ax=axes, fraction=0.015)
    fig.suptitle(f"student layer {layer} {title}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
