"""The Lightning module that trains one controller per injected layer and reports held-out KL."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from uzr.config.controller import ControllerSpec, coerce_spec
from uzr.controller.archs import build_controller
from uzr.controller.baselines import RecencyPrior
from uzr.controller.loss import auxiliary_loss, controller_loss, row_kl, target_rows, uniform_probs
from uzr.masks import causal_mask, masked_log_softmax

METHODS = ("controller", "uniform", "recency", "student_self")


class ControllerModule(L.LightningModule):
    """Trains one controller per injected student layer and reports held-out KL against baselines.

    Batch: ``{"mask": (B, S) bool, "hidden": {str(layer): (B, S, D)}, "target": {str(layer): (B, S, S)},
    "student_self": {str(layer): (B, S, S)}}`` (``student_self`` optional). The recency prior is fitted
    once at fit start from the datamodule's (or the trainer's) train dataloader, or by calling
    :meth:`fit_baselines` beforehand.

    ``heads`` (``controller.target=per_head``): each controller predicts one distribution per student head,
    targets and ``student_self`` are (B, heads, S, S), and every head's rows are rows of the loss and of the
    held-out KL (heads fold into the batch: the numbers are means over (text, head, row)).
    """

    def __init__(self, hidden_size: int, layers: Sequence[int],
                 spec: ControllerSpec | Mapping[str, Any] | None = None, heads: int | None = None):
        super().__init__()
        self.spec = coerce_spec(spec)
        self.hidden_size = int(hidden_size)
        self.layers = [int(x) for x in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(layers)!r} is invalid; valid: a non-empty list of distinct layer indices")
        if (heads is None) != (self.spec.target == "head_mean"):
            raise ValueError(f"controller.target={self.spec.target!r} with heads={heads!r}: per_head needs the "
                             "student's number of heads, head_mean none")
        self.heads = heads
        self.save_hyperparameters({"hidden_size": self.hidden_size, "layers": self.layers,
                                   "spec": dataclasses.asdict(self.spec), "heads": heads})
        self.controllers = nn.ModuleDict({str(x): build_controller(self.spec, self.hidden_size, heads)
                                          for x in self.layers})
        # Baselines are not parameters and are not part of the controller artifact.
        self.recency = {str(x): RecencyPrior(self.spec.max_distance) for x in self.layers}
        self._report: dict[str, float] = {}
        self._warned_no_recency = False

    # -- baselines
    @torch.no_grad()
    def fit_baselines(self, train_dataloader: Iterable[Mapping[str, Any]]) -> None:
        """Fit the per-layer recency priors on training batches."""
        for prior in self.recency.values():
            prior.reset()
        for batch in train_dataloader:
            mask = self._rows_mask(batch["mask"])
            for key, prior in self.recency.items():
                prior.accumulate(folded(batch["target"][key]), mask)
        trainer = self._trainer
        for prior in self.recency.values():
            if trainer is not None and trainer.world_size > 1:
                # Shards differ per rank; the MLE only depends on the pooled statistics.
                prior.mass = trainer.strategy.reduce(prior.mass.to(self.device), reduce_op="sum").cpu()
                prior.rows_by_len = trainer.strategy.reduce(prior.rows_by_len.to(self.device), reduce_op="sum").cpu()
            prior.finalize()

    def on_fit_start(self) -> None:
        if all(p.fitted for p in self.recency.values()):
            return
        dm = self.trainer.datamodule
        if dm is not None:
            loader = dm.train_dataloader()
        else:
            self.trainer.fit_loop.setup_data()
            loader = self.trainer.train_dataloader
        if loader is None:  # e.g. limit_train_batches=0: nothing to fit on; validation skips the prior
            warnings.warn("no train dataloader to fit the recency prior on", stacklevel=2)
            return
        self.fit_baselines(loader)

    def _rows_mask(self, mask: Tensor) -> Tensor:
        """(B, S) real tokens -> (B n, S), the mask of the rows after :func:`folded` (n: heads, or 1)."""
        return mask.bool().repeat_interleave(self.heads or 1, 0)

    # -- training
    def _layer_losses(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """Total loss, per-layer loss terms, and per-layer logits folded to (B n, S, S)."""
        mask = batch["mask"].bool()  # (B, S)
        rows_mask = self._rows_mask(mask)  # (B n, S)
        total, outs, logits = 0.0, {}, {}
        for key, ctrl in self.controllers.items():
            iterative = self.spec.arch == "lru"
            out = ctrl(batch["hidden"][key], mask) if iterative else ctrl(batch["hidden"][key])  # (B, [n,] S, S)
            logits[key] = folded(out)  # (B n, S, S)
            outs[key] = controller_loss(logits[key], folded(batch["target"][key]), rows_mask, self.spec)
            if iterative:
                outs[key]["aux"] = auxiliary_loss(ctrl.last_aux, self.spec)
                outs[key]["steps"] = ctrl.last_steps  # (B, S) iterations per position
                outs[key]["loss"] = outs[key]["loss"] + outs[key]["aux"]
            total = total + outs[key]["loss"]
        return total, outs, logits

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        total, outs, _ = self._layer_losses(batch)
        B = batch["mask"].shape[0]
        for key, out in outs.items():
            self.log(f"train/kl/L{key}", out["kl"], batch_size=B)
        self.log("train/loss", total, prog_bar=True, batch_size=B)
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # No weight decay on biases, LayerNorm and the relative-position bias: decay would pull them to 0.
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.spec.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.spec.lr)

    # -- validation
    def on_validation_epoch_start(self) -> None:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        n = len(self.layers)
        self._kl_sum = torch.zeros(n, len(METHODS), dtype=dtype, device=self.device)  # (layers, methods)
        self._rows = torch.zeros(n, len(METHODS), dtype=dtype, device=self.device)
        self._loss_sum = torch.zeros(2, dtype=dtype, device=self.device)  # (sum of B * loss, sum of B)
        self._iterations: list[Tensor] = []  # lru: (mean iterations, teacher entropy) per text and layer

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        total, outs, logits = self._layer_losses(batch)
        mask = batch["mask"].bool()  # (B, S)
        if self.spec.arch == "lru":
            self._record_iterations(outs, batch, mask)
        B = mask.shape[0]
        self._loss_sum += torch.stack([total.detach() * B, total.new_tensor(float(B))]).to(self._loss_sum.dtype)
        mask = self._rows_mask(mask)  # (B n, S): per head, each head's rows are rows of their own
        allowed = causal_mask(mask)  # (B n, S, S)
        uniform = uniform_probs(mask)  # (B n, S, S)
        for li, key in enumerate(self.controllers.keys()):
            target = folded(batch["target"][key])
            preds = {"controller": masked_log_softmax(logits[key], allowed).exp(), "uniform": uniform}
            if self.recency[key].fitted:
                preds["recency"] = self.recency[key].probs(mask)
            elif not self._warned_no_recency:
                warnings.warn("recency prior not fitted (call fit_baselines); its KL is not reported", stacklevel=2)
                self._warned_no_recency = True
            if key in batch.get("student_self", {}):
                preds["student_self"] = folded(batch["student_self"][key])
            for name, probs in preds.items():
                kl_sum, n = row_kl(target, probs, allowed)
                mi = METHODS.index(name)
                self._kl_sum[li, mi] += kl_sum.to(self._kl_sum.dtype)
                self._rows[li, mi] += n.to(self._rows.dtype)

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        kl_sum = strategy.reduce(self._kl_sum, reduce_op="sum")  # (layers, methods)
        rows = strategy.reduce(self._rows, reduce_op="sum")
        loss_sum = strategy.reduce(self._loss_sum, reduce_op="sum")
        report: dict[str, float] = {}
        for li, key in enumerate(self.controllers.keys()):
            report[f"val/rows/L{key}"] = float(rows[li, 0])
            for mi, name in enumerate(METHODS):
                if rows[li, mi] > 0:
                    report[f"val/kl/L{key}/{name}"] = float(kl_sum[li, mi] / rows[li, mi])
        for mi, name in enumerate(METHODS):
            # Pool rows over layers: a row-weighted mean, not a mean of batch means. Only reported when
            # every layer has the method, so the mean always covers the same layers.
            if bool((rows[:, mi] > 0).all()):
                report[f"val/kl/{name}"] = float(kl_sum[:, mi].sum() / rows[:, mi].sum())
        if loss_sum[1] > 0:
            report["val/loss"] = float(loss_sum[0] / loss_sum[1])
        report.update(self._iteration_report())
        for name, value in report.items():
            if not name.startswith("val/rows/"):
                self.log(name, value, prog_bar=name in ("val/loss", "val/kl/controller"))
        self._report = report

    # -- lru: iterations per text against a difficulty proxy
    @torch.no_grad()
    def _record_iterations(self, outs: Mapping[str, Any], batch: Mapping[str, Any], mask: Tensor) -> None:
        """Per text and layer: mean LRU iterations over real tokens, and the difficulty proxy, the mean
        entropy (nats) of the teacher's attention rows."""
        allowed = causal_mask(self._rows_mask(mask))  # (B n, S, S)
        n_tok = mask.sum(-1).clamp_min(1)
        B, n = mask.shape[0], self.heads or 1
        for key, out in outs.items():
            t, valid = target_rows(folded(batch["target"][key]), allowed)  # (B n, S, S), (B n, S)
            entropy = -(torch.xlogy(t, t)).sum(-1).view(B, n, -1).mean(1)  # (B, S), mean over heads
            valid = valid.view(B, n, -1).all(1)  # (B, S)
            steps = (out["steps"].float() * mask).sum(-1) / n_tok  # (B,)
            ent = (entropy * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            self._iterations.append(torch.stack([steps, ent], -1).double().cpu())

    def _iteration_report(self) -> dict[str, float]:
        """``val/lru/mean_iterations`` and ``val/lru/iterations_entropy_corr`` (Pearson, over texts)."""
        if not self._iterations:
            return {}
        x = torch.cat(self._iterations)  # (texts x layers, 2)
        report = {"val/lru/mean_iterations": float(x[:, 0].mean())}
        centred = x - x.mean(0)
        denom = centred.norm(dim=0).prod()
        if len(x) > 1 and denom > 0:
            report["val/lru/iterations_entropy_corr"] = float((centred[:, 0] * centred[:, 1]).sum() / denom)
        return report

    def heldout_report(self) -> dict[str, float]:
        """Last validation numbers as plain floats: ``val/kl/L{layer}/{method}``, ``val/kl/{method}``
        (row-weighted over layers), ``val/rows/L{layer}`` and ``val/loss``; methods: controller,
        uniform, recency, student_self."""
        return dict(self._report)


def folded(rows: Tensor) -> Tensor:
    """Per-head rows (B, n, S, S) -> (B n, S, S), head-mean rows (B, S, S) unchanged: the loss and the KL treat
    each head's rows as rows of their own."""
    return rows.flatten(0, 1) if rows.dim() == 4 else rows
