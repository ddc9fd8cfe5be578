"""Multiple-choice QA in the evaluate stage: facts QA and the checkable domains of ``evaluate.qa_domains``.

Every QA set is scored the same way (:mod:`uzr.qa.facts`: the right candidate of four must have the highest summed
log-likelihood) for the uninjected teacher and student (cached per model and prompt set) and the injected student,
with the paired interval of injected minus student on the same prompts (:func:`uzr.intervals.accuracy_difference`).

Domains:

- ``causal_loop``: :mod:`uzr.tasks.causal_loop` items (levels 1-4, 2-4 variables, at most 3 rounds) in their
  English form. The three wrong candidates each move one variable's value by -2, -1, +1 or +2 (modulo the item's
  modulus on the cyclic levels, so every value stays in range), distinct variables first, each checked wrong by
  :func:`~uzr.tasks.causal_loop.score_answer`. A model that tracks the variables prefers the right one; one that
  only reads the format cannot tell them apart (chance 0.25).
- ``kv_retrieval``, ``context_override``, ``induction``: the attention-bound items of :mod:`uzr.qa.attention_bound`
  (the answer is in the prompt; the wrong candidates come from the same prompt or, for context_override, are the
  memorised answer and two others), held-out split. Accuracy is also reported per tag (passage length, position
  of the asked fact, relation) with paired intervals of injected − student and teacher − student per bucket.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uzr.config.evaluate import QA_DOMAIN_ITEMS, EvaluateSpec
from uzr.evaluate.evidence import evidence_section
from uzr.hooks import ModelEdit
from uzr.intervals import accuracy_difference
from uzr.qa.attention_bound import GENERATORS
from uzr.qa.facts import (
    QA_SCORE,
    accuracy_of,
    cached_plain_scores,
    correct_of,
    injected_qa_scores,
    plain_qa_scores,
    qa_prompts,
)
from uzr.qa.prompts import Prompt
from uzr.tasks.causal_loop import generate, parse_assignments, score_answer

OFFSETS = (-2, -1, 1, 2)
CAUSAL_LOOP = {"levels": [1, 2, 3, 4], "max_vars": 4, "max_rounds": 3}  # the generator settings of the domain


def wrong_answers(answer: str, rng: random.Random, modulus: int = 0, k: int = 3) -> list[str]:
    """``k`` distinct answers that differ from ``answer`` (``A=1, B=2``) in one variable each."""
    values = parse_assignments(answer)
    names = list(values)
    rng.shuffle(names)
    tried = {name: rng.sample(OFFSETS, len(OFFSETS)) for name in names}
    out: list[str] = []
    for j in range(len(names) * len(OFFSETS)):
        name = names[j % len(names)]
        offset = tried[name][j // len(names)]
        moved = values[name] + offset
        if modulus:
            moved %= modulus
        candidate = ", ".join(f"{n}={moved if n == name else v}" for n, v in values.items())
        if candidate not in out and not score_answer(candidate, answer)[0]:
            out.append(candidate)
        if len(out) == k:
            return out
    raise ValueError(f"cannot build {k} wrong answers for {answer!r}")


def causal_loop_prompts(n: int, seed: int) -> list[Prompt]:
    """``n`` causal-loop items as 4-candidate prompts, the same for the same ``seed``."""
    table = generate({"n": n, "seed": seed, **CAUSAL_LOOP})
    prompts = []
    for i, (question, answer, level) in enumerate(zip(table["prompt"].to_pylist(), table["answer"].to_pylist(),
                                                      table["level"].to_pylist())):
        rng = random.Random(f"uzr-qa-causal-loop-{seed}-{i}")
        modulus = re.search(r"modulo (\d+)", question)
        candidates = [answer, *wrong_answers(answer, rng, int(modulus[1]) if modulus else 0)]
        rng.shuffle(candidates)
        prompts.append(Prompt(f"causal_loop:{seed}:{i}", question, "answerable", f"level_{level}", answer, candidates,
                              "heldout"))
    return prompts


def domain_settings(name: str, ev: EvaluateSpec) -> dict:
    """The generator settings of QA domain ``name`` under ``evaluate`` config ``ev`` (reported in its metrics)."""
    if name == "causal_loop":
        return {"seed": ev.qa_domain_seed, **CAUSAL_LOOP}
    lengths = {"kv_retrieval": {"facts": list(ev.qa_kv_facts)}, "induction": {"words": list(ev.qa_induction_words)}}
    return {"seed": ev.qa_domain_seed, **lengths.get(name, {})}


@dataclass(frozen=True)
class QAInjection:
    """The injected student on QA prompts: ``edit_for(row_prompts)`` (:func:`uzr.qa.facts.qa_scores`) and the key its
    scores are kept under (:func:`uzr.evaluate.texts.injection_key` without its leading tag)."""

    edit_for: Callable[[list[Prompt]], ModelEdit]
    key: tuple


def domain_prompts(name: str, ev: EvaluateSpec, split: str = "heldout") -> list[Prompt]:
    """The items of QA domain ``name`` (``evaluate.qa_domain_items`` of them, 0: the domain's default count) of
    ``split``: the evaluation uses ``heldout``, head profiling ``train`` (causal_loop has held-out items only)."""
    if name not in QA_DOMAIN_ITEMS:
        raise ValueError(f"evaluate.qa_domains: unknown domain {name!r}; valid: {', '.join(QA_DOMAIN_ITEMS)}")
    n = ev.qa_domain_items or QA_DOMAIN_ITEMS[name]
    if name == "causal_loop":
        if split != "heldout":
            raise ValueError("causal_loop QA has held-out items only")
        return causal_loop_prompts(n, ev.qa_domain_seed)
    return GENERATORS[name](n, split=split, **domain_settings(name, ev))


def _paired(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Accuracy of a minus b on the same prompts, its interval and verdict (:func:`accuracy_difference`)."""
    difference = accuracy_difference(correct_a, correct_b)
    return {**difference.as_dict(), "verdict": difference.verdict(higher_is_better=True)}


def _buckets(prompts: Sequence[Prompt], scores: dict[str, list], label: Callable[[Prompt], str | None]) -> dict:
    """Per value of ``label(prompt)`` (first-seen order; None: not in any bucket): the prompt count, each role's
    accuracy and the paired intervals of teacher − student and of each injected role (``injected``, ``oracle``)
    − student."""
    out = {}
    for value in dict.fromkeys(v for v in map(label, prompts) if v is not None):
        chosen = [i for i, p in enumerate(prompts) if label(p) == value]
        bucket = [prompts[i] for i in chosen]
        correct = {role: correct_of(bucket, [role_scores[i] for i in chosen]) for role, role_scores in scores.items()}
        out[value] = {"n": len(chosen), **{role: sum(c) / len(c) for role, c in correct.items()},
                      **{f"{role}_minus_student": _paired(correct[role], correct["student"])
                         for role in correct if role != "student"}}
    return out


def qa_comparison(run, prompts: Sequence[Prompt], plain: Callable[[str], list], injected: QAInjection | None,
                  what: str, breakdown: bool = False, oracle: QAInjection | None = None) -> dict:
    """Accuracy of teacher, student and injected student on ``prompts`` (``plain(role)``: the uninjected scores)
    and the paired interval of injected minus student. ``breakdown``: also teacher minus student, and per prompt
    category (when there are several) and per tag value (:attr:`Prompt.tags`) the three accuracies with both
    intervals. ``injected`` None: the injection source needs another text's stored rows (``shuffled``), which
    prompts lack. ``oracle``: the teacher's live attention injected alike (``evaluate.oracle_qa``), reported as
    ``oracle`` with its interval against the student and the injected student's against it."""
    cfg = run.cfg
    scores = {"teacher": plain("teacher"), "student": plain("student")}
    out = {"teacher": accuracy_of(prompts, scores["teacher"]), "student": accuracy_of(prompts, scores["student"]),
           "injected": None, "num_prompts": len(prompts), "score": QA_SCORE}
    if injected is None:
        out["injected_note"] = f"inject.source={cfg.inject.source} needs a text's stored rows; prompts have none"
    roles = {"injected": injected, "oracle": oracle}
    for role, injection in roles.items():
        if injection is None:
            continue
        scores[role] = _injected_scores(run, prompts, injection, f"{what}: {role}")
        out[role] = accuracy_of(prompts, scores[role])
    correct = {role: correct_of(prompts, role_scores) for role, role_scores in scores.items() if role in roles}
    if correct:  # per prompt, so that two runs on the same prompts can be paired afterwards
        out["correct"] = {"student": correct_of(prompts, scores["student"]), **correct}
    if prompts:
        pairs = {f"{role}_minus_student": (role, "student") for role in correct}
        if len(correct) == 2:
            pairs["injected_minus_oracle"] = ("injected", "oracle")
        out.update({name: _paired(out["correct"][a], out["correct"][b]) for name, (a, b) in pairs.items()})
    if breakdown and prompts:
        out["teacher_minus_student"] = _paired(correct_of(prompts, scores["teacher"]),
                                               correct_of(prompts, scores["student"]))
        if len({p.category for p in prompts}) > 1:
            out["by_category"] = dict(sorted(_buckets(prompts, scores, lambda p: p.category).items()))
        tags = dict.fromkeys(tag for p in prompts for tag in p.tags)
        if tags:
            out["by_tag"] = {tag: _buckets(prompts, scores, lambda p, tag=tag: p.tags.get(tag)) for tag in tags}
    return out


def _injected_scores(run, prompts: Sequence[Prompt], injection: QAInjection, desc: str) -> list:
    """The student's candidate scores on ``prompts`` through ``injection``'s edit, kept across runs under its key
    (not for the gated schedule, whose gate is the run's own)."""
    cfg = run.cfg
    student, student_tok = run.models.get("student")
    memo = run.stored if cfg.alpha.schedule != "gated" else None
    return injected_qa_scores(memo, student, student_tok, prompts, cfg.gate.prompt_format, injection.edit_for,
                              injection.key, cfg.evaluate.qa_batch_size, desc=desc)


def facts_qa(run, injected: QAInjection | None, oracle: QAInjection | None = None) -> dict:
    """Facts QA on the built-in set's held-out answerable prompts (:func:`qa_comparison`; one accuracy: its
    categories have a handful of prompts each)."""
    cfg = run.cfg
    prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
    return qa_comparison(run, prompts, lambda role: plain_qa_scores(run, role), injected, "facts QA", oracle=oracle)


def domain_qa(run, name: str, injected: QAInjection | None, oracle: QAInjection | None = None) -> dict:
    """QA domain ``name`` (``evaluate.qa_domains``): :func:`qa_comparison` on its held-out items, with the
    breakdown by category and tag."""
    cfg = run.cfg
    prompts = domain_prompts(name, cfg.evaluate)

    def plain(role: str) -> list:
        return run.memo((name, role), lambda: cached_plain_scores(
            run, getattr(cfg, role), lambda: run.models.get(role), prompts, cfg.gate.prompt_format,
            cfg.evaluate.qa_batch_size, desc=f"{name} QA: {role}"))

    out = {**qa_comparison(run, prompts, plain, injected, f"{name} QA", breakdown=True, oracle=oracle),
           "chance": 0.25, "items": domain_settings(name, cfg.evaluate)}
    if cfg.evaluate.qa_evidence_mass and name in GENERATORS:
        out["evidence_mass"] = evidence_section(run, prompts, None if injected is None else injected.edit_for)
    return out
