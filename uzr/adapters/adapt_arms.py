"""What each arm of the adapt stage attaches to the student, beside its adapter, in training and in evaluation.

- ``adapt.inject=none``: nothing (the control: plain LoRA);
- ``controller``: the run's injection (:func:`uzr.injection.setup.configured_injection`: the trained controllers with
  ``inject.*`` and ``alpha.*``, sinks and heads) — a fresh injector per text, whole texts scored as generated
  (``prompt_len=0``, as bits per byte is);
- ``teacher``: the same injection of the oracle: the teacher's stored aligned rows of each text (per head after the
  store's head matching with ``controller.target=per_head``, else head means), live on QA prompts (which have no
  stored rows; the cost of ``evaluate.oracle_qa``).

The distillation targets are the same stored rows as the teacher arm's (unfloored probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from uzr.adapters.adapt_train import ArmEdit, Targets, TrainText
from uzr.config.adapt import distilled_layers
from uzr.config.inject import listed_heads
from uzr.controller.stage import ControllerStage
from uzr.evaluate.injection import matched_heads
from uzr.evaluate.sources import oracle_rows, teacher_rows_prior
from uzr.hooks import ModelEdit
from uzr.injection.qa_edits import qa_edit_for
from uzr.injection.setup import Injection, configured_injection

QAEditFor = Callable[[list], ModelEdit]  # edit_for(row_prompts) of uzr.qa.facts.qa_scores


def arm_injection(run, store, arm: str) -> Injection | None:
    """The injection of arm ``arm`` (None for ``none``); the controllers are frozen (only the adapter trains)."""
    if arm == "none":
        return None
    controllers = {}
    if arm == "controller":
        controllers = run.upstream(ControllerStage).controllers
        for controller in controllers.values():
            controller.requires_grad_(False)
    return configured_injection(run.cfg, store, controllers, run.memo, listed_heads(run.cfg.inject))


def text_edit(run, store, arm: str) -> Callable[[dict], ModelEdit | None]:
    """``edit(row)``: the arm's injector for one stored text (training or held-out), or None for the control."""
    injection = arm_injection(run, store, arm)
    if injection is None:
        return lambda row: None
    if arm == "controller":
        return lambda row: injection.injector(prompt_len=0)
    layers, heads_of, device = list(run.cfg.inject.layers), matched_heads(run.cfg, store.layout), run.cfg.device
    return lambda row: injection.injector(prompt_len=0, source=teacher_rows_prior(row, layers, heads_of, device))


def training_edit(run, store, arm: str) -> ArmEdit:
    """:func:`text_edit` for a :class:`~uzr.adapters.adapt_train.TrainText`."""
    edit = text_edit(run, store, arm)
    return lambda text: edit(text.row)


def qa_edit(run, store, arm: str) -> QAEditFor | None:
    """The arm's injector per batch of QA rows (None for the control: nothing is attached)."""
    injection = arm_injection(run, store, arm)
    if injection is None:
        return None
    controllers = dict(injection.source) if arm == "controller" else {}
    return qa_edit_for(run, injection, arm, controllers, store.layout, matched_heads(run.cfg, store.layout))


def distill_targets(run, store) -> Targets:
    """``targets(text)``: ``{layer: (1, P, n, n)}`` the teacher's aligned rows of the text's leading ``n`` tokens at the
    distilled layers (P = the student's heads with per-head targets, else 1)."""
    layers, heads_of, device = distilled_layers(run.cfg), matched_heads(run.cfg, store.layout), run.cfg.device

    def targets(text: TrainText) -> dict[int, torch.Tensor]:
        n = text.ids.shape[1]
        out = {}
        for layer in layers:
            rows = torch.as_tensor(np.asarray(oracle_rows(text.row, layer, heads_of)), dtype=torch.float32)
            rows = rows if rows.dim() == 3 else rows[None]  # (P, D, D)
            out[layer] = rows[None, :, :n, :n].to(device)
        return out

    return targets


def train_texts(store, split: str, limit: int, max_length: int, device) -> list[TrainText]:
    """The store's texts of ``split`` (the first ``limit``; 0 = all), each cut to its leading ``min(S, D,
    max_length)`` tokens, so that every position has the teacher's stored rows."""
    rows = store.rows(split)
    n = len(rows) if limit == 0 else min(limit, len(rows))
    out = []
    for i in range(n):
        row = rows[i]
        ids = np.asarray(row["input_ids"])
        length = min(len(ids), store.layout.dist_len(len(ids)), max_length)
        out.append(TrainText(torch.as_tensor(ids[:length], dtype=torch.long, device=device)[None], row))
    return out


def layers_or_all(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """``adapt.layers`` as a tuple (null: every layer)."""
    return tuple(range(num_layers)) if layers is None else tuple(sorted(layers))
