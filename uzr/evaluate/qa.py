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
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uzr.hooks import ModelEdit
from uzr.intervals import accuracy_difference
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


def domain_prompts(name: str, n: int, seed: int) -> list[Prompt]:
    if name != "causal_loop":
        raise ValueError(f"evaluate.qa_domains: unknown domain {name!r}; valid: causal_loop")
    return causal_loop_prompts(n, seed)


@dataclass(frozen=True)
class QAInjection:
    """The injected student on QA prompts: ``edit_for(row_prompts)`` (:func:`uzr.qa.facts.qa_scores`) and the key its
    scores are kept under (:func:`uzr.evaluate.texts.injection_key` without its leading tag)."""

    edit_for: Callable[[list[Prompt]], ModelEdit]
    key: tuple


def qa_comparison(run, prompts: Sequence[Prompt], plain: Callable[[str], list], injected: QAInjection | None,
                  what: str) -> dict:
    """Accuracy of teacher, student and injected student on ``prompts`` (``plain(role)``: the uninjected scores),
    the paired interval of injected minus student and, per prompt category, the three accuracies.
    ``injected`` None: the injection source needs another text's stored rows (``shuffled``), which prompts lack."""
    cfg = run.cfg
    student, student_tok = run.models.get("student")
    scores = {"teacher": plain("teacher"), "student": plain("student")}
    out = {"teacher": accuracy_of(prompts, scores["teacher"]), "student": accuracy_of(prompts, scores["student"]),
           "injected": None, "num_prompts": len(prompts), "score": QA_SCORE}
    if injected is None:
        out["injected_note"] = f"inject.source={cfg.inject.source} needs a text's stored rows; prompts have none"
        return out
    memo = run.stored if cfg.alpha.schedule != "gated" else None
    scores["injected"] = injected_qa_scores(memo, student, student_tok, prompts, cfg.gate.prompt_format,
                                            injected.edit_for, injected.key, cfg.evaluate.qa_batch_size,
                                            desc=f"{what}: injected")
    out["injected"] = accuracy_of(prompts, scores["injected"])
    # per prompt, so that two runs on the same prompts can be paired afterwards
    out["correct"] = {"student": correct_of(prompts, scores["student"]), "injected": correct_of(prompts, scores["injected"])}
    if prompts:
        difference = accuracy_difference(correct_of(prompts, scores["injected"]), correct_of(prompts, scores["student"]))
        out["injected_minus_student"] = {**difference.as_dict(), "verdict": difference.verdict(higher_is_better=True)}
    categories = sorted({p.category for p in prompts})
    if len(categories) > 1:
        out["by_category"] = {c: {"n": sum(p.category == c for p in prompts), **{
            role: accuracy_of(*zip(*[(p, s) for p, s in zip(prompts, role_scores) if p.category == c]))
            for role, role_scores in scores.items()}} for c in categories}
    return out


def facts_qa(run, injected: QAInjection | None) -> dict:
    """Facts QA on the built-in set's held-out answerable prompts (:func:`qa_comparison`)."""
    cfg = run.cfg
    prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
    section = qa_comparison(run, prompts, lambda role: plain_qa_scores(run, role), injected, "facts QA")
    section.pop("by_category", None)  # facts QA reports one accuracy (its categories have a handful of prompts)
    return section


def domain_qa(run, name: str, injected: QAInjection | None) -> dict:
    """QA domain ``name`` (``evaluate.qa_domains``): :func:`qa_comparison` on its items."""
    cfg = run.cfg
    prompts = domain_prompts(name, cfg.evaluate.qa_domain_items, cfg.evaluate.qa_domain_seed)

    def plain(role: str) -> list:
        return run.memo((name, role), lambda: cached_plain_scores(
            run, getattr(cfg, role), lambda: run.models.get(role), prompts, cfg.gate.prompt_format,
            cfg.evaluate.qa_batch_size, desc=f"{name} QA: {role}"))

    return {**qa_comparison(run, prompts, plain, injected, f"{name} QA"), "chance": 0.25,
            "items": {"seed": cfg.evaluate.qa_domain_seed, **CAUSAL_LOOP}}
