"""Training one arm of the adapt stage: a LoRA adapter by next-token loss, with the arm's edits attached, in Lightning.

A step takes ``adapt.batch_size`` training texts (a fixed schedule drawn from the seed: the same texts in the same
order for every arm), runs each through the student with the adapter and the arm's edits attached (its injector,
and the :class:`~uzr.adapters.attention_kl.AttentionDistiller` when ``distill_weight`` > 0), and minimises

    loss = Σ next-token NLL / Σ predicted tokens  +  distill_weight · mean over texts of the distillation term

with Adam on the adapter's tensors only, at a learning rate warmed up linearly over ``warmup_steps`` then constant
or cosine-decayed to 0 at the last step. One Lightning epoch is ``checkpoint_every`` steps, so
:func:`uzr.resumable_fit.fit_resumable` leaves a resume point every ``checkpoint_every`` steps. A step reads its texts
off the optimiser's step count (``global_step``, restored with the checkpoint), not off the loader: Lightning's epoch
bookkeeping after a resume does not replay the same batch indices, the step count does. The per-step log and the
validation learning curve travel in the checkpoint, so a resumed arm ends with the same adapter and the same log as an
uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from uzr.adapters.attention_kl import AttentionDistiller
from uzr.adapters.peft_edit import PeftTrainable
from uzr.hooks import Edits, ModelEdit, injected


@dataclass(frozen=True)
class TrainText:
    """One text: its leading student tokens and its harvest store row (the teacher's aligned rows)."""

    ids: Tensor  # (1, n) long
    row: dict


ArmEdit = Callable[[TrainText], ModelEdit | None]  # the arm's injector for one text; None: nothing attached
Targets = Callable[[TrainText], dict[int, Tensor]]  # {layer: (1, P, n, n)} distillation targets of one text


def step_batches(n_texts: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The text indices of every step: passes over the texts, each in a fresh seeded order, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_texts, generator=generator).tolist()
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def lr_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """Multiplier of the learning rate at 0-based ``step``: linear warm-up, then 1 or a cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def text_nll(model, text: TrainText, edit: ModelEdit | None) -> Tensor:
    """Summed next-token NLL (nats) of ``text`` with ``edit`` attached (0-dim, with gradients)."""
    with injected(model, edit):
        logits = model(input_ids=text.ids).logits  # (1, n, V)
    return F.cross_entropy(logits[0, :-1].float(), text.ids[0, 1:], reduction="sum")


class AdaptModule(L.LightningModule):
    """One arm's training (see the module docstring). The student is not a submodule (a checkpoint holds the
    adapter, the optimiser, the schedule and the logs); step ``s`` trains on the texts ``batches[s]`` (the loader's
    items only count the steps of an epoch).

    Args:
        arm_edit: the arm's injector per text (None for the control); ``targets``: distillation targets per text.
        curve_texts: validation texts whose mean NLL per token is logged every ``curve_every`` steps (and at step 0).
    """

    def __init__(self, model, adapter: PeftTrainable, texts: Sequence[TrainText], batches: Sequence[Sequence[int]],
                 arm_edit: ArmEdit, targets: Targets | None, distill_weight: float, lr: float, schedule: str,
                 warmup_steps: int, curve_texts: Sequence[TrainText] = (), curve_every: int = 10):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "lm", model)  # not a submodule
        self.texts, self.batches, self.curve_texts = list(texts), [list(b) for b in batches], list(curve_texts)
        self.arm_edit, self.targets, self.distill_weight = arm_edit, targets, distill_weight
        self.lr, self.schedule, self.warmup_steps, self.curve_every = lr, schedule, warmup_steps, curve_every
        self.history: list[dict[str, float]] = []  # per step: mean NLL per token (and the distillation term)
        self.curve: list[dict[str, float]] = []  # {"step", "val_nll"}: validation mean NLL per token

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.adapter.parameters(), lr=self.lr)
        steps = len(self.batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.warmup_steps, steps, self.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def edit_for(self, text: TrainText) -> tuple[Edits, AttentionDistiller | None]:
        """The arm's edits of one text (the adapter is attached around them) and its distiller, if any."""
        distiller = AttentionDistiller(self.targets(text)) if self.distill_weight and self.targets else None
        return Edits(self.arm_edit(text), distiller), distiller

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.lm.eval()  # no dropout: a step is a deterministic function of the adapter
        texts = [self.texts[i] for i in self.batches[self.global_step]]
        nll, distill = [], []
        with injected(self.lm, self.adapter):
            for text in texts:
                edits, distiller = self.edit_for(text)
                nll.append(text_nll(self.lm, text, edits))
                if distiller is not None:
                    distill.append(distiller.loss())
        loss = torch.stack(nll).sum() / sum(t.ids.shape[1] - 1 for t in texts)
        entry = {"nll": float(loss.detach())}
        if distill:
            term = torch.stack(distill).mean()
            entry["distill"] = float(term.detach())
            loss = loss + self.distill_weight * term
        self.history.append(entry)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(texts))
        return loss

    @torch.no_grad()
    def val_nll(self) -> float:
        """Mean NLL per token of the validation texts with the adapter and the arm's edits (distiller left out)."""
        self.lm.eval()
        with injected(self.lm, self.adapter):
            total = sum(float(text_nll(self.lm, t, self.arm_edit(t))) for t in self.curve_texts)
        return total / sum(t.ids.shape[1] - 1 for t in self.curve_texts)

    def _curve_point(self) -> None:
        if self.curve_texts:
            self.curve.append({"step": int(self.global_step), "val_nll": round(self.val_nll(), 5)})

    def on_train_start(self) -> None:
        if not self.curve:  # not resumed: the starting point
            self._curve_point()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # before the epoch's checkpoint is written, so a resumed run has every point
        if self.global_step % self.curve_every == 0 or self.global_step == len(self.batches):
            self._curve_point()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["adapt_log"] = {"history": self.history, "curve": self.curve}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        log = checkpoint.get("adapt_log", {})
        self.history, self.curve = list(log.get("history", [])), list(log.get("curve", []))
