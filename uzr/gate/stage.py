"""The gate stage: labels and features from the store and the controller, training, the artifact."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uzr.cache import atomic_write
from uzr.config.gate import (
    CAUTIOUS,
    CONFIDENT,
    WAFFLE,
    GateSpec,
    coerce_gate_spec,
)
from uzr.config.keys import key_of
from uzr.controller.stage import ControllerStage
from uzr.evaluate.injection import run_injection
from uzr.gate.answers import evaluate_generated_answers, print_generated_answers
from uzr.gate.checkpoint import load_gate, save_gate
from uzr.gate.comparison import compare_gates, print_gate_comparison
from uzr.gate.evaluation import evaluate_gated, gated_table, print_gated_table
from uzr.gate.features import (
    controllers_on,
    feature_names,
    pool_prefix,
    prompt_gate_values,
    sequence_parts,
    token_ids,
    token_matrix,
)
from uzr.gate.labels import (
    prompt_labels,
    teacher_answers,
    teacher_uncertainty,
    token_label_threshold,
    token_labels,
)
from uzr.gate.model import GateModule, fit_gate
from uzr.harvest.stage import HarvestStage
from uzr.models import model_device
from uzr.qa.answers import judge_prompts
from uzr.qa.facts import plain_qa_scores
from uzr.qa.prompts import PROMPTS_VERSION, PromptSet, adds_special_tokens, format_prompt, resolve_format
from uzr.stages import registry

if TYPE_CHECKING:
    from uzr.config import RunConfig
    from uzr.harvest.store import HarvestStore

log = logging.getLogger(__name__)

# Bump when feature extraction changes meaning: part of the gate artifact's cache key.
FEATURES_VERSION = 1
# Bump when the prompt-level labels change meaning: part of a prompt-level gate's key only (token-level keys stay).
# Version 2: CONFIDENT also needs the teacher's answer to state the fact-table answer (uzr.qa.answers).
# Version 3: the judge counts plurals ("Newtons") and "the European continent".
PROMPT_LABELS_VERSION = 3
# The seed's own live-demo pair: a gate that means what the demo says puts the first well above the second.
DEMO_QUESTIONS = ("What is the capital of France?", "What is the capital of Mars?")
LABELS_FILE = "labels.jsonl"  # the prompt-level labels, one JSON line per prompt, for inspection


def gate_payload(cfg: RunConfig, controller_key: str) -> dict:
    """What determines the gate artifact: the controller's key plus the gate's training knobs."""
    payload = {
        "controller": controller_key, "gate": key_of(cfg.gate, "gate"), "seed": cfg.seed,
        "features_version": FEATURES_VERSION, "trainer": key_of(cfg.trainer, "gate"),
        "prompts_version": PROMPTS_VERSION if cfg.gate.label == "prompt" else None,
    }
    if cfg.gate.label == "prompt":  # labels from the teacher's answers: how they are judged is part of the gate
        payload.update(prompt_labels_version=PROMPT_LABELS_VERSION, check_answers=cfg.gate.check_answers)
    return payload


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))


def token_dataset(student, controllers: Mapping, store: HarvestStore, layers: Sequence[int], spec: GateSpec,
                  seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """Per-position gate inputs and token-level labels for the store's train and held-out rows."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    threshold = None
    for split in ("train", "heldout"):
        rows = store.rows(split)
        if len(rows) == 0:
            raise ValueError(f"harvest store {store.folder} has no {split} rows to train the gate on")
        items = [rows[i] for i in range(len(rows))]
        uncertain = [teacher_uncertainty(r) for r in items]
        entropies = [u for u, _ in uncertain]
        source = uncertain[0][1]
        if threshold is None:
            threshold = token_label_threshold(entropies, spec)
        parts = sequence_parts(student, controllers, [r["input_ids"] for r in items], layers, batch_size,
                               desc=f"gate features: {split} texts")
        x = torch.cat([pool_prefix(token_matrix(p, spec.features), spec.pool) for p in parts])
        y = torch.from_numpy(np.concatenate([token_labels(e, threshold) for e in entropies]))
        keep = torch.from_numpy(_subsample(len(y), spec.max_tokens if split == "train" else max(spec.max_tokens // 2, 1), rng))
        data[split] = (x[keep], y[keep])
    data["label_info"] = {"threshold": threshold, "source": source, "rule": f"{source} < threshold = confident"}
    return data


def prompt_dataset(student, student_tok, answers: Sequence[Mapping[str, Any]], controllers: Mapping,
                   layers: Sequence[int], spec: GateSpec, folder: Path | None = None) -> dict[str, Any]:
    """Prompt-level labels from the teacher's ``answers`` to every prompt of the built-in set
    (:func:`cached_teacher_answers`: ``{"answer", "mean_entropy"}`` each, in the set's order), checked against the
    fact tables (CONFIDENT needs the right answer), and the student's gate inputs at each prompt's last token;
    writes ``labels.jsonl`` into ``folder`` for inspection."""
    prompts = PromptSet(spec.prompt_seed, spec.heldout_fraction).all
    if len(answers) != len(prompts):
        raise ValueError(f"prompt_dataset: {len(answers)} teacher answers for {len(prompts)} prompts")
    verdicts = judge_prompts(prompts, [a["answer"] for a in answers], spec.hedges)
    labels, thresholds = prompt_labels([(a["answer"], a["mean_entropy"]) for a in answers],
                                       [p.split == "train" for p in prompts], spec,
                                       [v.correct for v in verdicts] if spec.check_answers else None)
    style = resolve_format(student_tok, spec.prompt_format)
    texts = [format_prompt(p.question, student_tok, style) for p in prompts]
    parts = sequence_parts(student, controllers, [token_ids(student_tok, t, adds_special_tokens(style)) for t in texts],
                           layers, desc="gate features: prompts")
    x = torch.stack([pool_prefix(token_matrix(p, spec.features), spec.pool)[-1] for p in parts])
    y = torch.tensor([lab == CONFIDENT for lab in labels])
    if folder is not None:
        lines = [json.dumps({"id": p.id, "question": p.question, "kind": p.kind, "split": p.split, **a,
                             "fact_answer": p.answer, "correct": v.correct, "stance": v.stance, "verdict": v.reason,
                             "label": lab})
                 for p, a, v, lab in zip(prompts, answers, verdicts, labels)]
        atomic_write(Path(folder) / LABELS_FILE, lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    counts: dict[str, dict[str, int]] = {}
    for p, lab in zip(prompts, labels):
        counts.setdefault(f"{p.split}/{p.kind}", {CONFIDENT: 0, CAUTIOUS: 0, WAFFLE: 0})[lab] += 1
    right = {split: sum(v.correct for p, v in zip(prompts, verdicts) if p.split == split and p.answerable)
             for split in ("train", "heldout")}
    train = torch.tensor([p.split == "train" for p in prompts])
    return {"train": (x[train], y[train]), "heldout": (x[~train], y[~train]),
            "label_info": {**thresholds, "label_counts": counts, "teacher_right": right, "prompts": len(prompts),
                           "rule": "CONFIDENT = mean answer entropy < confident_below and no hedging phrase"
                                   + (" and the fact-table answer stated (uzr.qa.answers)"
                                      if spec.check_answers else "")}}


def cached_teacher_answers(run, spec: GateSpec) -> list[dict]:
    """The teacher's greedy answers to every prompt of the built-in set (``{"answer", "mean_entropy", ...}`` in the
    set's order), generated once per teacher, device, prompt set and answer settings and kept in the artifact cache
    as ``teacher_answers/<key>`` (``run``: a :class:`~uzr.runner.RunContext`), so a change in how answers are
    judged re-labels without asking the teacher again."""
    prompts = PromptSet(spec.prompt_seed, spec.heldout_fraction).all
    payload = {"teacher": key_of(run.cfg.teacher, "gate"), "device": run.cfg.device,
               "prompt_format": spec.prompt_format, "max_new_tokens": spec.max_new_tokens,
               "questions": [p.question for p in prompts]}

    def build(folder: Path) -> dict:
        teacher, tok = run.models.get("teacher")
        answers = teacher_answers(teacher, tok, payload["questions"], spec, desc="gate labels: teacher answers")
        (folder / "answers.json").write_text(json.dumps(answers))
        return {"num_prompts": len(answers)}

    folder, _ = run.artifact("teacher_answers", payload, build, version=1)
    return json.loads((folder / "answers.json").read_text())


def train_gate(folder: Path, cfg: RunConfig, store: HarvestStore, controllers: Mapping, models,
               loggers=None, answers: Callable[[], Sequence[Mapping[str, Any]]] | None = None) -> dict:
    """The gate stage: build labels and features, train, save ``gate.safetensors`` + ``gate.json`` into
    ``folder``. ``models``: the pipeline's ModelPool (``models.get("student")``); ``answers()``: the teacher's
    answers for prompt-level labels (:func:`cached_teacher_answers`). Returns manifest extras ``{"heldout": report}``."""
    spec = coerce_gate_spec(cfg.gate)
    layers = list(cfg.inject.layers)
    student, student_tok = models.get("student")
    if spec.label == "token":
        data = token_dataset(student, controllers, store, layers, spec, cfg.seed)
    else:
        if answers is None:
            raise ValueError("train_gate: gate.label=prompt needs the teacher's answers (cached_teacher_answers)")
        data = prompt_dataset(student, student_tok, answers(), controllers, layers, spec, Path(folder))
    names = feature_names(layers, student.config.hidden_size, spec.features, spec.pool)
    t = cfg.trainer
    module = fit_gate(*data["train"], *data["heldout"], spec, names, spec.label, layers, loggers,
                      {"accelerator": t.accelerator, "precision": t.precision, "deterministic": t.deterministic,
                       "log_every_n_steps": t.log_every_n_steps}, cfg.seed, checkpoints=Path(folder) / "checkpoints")
    module.extra_report = {"labels": data["label_info"]}
    report = module.evaluate_heldout(*data["heldout"], *data["train"])
    log.info("gate: %s", report["verdict"])
    save_gate(module, folder, {"student": cfg.student.name, "teacher": cfg.teacher.name,
                               "hidden_size": student.config.hidden_size})
    shutil.rmtree(Path(folder) / "checkpoints", ignore_errors=True)  # the artifact is gate.safetensors
    return {"heldout": report, "resumed": module.resumed}


def run_token_gate(run) -> GateModule:
    """The token-level gate of ``run``'s controller (:class:`~uzr.config.gate.GateSpec` defaults, ``label=token``):
    the artifact a ``gate=token`` run with the same settings builds (same key and folder), built here when missing."""
    cfg = replace(run.cfg, gate=replace(GateSpec(), eval_alphas=list(run.cfg.gate.eval_alphas)))
    folder, _ = run.artifact(
        "gate", gate_payload(cfg, run.info["controller"]["key"]),
        lambda f: train_gate(f, cfg, run.upstream(HarvestStage), run.upstream(ControllerStage).controllers,
                             run.models, run.loggers), version=registry()["gate"].version)
    return load_gate(folder, expected={"layers": list(cfg.inject.layers), "student": cfg.student.name})[0]


def gate_comparison(run, gate: GateModule) -> dict[str, Any]:
    """A prompt-level gate against the run's token gate on its held-out prompt labels and the live demo's two
    questions (:func:`uzr.gate.comparison.compare_gates`)."""
    rows = [json.loads(line) for line in (Path(run.info["gate"]["path"]) / LABELS_FILE).read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "heldout"]
    student, tok = run.models.get("student")
    ctrls = controllers_on(run.upstream(ControllerStage).controllers, model_device(student))
    style = resolve_format(tok, run.cfg.gate.prompt_format)
    texts = [format_prompt(q, tok, style) for q in [r["question"] for r in rows] + list(DEMO_QUESTIONS)]
    values = {name: prompt_gate_values(g, student, tok, ctrls, texts, list(run.cfg.inject.layers),
                                       adds_special_tokens(style))
              for name, g in (("prompt_gate", gate), ("token_gate", run_token_gate(run)))}
    return compare_gates(rows, values, DEMO_QUESTIONS, run.cfg.seed)


class GateStage:
    def key_payload(self, cfg: RunConfig, upstream: Mapping[str, str]) -> dict:
        return gate_payload(cfg, upstream["controller"])

    def build(self, run, folder: Path) -> dict:
        return train_gate(folder, run.cfg, run.upstream(HarvestStage), run.upstream(ControllerStage).controllers,
                          run.models, run.loggers, lambda: cached_teacher_answers(run, coerce_gate_spec(run.cfg.gate)))

    def load(self, run, folder: Path) -> GateModule:
        gate, _ = load_gate(folder, expected={"layers": list(run.cfg.inject.layers), "student": run.cfg.student.name})
        return gate

    def report(self, run, gate: GateModule) -> dict:
        controllers = run.upstream(ControllerStage).controllers
        evaluation = evaluate_gated(run.cfg, run.upstream(HarvestStage), controllers, gate, run.models,
                                    plain_qa=lambda role: plain_qa_scores(run, role), memo=run.memo,
                                    stored=run.stored, heads=run_injection(run).heads)
        run.tables["gated"] = gated_table(evaluation)
        section = {"heldout": gate.report(), "evaluation": evaluation}
        if gate.level == "prompt":  # beside the token gate on the same prompt labels
            section["against_token_gate"] = gate_comparison(run, gate)
        if run.cfg.gate.generated_answers:  # an evaluated setting beside facts QA, off by default
            student, tok = run.models.get("student")
            section["generated_answers"] = evaluate_generated_answers(
                run.cfg, student, tok, controllers_on(controllers, model_device(student)), gate, run_injection(run),
                stored=run.stored)
        return section

    def present(self, run, section: dict) -> None:
        print_gated_table(section["evaluation"])
        if "against_token_gate" in section:
            print_gate_comparison(section["against_token_gate"])
        if "generated_answers" in section:
            print_generated_answers(section["generated_answers"])
        log.info("gate: %s", section["heldout"]["verdict"])
