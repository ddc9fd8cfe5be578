"""Training and scoring one group's top on the frozen prefix's states (pretrained LRU/MLA ablation).

A batch is item indices; the collate step right-pads the items' cached lower-layer states (B, S, d) and ids. The
SFT loss is the cross-entropy of the answer tokens (and the end-of-answer token) given the prompt, teacher-forced,
plus the LRUs' weighted auxiliary losses; logits are computed only where an answer token is predicted (the output
embedding is 49k x 576: the full (B, S, V) would dominate a CPU step).

Scoring is teacher-forced as in :func:`uzr.reasoning.training.evaluate`: exact when every answer token is the
argmax given the right prefix, partial = share of variables whose tokens all are; the same per-item fields, so
:mod:`uzr.reasoning.ablation_report` reads both ablations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from uzr.config.lru_mla import LRUMLASpec
from uzr.reasoning.lru import convergence_ratio
from uzr.reasoning.pretrained_items import TokenItems
from uzr.reasoning.pretrained_top import PretrainedTop
from uzr.reasoning.training import HistoryModule


def batch_of(states: list[Tensor], items: TokenItems, rows: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(hidden (B, S, d), mask (B, S), positions (N, 2) [row, position predicting a target], targets (N,))`` of
    ``rows``; the targets are every answer token (from ``answer_start``) of each row."""
    width = max(len(items.ids[i]) for i in rows)
    hidden = states[rows[0]].new_zeros(len(rows), width, states[rows[0]].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    where, targets = [], []
    for b, i in enumerate(rows):
        n = len(items.ids[i])
        hidden[b, :n], mask[b, :n] = states[i], True
        for t in range(items.answer_start[i], n):
            where.append((b, t - 1))
            targets.append(items.ids[i][t])
    return hidden, mask, torch.tensor(where), torch.tensor(targets)


def answer_logits(top: PretrainedTop, hidden: Tensor, mask: Tensor, where: Tensor):
    """The top's logits (N, V) at ``where`` and its output (for the auxiliary losses and halting statistics)."""
    out = top(hidden, mask)
    return top.logits(out.hidden[where[:, 0], where[:, 1]]), out


class TopModule(HistoryModule):
    """SFT of a group's top: AdamW (pretrained weights at ``lr``, the LRU and its gate at ``lru_lr``), linear
    warm-up and cosine decay over ``steps``; per step loss, aux and mean iterations into ``history``."""

    def __init__(self, top: PretrainedTop, spec: LRUMLASpec, states: list[Tensor], items: TokenItems):
        super().__init__()
        self.top, self.spec = top, spec
        self.states, self.items = states, items
        self.history: list[dict] = []

    def training_step(self, batch, _):
        hidden, mask, where, targets = batch_of(self.states, self.items, [int(i) for i in batch])
        logits, out = answer_logits(self.top, hidden, mask, where)
        loss = F.cross_entropy(logits, targets)
        row = {"loss": float(loss.detach()), "aux": float(out.aux.detach())}
        if out.refined:
            row["iterations"] = float(torch.stack([r.halted.steps[mask].float().mean() for r in out.refined]).mean())
        self.history.append(row)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss + out.aux

    def configure_optimizers(self):
        p = self.spec.pretrained
        fresh = [q for name, q in self.top.named_parameters() if ".refiner." in name]
        ids = {id(q) for q in fresh}
        groups = [{"params": [q for q in self.top.parameters() if id(q) not in ids], "lr": p.lr}]
        if fresh:
            groups.append({"params": fresh, "lr": p.lru_lr})
        return self.schedule(groups, p.lr, self.spec.weight_decay, min(self.spec.warmup_steps, p.steps // 10), p.steps)


def epochs_for(spec: LRUMLASpec, train_items: int) -> int:
    """Epochs of ``ceil(items / batch)`` batches that hold ``pretrained.steps`` steps (Lightning stops at the step)."""
    per_epoch = math.ceil(train_items / spec.pretrained.batch_size)
    return math.ceil(spec.pretrained.steps / per_epoch)


@torch.no_grad()
def score(top: PretrainedTop, states: list[Tensor], items: TokenItems, batch_size: int = 16) -> dict:
    """Per item: ``exact``, ``partial``, ``nll`` (nats over the answer tokens), ``tokens``, ``tokens_right``,
    ``iterations`` (ACT's N averaged over the item's real positions and the LRU layers; NaN without an LRU); and the
    convergence ratio averaged over batches and LRU layers."""
    top.eval()
    out = {k: [] for k in ("exact", "partial", "nll", "tokens", "tokens_right", "iterations")}
    ratios = []
    for start in range(0, len(items), batch_size):
        rows = list(range(start, min(start + batch_size, len(items))))
        hidden, mask, where, targets = batch_of(states, items, rows)
        logits, result = answer_logits(top, hidden, mask, where)
        nll = F.cross_entropy(logits, targets, reduction="none")
        right = (logits.argmax(-1) == targets).numpy()
        first = 0
        for i in rows:
            n = len(items.ids[i]) - items.answer_start[i]
            r = right[first:first + n]
            ends = items.variable_ends[i]
            out["exact"].append(bool(r.all()))
            out["partial"].append(float(np.mean([r[s:e].all() for s, e in zip([0, *ends[:-1]], ends)])))
            out["nll"].append(float(nll[first:first + n].sum()))
            out["tokens"].append(n)
            out["tokens_right"].append(int(r.sum()))
            first += n
        if result.refined:
            steps = torch.stack([o.halted.steps.float() for o in result.refined]).mean(0)  # (B, S)
            out["iterations"] += ((steps * mask).sum(1) / mask.sum(1)).tolist()
            ratios += [convergence_ratio(o.halted, mask) for o in result.refined]
        else:
            out["iterations"] += [float("nan")] * len(rows)
    out["convergence_ratio"] = float(np.mean(ratios)) if ratios else None
    return out


@torch.no_grad()
def text_nll(top: PretrainedTop, states: list[Tensor], ids: list[list[int]], batch_size: int = 8) -> list[float]:
    """Summed next-token NLL (nats) of tokens 1..S-1 of each text given the lower layers' states."""
    top.eval()
    totals = []
    for start in range(0, len(ids), batch_size):
        rows = list(range(start, min(start + batch_size, len(ids))))
        width = max(len(ids[i]) for i in rows)
        hidden = states[rows[0]].new_zeros(len(rows), width, states[rows[0]].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, i in enumerate(rows):
            hidden[b, :len(ids[i])], mask[b, :len(ids[i])] = states[i], True
        out = top(hidden, mask).hidden
        for b, i in enumerate(rows):
            logp = torch.log_softmax(top.logits(out[b, :len(ids[i]) - 1]), -1)
            totals.append(float(-logp.gather(-1, torch.tensor(ids[i][1:])[:, None]).sum()))
    return totals
