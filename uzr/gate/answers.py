"""Generated answers of the student without, with constant and with gated injection, judged against the fact tables.

Facts QA scores candidates by likelihood; a user reads the greedy answer. This evaluated setting of the gate
stage (``gate.generated_answers`` > 0) answers the held-out answerable prompts facts QA uses
(:func:`uzr.qa.facts.qa_prompts`, formatted as facts QA formats them for the student) greedily three ways,
``student`` (no injection), ``constant`` (the run's alpha at ``alpha.value``) and ``gated`` (the same, times the
gate's value of the prompt: the live demo's injector), judges each answer (:func:`uzr.qa.answers.judge_prompts`)
and pairs the injected settings with the student (:func:`uzr.qa.answers.compare_answers`: wrecked, rescued,
paired interval).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from uzr.config.gate import coerce_gate_spec
from uzr.config.inject import AlphaSpec
from uzr.evaluate.texts import injection_key
from uzr.gate.features import prompt_gate_values
from uzr.gate.model import GateModule
from uzr.generation import generate_answers
from uzr.injection.setup import Injection
from uzr.intervals import accuracy_difference
from uzr.models import model_device
from uzr.qa.answers import compare_answers, judge_prompts
from uzr.qa.facts import qa_prompts
from uzr.qa.prompts import Prompt, adds_special_tokens, format_prompt, resolve_format
from uzr.runner import unmemoised

if TYPE_CHECKING:
    from uzr.config import RunConfig

STUDENT, CONSTANT, GATED = "student", "constant", "gated"
MAX_EXAMPLES = 5  # wrecked / rescued answers kept per comparison, with their prompt


def answer_settings(cfg: RunConfig) -> dict[str, AlphaSpec | None]:
    """``student`` (no injection), ``constant`` and ``gated`` at ``alpha.value`` (the run's alpha otherwise)."""
    return {STUDENT: None, CONSTANT: cfg.alpha.variant("constant", cfg.alpha.value),
            GATED: cfg.alpha.variant("gated", cfg.alpha.value)}


@torch.no_grad()
def evaluate_generated_answers(cfg: RunConfig, student, tok, controllers, gate: GateModule, injection: Injection,
                               stored: Callable | None = None) -> dict:
    """Greedy answers (``gate.answer_tokens`` new tokens) to the first ``gate.generated_answers`` held-out
    answerable prompts, per setting of :func:`answer_settings`, judged and compared with the student.

    ``controllers``: the run's, on the student's device; ``injection``: the run's (sinks included, as in the gate
    table); ``stored``: where each setting's answers are kept across runs (the run's
    :meth:`~uzr.runner.RunContext.stored`; its key holds the gate's artifact key, so gated answers are safe to keep).

    Returns ``{"n", "answer_tokens", "prompt_format", "alpha", "gate_level", "right": {setting: count}, "ids",
    "correct": {setting: (n,) bools},
    "vs_student": {"constant" | "gated": AnswerComparison.as_dict() + "examples" (:func:`changed_examples`)}}``.
    """
    spec = coerce_gate_spec(cfg.gate)
    prompts = qa_prompts(spec.prompt_seed, spec.heldout_fraction, spec.generated_answers)
    style = resolve_format(tok, spec.prompt_format)
    special = adds_special_tokens(style)
    texts = [format_prompt(p.question, tok, style) for p in prompts]
    device = model_device(student)

    def answers(name: str, alpha: AlphaSpec | None) -> list[str]:
        gates = (prompt_gate_values(gate, student, tok, controllers, texts, list(cfg.inject.layers), special)
                 if alpha is not None and alpha.schedule == "gated" else None)
        out = []
        # one prompt at a time: the injector sees no padding, and each prompt its own gate value (the live demo's path)
        for i, text in enumerate(tqdm(texts, desc=f"generated answers: {name}", unit="answer", dynamic_ncols=True)):
            injector = None if alpha is None else injection.injector(
                prompt_len=None, alpha=alpha, gate=None if gates is None else torch.tensor([[gates[i]]], device=device))
            out.append(generate_answers(student, tok, [text], spec.answer_tokens, batch_size=1, injector=injector,
                                        add_special_tokens=special)[0]["answer"])
        return out

    keep = stored or unmemoised
    setting_key = {name: ("generated_answers", tuple(p.id for p in prompts), style, spec.answer_tokens,
                          None if alpha is None else
                          injection_key("controller", cfg.inject.mode, alpha, injection.sinks, injection.heads)[1:])
                   for name, alpha in answer_settings(cfg).items()}
    generated = {name: keep(setting_key[name], lambda name=name, alpha=alpha: answers(name, alpha))
                 for name, alpha in answer_settings(cfg).items()}
    correct = {name: [v.correct for v in judge_prompts(prompts, texts_)] for name, texts_ in generated.items()}
    return {
        "n": len(prompts), "answer_tokens": spec.answer_tokens, "prompt_format": style,
        "alpha": cfg.alpha.value, "gate_level": gate.level,
        "right": {name: sum(c) for name, c in correct.items()},
        "ids": [p.id for p in prompts], "correct": correct,  # per prompt: pairs two runs (compare_runs)
        "vs_student": {name: {**compare_answers(correct[STUDENT], correct[name]).as_dict(),
                              "examples": changed_examples(prompts, generated[STUDENT], generated[name],
                                                           correct[STUDENT], correct[name])}
                       for name in (CONSTANT, GATED)},
    }


def changed_examples(prompts: Sequence[Prompt], before: Sequence[str], after: Sequence[str],
                     right_before: Sequence[bool], right_after: Sequence[bool]) -> dict[str, list[dict]]:
    """Up to :data:`MAX_EXAMPLES` ``wrecked`` (right before, wrong after) and ``rescued`` answers, in prompt order."""
    out: dict[str, list[dict]] = {"wrecked": [], "rescued": []}
    for p, b, a, rb, ra in zip(prompts, before, after, right_before, right_after):
        kind = "wrecked" if rb and not ra else "rescued" if ra and not rb else None
        if kind and len(out[kind]) < MAX_EXAMPLES:
            out[kind].append({"question": p.question, "fact_answer": p.answer, "before": b, "after": a})
    return out


def print_generated_answers(result: dict, console=None) -> None:
    """One short table: right counts per setting, and each injected setting against the student."""
    from rich.console import Console
    from rich.table import Table

    n = result["n"]
    table = Table(title=f"generated answers: {n} held-out answerable prompts, greedy, {result['answer_tokens']} "
                        f"tokens, alpha {result['alpha']:g}, {result['gate_level']}-level gate")
    for index, column in enumerate(["setting", "right", "wrecked", "rescued", "Δ accuracy [95%]",
                                    "verdict"]):
        table.add_column(column, justify="left" if index == 0 else "right")
    table.add_row(STUDENT, f"{result['right'][STUDENT]}/{n}", "", "", "", "")
    for name, c in result["vs_student"].items():
        d = c["difference"]
        table.add_row(name, f"{c['right_after']}/{n}", str(c["wrecked"]), str(c["rescued"]),
                      f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]", d["verdict"])
    (console or Console()).print(table)


def compare_runs(a: Mapping, b: Mapping, setting: str = CONSTANT, seed: int = 0) -> dict:
    """Two runs' generated-answer sections (``metrics.json`` → ``gate`` → ``generated_answers``) on the same prompts
    and student, e.g. the same injection with two controllers: ``{"n", "right": {"a", "b"}, "wrecked": {"a", "b"},
    "rescued": {...}, "accuracy": b - a, "wrecked_rate": b - a}`` of ``setting``, each difference a paired interval
    (:func:`uzr.intervals.accuracy_difference` over the prompts) with its verdict. Raises ValueError when the runs
    answered different prompts or their uninjected students answered differently."""
    for key in ("ids", "correct"):
        if key not in a or key not in b:
            raise ValueError("compare_runs: a generated-answer section lacks per-prompt verdicts (written since "
                             "issue 24); run the gate stage again with gate.generated_answers=N")
    if a["ids"] != b["ids"]:
        raise ValueError(f"compare_runs: the runs answered different prompts ({a['n']} vs {b['n']}); use the same "
                         "gate.generated_answers, gate.prompt_seed and gate.heldout_fraction")
    if a["correct"][STUDENT] != b["correct"][STUDENT]:
        raise ValueError("compare_runs: the uninjected students answered differently: compare runs of one student "
                         "with the same answer settings (gate.answer_tokens, gate.prompt_format)")
    plain = a["correct"][STUDENT]
    out: dict = {"n": len(plain), "setting": setting, "right": {}, "wrecked": {}, "rescued": {}}
    wrecked = {}
    for name, section in (("a", a), ("b", b)):
        after = section["correct"][setting]
        wrecked[name] = [p and not x for p, x in zip(plain, after)]
        out["right"][name], out["wrecked"][name] = sum(after), sum(wrecked[name])
        out["rescued"][name] = sum(x and not p for p, x in zip(plain, after))
    for key, (x, y, better) in {"accuracy": (b["correct"][setting], a["correct"][setting], True),
                                "wrecked_rate": (wrecked["b"], wrecked["a"], False)}.items():
        d = accuracy_difference(x, y, seed=seed)
        out[key] = {**d.as_dict(), "verdict": d.verdict(higher_is_better=better)}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m uzr.gate RUN_A RUN_B``: pair two runs' generated answers (see :func:`compare_runs`)."""
    parser = argparse.ArgumentParser(description="Pair the generated answers of two runs (run folders holding "
                                                 "metrics.json with gate.generated_answers), B against A.")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--setting", choices=(CONSTANT, GATED), default=CONSTANT)
    args = parser.parse_args(argv)
    sections = []
    for run in (args.run_a, args.run_b):
        metrics = json.loads((run / "metrics.json").read_text())
        section = metrics.get("gate", {}).get("generated_answers")
        if section is None:
            parser.error(f"{run}/metrics.json has no gate.generated_answers: run the gate stage with "
                         "gate.generated_answers=N")
        sections.append(section)
    print(json.dumps(compare_runs(*sections, setting=args.setting), indent=2))
