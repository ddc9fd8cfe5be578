"""One evaluation for every setting: the student on held-out texts, plain or edited, on one path.

A :class:`Setting` names a way to run the student (``none``, ``constant@0.5``, ``gated@1``, and
later oracles or weight-space adapters) and makes a fresh :class:`~uzr.hooks.ModelEdit` for each text.
:func:`score_settings` runs every setting on every text through the same
:func:`~uzr.evaluate.passes.student_pass` — so two settings that coincide give identical numbers —
and keeps per text what paired comparisons need: its loss in nats and its bytes. A ``memo`` (the run's
:meth:`~uzr.runner.RunContext.memo`) shares passes between the stages of a run through the setting's
``key``: the gate table's ``none`` row is the evaluate stage's plain student, not a second
measurement of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from uzr.attention import decoder_of
from uzr.config.inject import AlphaSpec
from uzr.evaluate.passes import habit_gap, mean_dicts, next_token_kl, student_pass
from uzr.hooks import ModelEdit
from uzr.injection.injector import Injector
from uzr.injection.priors import AttentionPrior
from uzr.injection.setup import Injection
from uzr.injection.sinks import sink_sets
from uzr.runner import unmemoised
from uzr.text_bytes import predicted_bytes


@dataclass(frozen=True)
class Setting:
    """A way to run the student. ``edit(ids, row)`` gives a fresh edit for one text's ids (1, S) and its store
    row, or None for the plain student; ``key`` identifies the computation (equal keys must give equal numbers).
    ``storable``: the key, the text and the run's artifacts fix the result, so it may be kept across runs (not
    so for ``shuffled``, whose prior comes from another text of the evaluated set)."""

    name: str
    key: Hashable
    edit: Callable[[torch.Tensor, dict], ModelEdit | None] = field(default=lambda ids, row: None, compare=False)
    storable: bool = True


@dataclass
class SettingScores:
    """Per-text results of one setting over the same texts as every other setting."""

    nll: list[float] = field(default_factory=list)  # summed next-token loss of each text (nats)
    habits: list[dict[int, dict[str, float]]] = field(default_factory=list)  # text -> layer -> habit gaps
    next_token_kl: list[float] = field(default_factory=list)  # text -> mean KL to the teacher (same vocabulary)


@dataclass
class TextScores:
    """:func:`score_settings`' result: per setting, and the texts' byte counts and teacher losses."""

    settings: dict[str, SettingScores]
    bytes: list[int]  # predicted UTF-8 bytes of each text (tokens 1..S-1)
    teacher_nll: list[float]  # the teacher's summed loss on each text (from the harvest)
    teacher_bytes: list[int]

    def bits_per_byte(self, name: str) -> float | None:
        total = sum(self.bytes)
        return sum(self.settings[name].nll) / (math.log(2) * total) if total else None

    def teacher_bits_per_byte(self) -> float | None:
        total = sum(self.teacher_bytes)
        return sum(self.teacher_nll) / (math.log(2) * total) if total else None

    def habit_distance(self, name: str, layers: Sequence[int]) -> dict[str, dict[str, float]]:
        habits = self.settings[name].habits
        return {f"L{layer}": mean_dicts([h[layer] for h in habits]) for layer in layers}


@torch.no_grad()
def score_settings(student, tokenizer, rows: Sequence[dict], settings: Sequence[Setting], layers: Sequence[int],
                   window: int, max_length: int, teacher=None, memo: Callable | None = None,
                   desc: str = "evaluate", stored: Callable | None = None) -> TextScores:
    """Every setting on every held-out store row, one :func:`student_pass` each.

    Args:
        rows: store rows (``text``, ``input_ids``, ``teacher_dist_L{layer}``, ``teacher_nll_sum``, ``teacher_bytes``).
        layers: student layers whose head-mean attention is recorded and compared with the teacher's
            aligned rows (the leading block the store keeps); ``window``: locality window (tokens).
        teacher: a model with the student's vocabulary, for next-token KL (None: not measured).
        memo: ``memo(key, compute)`` shared with other stages; passes are keyed by (setting key, text).
        stored: the run's :meth:`~uzr.runner.RunContext.stored`: each storable setting's per-text scores are kept
            across runs too (a warm re-run or a sweep's next job reads them instead of running the student).
    """
    memo = memo or unmemoised
    device = next(student.parameters()).device
    out = TextScores({s.name: SettingScores() for s in settings}, [], [], [])
    for index, row in enumerate(tqdm(rows, desc=desc, unit="text")):
        # setting-independent work is done once per text and shared through the memo with other stages:
        # the byte count (a tokenisation), the teacher's pass, and the plain student's pass (PLAIN's key)
        out.bytes.append(memo(("text_bytes", tokenizer.name_or_path, row["text"], max_length),
                              partial(_predicted_bytes, tokenizer, row["text"], max_length)))
        out.teacher_nll.append(float(row["teacher_nll_sum"]))
        out.teacher_bytes.append(int(row["teacher_bytes"]))
        ids = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long, device=device).reshape(1, -1)
        teacher_rows = {layer: torch.as_tensor(row[f"teacher_dist_L{layer}"]) for layer in layers}
        # the teacher's pass runs only for a setting that is not already stored
        teacher_final = None if teacher is None else partial(memo, ("teacher_final", index, row["text"]),
                                                             partial(_teacher_final, teacher, ids))
        for setting in settings:
            keep = stored if stored is not None and setting.storable else memo
            scores = keep(("text", setting.key, index, row["text"], tuple(layers), window, teacher is not None),
                          partial(_measure, student, ids, row, setting, layers, window, teacher_rows, teacher,
                                  teacher_final))
            scores = {**scores, "habits": {int(k): v for k, v in scores["habits"].items()}}  # JSON keys are str
            target = out.settings[setting.name]
            target.nll.append(scores["nll"])
            target.habits.append(scores["habits"])
            if "next_token_kl" in scores:
                target.next_token_kl.append(scores["next_token_kl"])
    return out


def _predicted_bytes(tokenizer, text: str, max_length: int) -> int:
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    return predicted_bytes(text, [tuple(o) for o in enc["offset_mapping"]])


def _teacher_final(teacher, ids: torch.Tensor) -> torch.Tensor:
    return decoder_of(teacher)(input_ids=ids.to(teacher.device)).last_hidden_state  # (1, S, D)


def _measure(student, ids: torch.Tensor, row: dict, setting: Setting, layers: Sequence[int], window: int,
             teacher_rows: dict[int, torch.Tensor], teacher, teacher_final: Callable[[], torch.Tensor] | None) -> dict:
    """One setting on one text: its summed loss, its habit gaps per layer, and its next-token KL
    (``teacher_final()``: the teacher's final hidden states (1, S, D) on the text)."""
    d = teacher_rows[layers[0]].shape[-1]  # the leading (d, d) block the store keeps
    result = student_pass(student, ids, list(layers), window, setting.edit(ids, row), d)
    scores = {"nll": float(result.nll.sum()),
              "habits": {layer: habit_gap(result.head_mean[layer], teacher_rows[layer], window) for layer in layers}}
    if teacher_final is not None:
        scores["next_token_kl"] = next_token_kl(teacher, teacher_final(), student, result.final)
    return scores


def heldout_rows(store, num_texts: int) -> list[dict]:
    """The first ``num_texts`` held-out rows of the store (0 = all)."""
    rows = store.rows("heldout")
    n = len(rows) if num_texts == 0 else min(num_texts, len(rows))
    return [rows[i] for i in tqdm(range(n), desc="load held-out rows", leave=False)]


def alpha_key(alpha) -> str:
    """A hashable identity of an alpha schedule (for :attr:`Setting.key`)."""
    return json.dumps(dataclasses.asdict(alpha), sort_keys=True, default=str)


def injection_setting(name: str, injection: Injection,
                      source: dict | Callable[[torch.Tensor, dict], AttentionPrior] | None = None,
                      alpha: AlphaSpec | None = None, gate_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      source_name: str = "controller") -> Setting:
    """The student with ``injection`` (the run's controllers, mode and sinks) at ``alpha`` (default: the
    injection's). ``source``, for the other ``inject.source`` choices: ``source(ids, row)`` giving the prior of one
    text (see :mod:`uzr.evaluate.sources`), or a fixed prior. Schedule ``gated``: ``gate_values(ids)`` gives the gate
    per position, (1, S); warm-up schedules treat the whole text as generated."""
    alpha = injection.alpha if alpha is None else alpha

    def edit(ids: torch.Tensor, row: dict) -> Injector:
        gate = gate_values(ids) if alpha.schedule == "gated" else None
        prior = source(ids, row) if callable(source) else source
        return injection.injector(prompt_len=0, gate=gate, alpha=alpha, source=prior)

    return Setting(name, injection_key(source_name, injection.mode, alpha, injection.sinks, injection.heads), edit,
                   storable=source_name != "shuffled")


def injection_key(source: str, mode: str, alpha, sinks: dict | None = None, heads: dict | None = None) -> tuple:
    """The identity of an injected setting (equal keys give equal numbers on the same text or prompts); the
    controller's key is the one the gate table's constant rows share with the evaluate stage. ``sinks`` (``{layer:
    SinkSet}``, ``inject.sinks=keep``) is part of it: keep and replace never read each other's stored scores; so are
    the injected ``heads`` (``{layer: heads}``; None, every head, adds nothing). ``source``: the source's label
    (:func:`uzr.config.inject.source_label`: emphasis with its strength and form)."""
    base = ("inject", mode, alpha_key(alpha))
    base = base if source == "controller" else (*base, source)
    if heads is not None:
        base = (*base, "heads", json.dumps({str(layer): list(h) for layer, h in sorted(heads.items())}))
    # only layers with detected sinks change the numbers (the injector ignores the rest, as :func:`sink_sets` says),
    # so keep with none detected is replace's key, and every caller keys a given injection alike
    kept = {layer: s for layer in sorted(sinks or {}) if (s := sink_sets(sinks, layer)) is not None}
    if not kept:
        return base
    return (*base, "keep_sinks", json.dumps({str(k): [s.first, list(s.token_ids)] for k, s in kept.items()}))


PLAIN = Setting("none", ("plain",))
