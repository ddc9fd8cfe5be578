"""Evaluation: bits per byte with and without injection, habit distance, next-token KL, heatmaps.

Everything is measured on the store's held-out rows, so the teacher's aligned attention (for habit
distance) and its own bits per byte (harvested beside it) come with each text and the teacher need
not be loaded again. Every injected number sits beside the uninjected student and the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from uzr.attention import LayerRecorder, attention_modules, use_uzr_attention
from uzr.harvest.stats import distribution_stats
from uzr.inject import Injector
from uzr.next_token import lm_head_logits, next_token_stats
from uzr.text_bytes import predicted_bytes

HABITS = ("norm_entropy", "locality")


@dataclass
class StudentPass:
    nll: torch.Tensor  # (S-1,) nats of tokens 1..S-1
    head_mean: dict[int, torch.Tensor]  # layer -> (S', S'), S' = min(S, dist_rows)
    final: torch.Tensor  # (1, S, D)


@torch.no_grad()
def student_pass(student, ids: torch.Tensor, layers: list[int], window: int,
                 injector: Injector | None = None, dist_rows: int | None = None) -> StudentPass:
    """One forward of the student (injected if ``injector``), recording head-mean attention at ``layers``
    for the leading ``dist_rows`` positions (None: all)."""
    use_uzr_attention(student)
    modules = attention_modules(student)
    for layer in layers:
        modules[layer].uzr_recorder = LayerRecorder(window, keep_head_mean=True, block_size=ids.shape[1],
                                                    dist_rows=dist_rows)
    # One flag per decoder layer (kept on the device, read only on failure): which layer went non-finite.
    finite: dict[int, torch.Tensor] = {}
    watch = [module.register_forward_hook(_finite_flag(finite, index)) for index, module in enumerate(modules)]
    if injector is not None:
        injector.attach(student)
    try:
        out = student.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        if injector is not None:
            injector.remove()
        for handle in watch:
            handle.remove()
        head_mean = {layer: modules[layer].uzr_recorder.result()[1][0] for layer in layers}
        # Rows whose scores were non-finite: the attention function zeroes them and counts them.
        lost = [layer for layer in layers if getattr(modules[layer].uzr_recorder, "nonfinite_rows", 0)]
        for layer in layers:
            del modules[layer].uzr_recorder
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


def nonfinite_message(injector: Injector | None, finite: dict[int, torch.Tensor], lost: list[int]) -> str:
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
        f"non-finite values in the student forward pass with injection at layers {sorted(injector.controllers)} "
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


def next_token_kl(teacher, teacher_final: torch.Tensor, student, student_final: torch.Tensor) -> float:
    """Mean KL(teacher || student) of next-token distributions (same vocabulary, same tokens)."""
    t = torch.log_softmax(lm_head_logits(teacher, teacher_final), -1)
    s = torch.log_softmax(lm_head_logits(student, student_final), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


class Evaluator:
    """Runs the student over held-out store rows, plain and injected, and aggregates the metrics."""

    def __init__(self, student, tokenizer, layers: list[int], window: int, max_length: int):
        self.student, self.tokenizer, self.layers = student, tokenizer, list(layers)
        self.window, self.max_length = window, max_length
        self.device = next(student.parameters()).device

    def evaluate(self, rows, make_injector, teacher=None, teacher_tokenizer_same: bool = False) -> dict:
        """``rows``: held-out store rows; ``make_injector()``: a fresh Injector for the injected run."""
        totals = {"student": 0.0, "injected": 0.0, "teacher": 0.0, "bytes": 0, "teacher_bytes": 0}
        habits = {"student": [], "injected": []}
        kls = {"student": [], "injected": []}
        for row in rows:
            enc = self.tokenizer(row["text"], return_offsets_mapping=True, truncation=True, max_length=self.max_length)
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long, device=self.device)[None]
            n_bytes = predicted_bytes(row["text"], [tuple(o) for o in enc["offset_mapping"]])
            totals["bytes"] += n_bytes
            totals["teacher"] += float(row["teacher_nll_sum"])
            totals["teacher_bytes"] += int(row["teacher_bytes"])
            # habits are compared on the leading (d, d) block, the part of the teacher's rows the store keeps
            d = row[f"teacher_dist_L{self.layers[0]}"].shape[-1]
            passes = {
                "student": student_pass(self.student, ids, self.layers, self.window, dist_rows=d),
                "injected": student_pass(self.student, ids, self.layers, self.window, make_injector(), d),
            }
            for name, result in passes.items():
                totals[name] += float(result.nll.sum())
                habits[name].append({
                    layer: habit_gap(result.head_mean[layer], torch.as_tensor(row[f"teacher_dist_L{layer}"]), self.window)
                    for layer in self.layers
                })
                if teacher is not None and teacher_tokenizer_same:
                    with torch.no_grad():
                        t_final = teacher.model(input_ids=ids.to(teacher.device)).last_hidden_state
                    kls[name].append(next_token_kl(teacher, t_final, self.student, result.final))
        bpb = {name: totals[name] / (math.log(2) * totals["bytes"]) for name in ("student", "injected")}
        bpb["teacher"] = totals["teacher"] / (math.log(2) * totals["teacher_bytes"])
        metrics = {
            "bits_per_byte": bpb,
            "habit_distance": {
                f"L{layer}": {name: mean_dicts([h[layer] for h in habits[name]]) for name in habits}
                for layer in self.layers
            },
            "num_texts": len(habits["student"]),
        }
        if kls["student"]:
            metrics["next_token_kl"] = {name: float(np.mean(v)) for name, v in kls.items()}
        return metrics


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
