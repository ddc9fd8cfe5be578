"""The gate network, its Lightning module with baselines and held-out report, and its fitting."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from uzr.config.gate import (
    GateSpec,
    coerce_gate_spec,
)
from uzr.gate.features import pool_prefix, token_matrix
from uzr.resumable_fit import fit_resumable

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

def auroc(scores, labels) -> float:
    """Area under the ROC curve (ties averaged); NaN when only one class is present."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def auroc_se(value: float, n_pos: int, n_neg: int) -> float:
    """Hanley-McNeil standard error of an AUROC estimate with ``n_pos`` positives and ``n_neg`` negatives."""
    if not n_pos or not n_neg or math.isnan(value):
        return float("nan")
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    var = (value * (1 - value) + (n_pos - 1) * (q1 - value**2) + (n_neg - 1) * (q2 - value**2)) / (n_pos * n_neg)
    return float(math.sqrt(max(var, 0.0)))


class GateNet(nn.Module):
    """Standardise (training mean/std) -> [project the hidden-state columns onto their top ``pca``
    principal components, standardised] -> Linear -> GELU -> Dropout -> Linear -> logit.

    Everything fitted on the training split (:meth:`set_normalisation`) is a buffer, so it is saved
    with the weights. The projection keeps a few hundred training texts from being drowned by
    thousands of hidden-state columns (the MLP overfits them otherwise).
    """

    def __init__(self, in_features: int, hidden: int = 64, dropout: float = 0.1,
                 hidden_columns: Sequence[int] = (), pca: int = 0):
        super().__init__()
        cols = [int(c) for c in hidden_columns] if pca > 0 else []
        k = min(pca, len(cols))
        other = sorted(set(range(in_features)) - set(cols))
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.register_buffer("proj_idx", torch.tensor(cols, dtype=torch.long))
        self.register_buffer("other_idx", torch.tensor(other, dtype=torch.long))
        self.register_buffer("proj", torch.zeros(len(cols), k))
        self.register_buffer("proj_mean", torch.zeros(k))
        self.register_buffer("proj_std", torch.ones(k))
        self.width = k + len(other)
        self.net = nn.Sequential(nn.Linear(self.width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def _standardise(self, x: Tensor) -> Tensor:
        return ((x.to(self.mean.dtype) - self.mean) / self.std).clamp(-10, 10)

    @torch.no_grad()
    def set_normalisation(self, x: Tensor) -> None:
        """Fit the standardisation (and the principal components) on (N, F) training features."""
        x = x.float().to(self.mean.device)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp(min=1e-6))
        k = self.proj.shape[1]
        if k:
            h = self._standardise(x)[:, self.proj_idx]  # (N, H)
            q = min(k, *h.shape)
            with torch.random.fork_rng(devices=[]):  # randomised PCA, deterministic
                torch.manual_seed(0)
                _, _, v = torch.pca_lowrank(h, q=q, center=True, niter=4)  # (H, q)
            self.proj.zero_()
            self.proj[:, :q] = v
            p = h @ self.proj
            self.proj_mean.copy_(p.mean(0))
            self.proj_std.copy_(p.std(0, unbiased=False).clamp(min=1e-6))

    def inputs(self, x: Tensor) -> Tensor:
        """(N, F) raw features -> (N, width) MLP inputs."""
        z = self._standardise(x)
        if self.proj.shape[1] == 0:
            return z
        p = ((z[:, self.proj_idx] @ self.proj - self.proj_mean) / self.proj_std).clamp(-10, 10)
        return torch.cat([p, z[:, self.other_idx]], -1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, F) raw features -> (N,) logits."""
        return self.net(self.inputs(x)).squeeze(-1)


def _accuracies(predicted: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Plain accuracy and balanced accuracy (the mean of the true-positive and true-negative rates; NaN-free: a
    class absent from ``y`` is left out) of (n,) bool predictions against (n,) bool labels."""
    rates = [float((predicted[y == c] == c).mean()) for c in (True, False) if (y == c).any()]
    return {"accuracy": float((predicted == y).mean()), "balanced_accuracy": float(np.mean(rates))}


def _best_threshold(score: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising the accuracy of ``score > t`` on (score, y); returns (t, accuracy)."""
    order = np.argsort(score, kind="stable")
    s, yy = score[order], y[order].astype(np.int64)
    n = len(s)
    # predicting positive for the top n-k items (k = items at or below the cut): correct = negatives
    # among the first k + positives among the rest
    neg_below = np.concatenate([[0], np.cumsum(1 - yy)])
    pos_above = yy.sum() - np.concatenate([[0], np.cumsum(yy)])
    correct = neg_below + pos_above  # (n + 1,), index k = cut after k items
    valid = np.ones(n + 1, bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut only between distinct scores
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        t = s[0] - 1.0
    elif k == n:
        t = s[-1] + 1.0
    else:
        t = (s[k - 1] + s[k]) / 2.0
    return float(t), float(correct[k] / n)


class GateModule(L.LightningModule):
    """The gate: a :class:`GateNet` trained with BCE, plus its baselines and held-out report.

    Args:
        in_features: width of the gate input; ``feature_names``: one per column (see :func:`feature_names`);
        level: ``token`` or ``prompt`` (what the labels were); ``layers``: injected layers of the features.
    """

    def __init__(self, in_features: int, spec: GateSpec | Mapping[str, Any] | None = None,
                 feature_names: Sequence[str] | None = None, level: str = "token", layers: Sequence[int] = ()):
        super().__init__()
        self.spec = coerce_gate_spec(spec)
        self.in_features = int(in_features)
        self.feature_names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(in_features)]
        if len(self.feature_names) != self.in_features:
            raise ValueError(f"{len(self.feature_names)} feature names for {self.in_features} features")
        self.level, self.layers = level, [int(x) for x in layers]
        hidden_columns = [i for i, name in enumerate(self.feature_names) if name.split(":")[-1].startswith("hidden_L")]
        self.net = GateNet(self.in_features, self.spec.hidden, self.spec.dropout, hidden_columns, self.spec.hidden_pca)
        self.register_buffer("pos_weight", torch.ones(()))
        self.baselines: dict[str, Any] = {}
        self.extra_report: dict[str, Any] = {}
        self._report: dict[str, Any] = {}
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []

    # -- baselines
    def entropy_column(self) -> int | None:
        for name in ("cur:student_entropy", "student_entropy", "mean:student_entropy"):
            if name in self.feature_names:
                return self.feature_names.index(name)
        return None

    def fit_baselines(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Majority class and a student-entropy threshold, both fitted on the training split."""
        y_np = y.bool().cpu().numpy()
        majority = bool(y_np.mean() >= 0.5)
        self.baselines = {"majority_class": majority}
        col = self.entropy_column()
        if col is not None:
            ent = x[:, col].double().cpu().numpy()
            sign = -1.0 if auroc(-ent, y_np) >= 0.5 else 1.0  # low student entropy usually means confident
            threshold, train_acc = _best_threshold(sign * ent, y_np)
            self.baselines.update({"entropy_column": col, "entropy_sign": sign, "entropy_threshold": threshold,
                                   "entropy_train_accuracy": train_acc})
        pos = float(y_np.sum())
        neg = float(len(y_np) - pos)
        self.pos_weight.fill_(neg / pos if (self.spec.balance and pos > 0 and neg > 0) else 1.0)
        return self.baselines

    def _scores(self, x: Tensor, y: Tensor, prob: Tensor) -> dict[str, Any]:
        y_np = y.bool().cpu().numpy()
        p = prob.double().cpu().numpy()
        majority = np.full_like(y_np, self.baselines.get("majority_class", True))
        out = {"gate": {"auroc": auroc(p, y_np), **_accuracies(p > 0.5, y_np)},
               "majority": {"auroc": 0.5, **_accuracies(majority, y_np)}}
        if "entropy_column" in self.baselines:
            s = self.baselines["entropy_sign"] * x[:, self.baselines["entropy_column"]].double().cpu().numpy()
            out["student_entropy"] = {"auroc": auroc(s, y_np), **_accuracies(s > self.baselines["entropy_threshold"], y_np)}
        return out

    # -- training
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def predict_proba(self, x: Tensor) -> Tensor:
        """x: (N, F) gate inputs -> (N,) probabilities of 'teacher confident' in [0, 1]."""
        self.net.eval()
        with torch.no_grad():
            return torch.sigmoid(self.net(x.to(self.net.mean.device)))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self.net(x), y.float(), pos_weight=self.pos_weight)
        self.log("gate/train_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.net.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.spec.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.spec.lr)

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self._val.append((x.detach().cpu(), y.detach().cpu(), torch.sigmoid(logits).detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        x, y, p = (torch.cat(t) for t in zip(*self._val))
        scores = self._scores(x, y, p)
        for method, values in scores.items():
            for metric, value in values.items():
                if not math.isnan(value):
                    self.log(f"gate/val_{metric}" + ("" if method == "gate" else f"/{method}"), value,
                             prog_bar=method == "gate" and metric == "auroc")

    # -- report
    def evaluate_heldout(self, x: Tensor, y: Tensor, x_train: Tensor | None = None, y_train: Tensor | None = None
                         ) -> dict[str, Any]:
        """The final report on the held-out split (see :meth:`report`)."""
        scores = self._scores(x, y, self.predict_proba(x).cpu())
        g, m = scores["gate"], scores["majority"]
        e = scores.get("student_entropy")
        n_pos = int(y.sum())
        se = auroc_se(g["auroc"], n_pos, int(len(y)) - n_pos)
        g["auroc_se"] = se
        report: dict[str, Any] = {
            "level": self.level, "n_heldout": int(len(y)), "positive_rate_heldout": float(y.float().mean()),
            **scores,
            # majority: its AUROC and balanced accuracy are 0.5 by construction. Balanced, not plain, accuracy: with
            # rare positives (prompt labels: 8 % CONFIDENT) a class-balanced gate gives up plain accuracy by design
            "beats_majority": bool(g["balanced_accuracy"] > m["balanced_accuracy"] and g["auroc"] > 0.5),
            # student entropy: threshold-free comparison
            "beats_student_entropy": bool(e is not None and g["auroc"] > e["auroc"]),
            # a margin inside two standard errors is noise, whatever the booleans above say
            "clearly_above_chance": bool(g["auroc"] - 2 * se > 0.5),
        }
        if e is not None:
            report["clearly_beats_student_entropy"] = bool(g["auroc"] - e["auroc"] > 2 * se)
        if x_train is not None and y_train is not None:
            report["n_train"] = int(len(y_train))
            report["positive_rate_train"] = float(y_train.float().mean())
            report["gate_train"] = {"auroc": auroc(self.predict_proba(x_train).cpu().numpy(), y_train.numpy())}
        parts = [f"held-out AUROC {g['auroc']:.3f}, accuracy {g['accuracy']:.3f} (balanced {g['balanced_accuracy']:.3f})",
                 f"majority class accuracy {m['accuracy']:.3f} (balanced 0.5)"]
        if e is not None:
            parts.append(f"student-entropy threshold AUROC {e['auroc']:.3f}, accuracy {e['accuracy']:.3f}")
        beats = report["beats_majority"] and (e is None or report["beats_student_entropy"])
        clear = report["clearly_above_chance"] and report.get("clearly_beats_student_entropy", True)
        head = ("gate beats the baselines" if beats and clear else
                "gate beats the baselines only within noise (2 SE)" if beats else "gate does NOT beat the baselines")
        parts.insert(1, f"2 SE {2 * se:.3f}")
        report["verdict"] = f"{head}: " + "; ".join(parts)
        report.update(self.extra_report)
        self._report = report
        return report

    def report(self) -> dict[str, Any]:
        """Plain dict: ``gate`` / ``majority`` / ``student_entropy`` → ``{auroc, accuracy}`` on the held-out
        split, ``beats_majority``, ``beats_student_entropy``, ``verdict``, sizes and positive rates, and
        label details (thresholds, label counts) for the level."""
        return dict(self._report)

    # -- run time
    def gate_inputs(self, token_feats: Tensor) -> Tensor:
        """Per-position (S, F0) features (:func:`token_matrix`) -> (S, F) pooled gate inputs."""
        return pool_prefix(token_feats, self.spec.pool)

    def positions(self, parts: Mapping[str, Tensor]) -> Tensor:
        """Gate value at every position (S,) of one sequence, from :func:`sequence_parts` output."""
        return self.predict_proba(self.gate_inputs(token_matrix(parts, self.spec.features))).cpu()

    def prompt_value(self, parts: Mapping[str, Tensor]) -> float:
        """Gate value of a prompt: the gate at its last token."""
        return float(self.positions(parts)[-1])


def fit_gate(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, spec: GateSpec | Mapping | None = None,
             names: Sequence[str] | None = None, level: str = "token", layers: Sequence[int] = (),
             loggers=None, trainer_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
             checkpoints: Path | None = None) -> GateModule:
    """Train a gate on (N, F) features and (N,) 0/1 labels; validates on ``(x_val, y_val)`` every epoch
    and leaves the final held-out report in ``module.report()``. With ``checkpoints`` (a folder), a
    checkpoint is written every epoch and a killed training resumes from it (``module.resumed``)."""
    spec = coerce_gate_spec(spec)
    y_train, y_val = torch.as_tensor(y_train).bool(), torch.as_tensor(y_val).bool()
    x_train, x_val = torch.as_tensor(x_train).float(), torch.as_tensor(x_val).float()
    for name, y in (("training", y_train), ("held-out", y_val)):
        if len(y) == 0 or bool(y.all()) or not bool(y.any()):
            raise ValueError(f"the gate's {name} labels contain one class only ({int(y.sum())} positive of {len(y)}); "
                             "adjust gate.confident_quantile / gate.confident_entropy or use more data")
    L.seed_everything(seed, workers=True)
    module = GateModule(x_train.shape[1], spec, names, level, layers)
    module.net.set_normalisation(x_train)
    module.fit_baselines(x_train, y_train)
    g = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train.float()),
                                               batch_size=spec.batch_size, shuffle=True, generator=g)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_val, y_val.float()),
                                             batch_size=max(spec.batch_size, 1024))
    kwargs = {"accelerator": "cpu", "devices": 1, "deterministic": True, "log_every_n_steps": 10,
              "enable_progress_bar": False, **(trainer_kwargs or {})}
    kwargs.update(max_epochs=spec.max_epochs, logger=loggers or False, enable_model_summary=False,
                  num_sanity_val_steps=0)
    if checkpoints is None:
        L.Trainer(enable_checkpointing=False, **kwargs).fit(module, train_loader, val_loader)
        module.resumed = False
    else:
        module.resumed = fit_resumable(module, Path(checkpoints), "gate", kwargs,
                                       train_dataloaders=train_loader, val_dataloaders=val_loader)
    module.cpu().eval()
    module.evaluate_heldout(x_val, y_val, x_train, y_train)
    return module
