"""Training and scoring one group of the LRU/MLA ablation: data, LightningModule, teacher-forced evaluation.

Data: causal-loop samples (:mod:`uzr.tasks.causal_loop`) in the compact character form
(:mod:`uzr.tasks.compact`); the loss is the cross-entropy of the answer and ``eos`` given the prompt, plus the
LRUs' weighted auxiliary losses.

Scoring is teacher-forced: an item is exactly right when every answer token (and ``eos``) is the argmax given
the right prefix — which is exactly when greedy decoding writes the answer — and a variable is right when all
of its ``X=value,`` tokens are (per-variable partial credit). Iterations: ACT's ``N`` averaged over the item's
real positions and the model's LRU layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from uzr.config.lru_mla import LRUMLASpec
from uzr.reasoning.lru import convergence_ratio
from uzr.reasoning.tiny_lm import TinyLM
from uzr.tasks.causal_loop import generate, score_answer
from uzr.tasks.compact import EOS, PAD, CharCodec, reorder_answer, settle_order


@dataclass
class Items:
    """Tokenised items: ids (n, S) right-padded, sep (n,) index of ``sep``, level (n,), answers (n,) strings."""

    ids: np.ndarray
    sep: np.ndarray
    level: np.ndarray
    answers: list[str]


def task_texts(spec: LRUMLASpec, n: int, seed: int, exclude: set[str] | None = None
               ) -> tuple[list[str], list[str], np.ndarray, set[str]]:
    """``n`` generated items (fewer after dropping prompts in ``exclude``): their English prompts, answers (in
    ``spec.answer_order``), levels, and the set of all ``n`` prompts."""
    dependency = spec.answer_order == "dependency"
    table = generate({"n": n, "levels": list(spec.levels), "seed": seed, "max_vars": spec.max_vars,
                      "max_rounds": spec.max_rounds, "trajectory": dependency})
    prompts, answers = table["prompt"].to_pylist(), table["answer"].to_pylist()
    if dependency:  # the answer's variables in the order they settle (uzr.tasks.compact.settle_order)
        answers = [reorder_answer(a, settle_order(t, s)) for a, t, s in
                   zip(answers, table["trajectory"].to_pylist(), table["steps"].to_pylist())]
    levels = np.asarray(table["level"].to_pylist(), np.int64)
    keep = [i for i, p in enumerate(prompts) if not exclude or p not in exclude]
    return [prompts[i] for i in keep], [answers[i] for i in keep], levels[keep], set(prompts)


def make_items(spec: LRUMLASpec, n: int, seed: int, exclude: set[str] | None = None) -> tuple[Items, set[str]]:
    """``n`` generated items (fewer after dropping prompts in ``exclude``) and their prompts."""
    prompts, answers, levels, seen = task_texts(spec, n, seed, exclude)
    ids, sep = CharCodec().sequences(prompts, answers)
    return Items(ids, sep, levels, answers), seen


def targets(ids: Tensor, sep: Tensor) -> Tensor:
    """Next-token targets (B, S), -100 except on the answer and eos (the positions from ``sep`` on)."""
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = ids[:, 1:]
    pos = torch.arange(ids.shape[1], device=ids.device)
    tgt[(pos[None] < sep[:, None]) | (tgt == PAD)] = -100
    return tgt


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


class HistoryModule(L.LightningModule):
    """A LightningModule whose per-step ``history`` travels in its checkpoints, with AdamW over ``param_groups`` and
    :func:`warmup_cosine` per step (``schedule(param_groups, lr, weight_decay, warmup, total)``)."""

    history: list[dict]

    def schedule(self, params, lr: float, weight_decay: float, warmup: int, total: int) -> dict:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup, total)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("history", []))


class AblationModule(HistoryModule):
    """AdamW with linear warm-up and cosine decay; logs loss, aux and mean iterations per step into ``history``."""

    def __init__(self, model: TinyLM, spec: LRUMLASpec, total_steps: int):
        super().__init__()
        self.model, self.spec, self.total_steps = model, spec, total_steps
        self.history: list[dict] = []

    def training_step(self, batch, _):
        ids, sep = batch
        out = self.model(ids, ids != PAD)
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets(ids, sep).flatten())
        total = loss + out.aux
        row = {"loss": float(loss.detach()), "aux": float(out.aux.detach())}
        if out.refined:
            mask = ids != PAD
            row["iterations"] = float(torch.stack([r.halted.steps[mask].float().mean() for r in out.refined]).mean())
        self.history.append(row)
        self.log("train/loss", loss, prog_bar=True)
        return total

    def configure_optimizers(self):
        s = self.spec
        return self.schedule(self.model.parameters(), s.lr, s.weight_decay, s.warmup_steps, self.total_steps)


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of ``n`` items drawn from ``seed`` and the epoch (Lightning calls ``set_epoch``), so that a
    training resumed at epoch ``e`` sees the batches an uninterrupted one sees (a generator carried across epochs
    would restart from its seed)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def loader(items: Items, batch_size: int, seed: int, shuffle: bool = True):
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.from_numpy(items.ids), torch.from_numpy(items.sep))
    return DataLoader(data, batch_size=batch_size, sampler=EpochShuffle(len(data), seed) if shuffle else None)


def _variable_credit(right: np.ndarray, answer_ids: np.ndarray, comma: int) -> float:
    """Share of variables whose ``X=value`` tokens (and the comma or eos after them) are all right."""
    ends = [i for i, t in enumerate(answer_ids) if t == comma] + [len(answer_ids) - 1]
    starts = [0] + [e + 1 for e in ends[:-1]]
    return float(np.mean([right[s:e + 1].all() for s, e in zip(starts, ends)]))


@torch.no_grad()
def evaluate(model: TinyLM, items: Items, batch_size: int = 100) -> dict:
    """Per item: ``exact`` (bool), ``partial`` (float), ``nll`` (nats summed over the answer and eos),
    ``tokens`` (their count), ``tokens_right`` (argmax right), ``iterations`` (float, NaN without an LRU); and
    the convergence ratio (last / first mean residual) averaged over batches and LRU layers."""
    model.eval()
    comma = CharCodec().ids[","]
    exact, partial, iters, ratios, nll, tokens, tokens_right = [], [], [], [], [], [], []
    for start in range(0, len(items.ids), batch_size):
        ids = torch.from_numpy(items.ids[start:start + batch_size])
        sep = torch.from_numpy(items.sep[start:start + batch_size])
        mask = ids != PAD
        out = model(ids, mask)
        tgt = targets(ids, sep)
        right = (out.logits.argmax(-1) == tgt).numpy()
        loss = F.cross_entropy(out.logits.transpose(1, 2), tgt, reduction="none")  # (B, S), 0 off the answer
        nll += loss.sum(1).tolist()
        tokens += (tgt != -100).sum(1).tolist()
        tokens_right += ((tgt != -100).numpy() & right).sum(1).tolist()
        for row in range(len(ids)):
            n = int(mask[row].sum())
            s = int(sep[row])
            r = right[row, s:n - 1]  # predictions of the answer tokens and eos
            exact.append(bool(r.all()))
            partial.append(_variable_credit(r, ids[row, s + 1:n].numpy(), comma))
        if out.refined:
            steps = torch.stack([o.halted.steps.float() for o in out.refined]).mean(0)  # (B, S)
            iters += ((steps * mask).sum(1) / mask.sum(1)).tolist()
            ratios += [convergence_ratio(o.halted, mask) for o in out.refined]
        else:
            iters += [float("nan")] * len(ids)
    return {"exact": exact, "partial": partial, "nll": nll, "tokens": tokens, "tokens_right": tokens_right,
            "iterations": iters,
            "convergence_ratio": float(np.mean(ratios)) if ratios else None}


@torch.no_grad()
def greedy_decode(model: TinyLM, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy continuation of one prompt (``bos ... sep``) through the model's KV / latent cache."""
    model.eval()
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    generated: list[int] = []
    for _ in range(max_new):
        nxt = int(out.logits[0, -1].argmax())
        if nxt == EOS:
            break
        generated.append(nxt)
        out = model(torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return generated


def greedy_agreement(model: TinyLM, items: Items, exact: list[bool], n: int = 24) -> dict:
    """Greedy decoding through the cache on the first ``n`` items, scored by
    :func:`uzr.tasks.causal_loop.score_answer`, against the teacher-forced ``exact`` (they must agree)."""
    codec, agree, right = CharCodec(), 0, 0
    n = min(n, len(items.ids))
    for i in range(n):
        sep = int(items.sep[i])
        got = codec.decode(greedy_decode(model, items.ids[i, :sep + 1].tolist(), items.ids.shape[1]))
        ok = score_answer(got, items.answers[i])[0] if got else False
        right += ok
        agree += ok == bool(exact[i])
    return {"items": n, "agree": agree, "greedy_exact": right}
