"""No injection, constant and gated alphas side by side: facts QA and bits per byte."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from uzr.config.gate import (
    GateSpec,
    coerce_gate_spec,
)
from uzr.config.inject import AlphaSpec
from uzr.evaluate.texts import PLAIN, heldout_rows, injection_key, injection_setting, score_settings
from uzr.gate.features import controllers_on, gate_positions, prompt_gate_values
from uzr.gate.model import GateModule
from uzr.injection.injector import Injector
from uzr.injection.setup import configured_injection
from uzr.intervals import accuracy_difference, bits_per_byte_difference
from uzr.models import model_device
from uzr.qa.facts import QA_SCORE, accuracy_of, correct_of, injected_qa_scores, qa_prompts, qa_scores
from uzr.qa.prompts import PromptSet, adds_special_tokens, format_prompt, resolve_format
from uzr.report.table import numbers_table
from uzr.runner import unmemoised

if TYPE_CHECKING:
    from uzr.config import RunConfig
    from uzr.harvest.store import HarvestStore

log = logging.getLogger(__name__)

def alpha_settings(cfg: RunConfig, spec: GateSpec) -> list[tuple[str, AlphaSpec | None]]:
    """``none``, then ``constant@a`` and ``gated@a`` for every ``a`` in ``gate.eval_alphas`` (+ ``alpha.value``),
    each the run's alpha (layer weights, entropy-local) with that schedule and value."""
    alphas = sorted({float(a) for a in spec.eval_alphas} | ({float(cfg.alpha.value)} if cfg.alpha.value > 0 else set()))
    settings: list[tuple[str, AlphaSpec | None]] = [("none", None)]
    settings += [(f"constant@{a:g}", cfg.alpha.variant("constant", a)) for a in alphas]
    settings += [(f"gated@{a:g}", cfg.alpha.variant("gated", a)) for a in alphas]
    return settings


@torch.no_grad()
def evaluate_gated(cfg: RunConfig, store: HarvestStore, controllers: Mapping, gate: GateModule, models,
                   num_texts: int | None = None, num_prompts: int | None = None,
                   plain_qa: Callable[[str], list[list[float]]] | None = None, memo: Callable | None = None,
                   stored: Callable | None = None, heads: Mapping[int, tuple[int, ...]] | None = None) -> dict:
    """Facts-QA accuracy and bits per byte for no injection, constant alphas and gated alphas (on ``heads``, the run's
    ``inject.heads`` resolved: ``{layer: heads}``, None for every head).

    QA (:mod:`uzr.qa.facts`): the held-out answerable prompts (``evaluate.qa_prompts`` of them, or
    ``num_prompts``); the gated rows hold each prompt's gate value (the gate at its last token, from an
    uninjected pass) for all its candidates. Bits per byte: the store's held-out rows
    (``evaluate.num_texts``, or ``num_texts``), gate per position (causal). The teacher's own QA
    accuracy and bits per byte sit beside them. ``plain_qa(role)``: the facts-QA candidate scores of the
    uninjected ``"student"`` or the ``"teacher"`` on the same prompts, measured once per run and shared
    with the evaluate stage (default: scored here); ``memo``: the run's memo, so texts the evaluate stage
    already scored in the same setting are not scored again; ``stored``: where the injected rows' QA scores
    are kept (the run's :meth:`~uzr.runner.RunContext.stored`: shared with the evaluate stage and later runs).

    Returns ``{"table": {setting: {"qa_accuracy", "bits_per_byte", "mean_gate_qa"?, "mean_gate_text"?}},
    "teacher": {...}, "gate_by_kind": {"answerable", "unanswerable"}, "num_prompts", "num_texts", ...}``;
    settings are ``none``, ``constant@a`` and ``gated@a`` for every ``a`` in ``gate.eval_alphas`` (+
    ``alpha.value``).
    """
    spec = coerce_gate_spec(cfg.gate)
    layers = list(cfg.inject.layers)
    student, tok = models.get("student")
    device = model_device(student)
    ctrls = controllers_on(controllers, device)
    gate = gate.to("cpu").eval()
    settings = alpha_settings(cfg, spec)
    # inject.sinks=keep: the same sinks as the evaluate stage, so its injected row is this table's constant row
    injection = configured_injection(cfg, store, ctrls, memo or unmemoised, heads)

    def injector_for(alpha: AlphaSpec | None, gate_values: Tensor) -> Injector | None:
        if alpha is None:
            return None
        gate_now = gate_values.to(device) if alpha.schedule == "gated" else None
        return injection.injector(prompt_len=0, gate=gate_now, alpha=alpha)

    # --- gate value per held-out prompt, answerable and not
    heldout = PromptSet(spec.prompt_seed, spec.heldout_fraction).heldout
    style = resolve_format(tok, spec.prompt_format)
    texts = [format_prompt(p.question, tok, style) for p in heldout]
    values = prompt_gate_values(gate, student, tok, ctrls, texts, layers, adds_special_tokens(style))
    prompt_gate = {p.id: value for p, value in zip(heldout, values)}
    by_kind = {kind: float(np.mean([prompt_gate[p.id] for p in heldout if p.kind == kind]))
               for kind in ("answerable", "unanswerable") if any(p.kind == kind for p in heldout)}

    # --- facts QA
    qa = qa_prompts(spec.prompt_seed, spec.heldout_fraction,
                    cfg.evaluate.qa_prompts if num_prompts is None else num_prompts)
    batch = cfg.evaluate.qa_batch_size

    def qa_injector(alpha: AlphaSpec | None):
        # each scoring row of a batch holds its prompt's gate value: (rows, 1)
        return lambda rows: injector_for(alpha, torch.tensor([[prompt_gate[p.id]] for p in rows]))

    if plain_qa is None:
        def plain_qa(role: str) -> list[list[float]]:
            model, model_tok = models.get(role)
            return qa_scores(model, model_tok, qa, spec.prompt_format, batch_size=batch, desc=f"facts QA: {role}")

    def injected_qa(name: str, alpha: AlphaSpec) -> list[list[float]]:
        # stored keys hold the run's artifact keys (the gate's among them), so gated rows are safe to keep too;
        # the key is the evaluate stage's (sinks included): keep and replace never read each other's scores
        return injected_qa_scores(stored, student, tok, qa, spec.prompt_format, qa_injector(alpha),
                                  injection_key("controller", cfg.inject.mode, alpha, injection.sinks,
                                                injection.heads)[1:], batch,
                                  desc=f"facts QA: {name}")

    qa_by_setting = {name: plain_qa("student") if alpha is None else injected_qa(name, alpha) for name, alpha in settings}
    correct = {name: correct_of(qa, scores) for name, scores in qa_by_setting.items()}
    accuracy = {name: accuracy_of(qa, scores) for name, scores in qa_by_setting.items()}
    teacher_qa = accuracy_of(qa, plain_qa("teacher"))

    # --- bits per byte on held-out store rows, gate per position (the evaluate stage's path and texts)
    rows = heldout_rows(store, cfg.evaluate.num_texts if num_texts is None else num_texts)
    gate_cache: dict[tuple, Tensor] = {}

    def gate_values(ids: Tensor) -> Tensor:  # (1, S), from an uninjected pass; once per text
        key = tuple(ids.reshape(-1).tolist())
        if key not in gate_cache:
            gate_cache[key] = gate_positions(gate, student, ctrls, ids, layers).to(device)
        return gate_cache[key]

    text_settings = [PLAIN if alpha is None else injection_setting(name, injection, alpha=alpha, gate_values=gate_values)
                     for name, alpha in settings]
    scores = score_settings(student, tok, rows, text_settings, layers, cfg.harvest.locality_window,
                            cfg.harvest.max_length, memo=memo, desc="bits per byte: gated vs constant", stored=stored)
    def gate_total(row: dict) -> list:  # [sum, count] of one text's gate values
        gates = gate_values(torch.as_tensor(np.asarray(row["input_ids"]), device=device).reshape(1, -1))
        return [float(gates.sum()), gates.numel()]

    keep = stored or unmemoised
    totals = [keep(("gate_total", row["text"]), partial(gate_total, row)) for row in rows]
    gate_sum, gate_count = sum(t[0] for t in totals), sum(t[1] for t in totals)

    table = {}
    for name, _ in settings:
        entry = {"qa_accuracy": accuracy[name],
                 "bits_per_byte": scores.bits_per_byte(name)}
        # paired intervals on the same prompts and texts: against no injection, and gated against constant
        for other in ["none"] + ([f"constant@{name.split('@', 1)[1]}"] if name.startswith("gated@") else []):
            if name != other and other in qa_by_setting:
                entry[f"vs_{other}"] = paired_differences(correct[name], correct[other], scores.settings[name].nll,
                                                          scores.settings[other].nll, scores.bytes)
        if name.startswith("gated"):
            entry["mean_gate_qa"] = float(np.mean([prompt_gate[p.id] for p in qa])) if qa else None
            entry["mean_gate_text"] = gate_sum / gate_count if gate_count else None
        table[name] = entry
    return {
        "table": table,
        "teacher": {"qa_accuracy": teacher_qa,
                    "bits_per_byte": scores.teacher_bits_per_byte()},
        "gate_by_kind": by_kind, "num_prompts": len(qa), "num_texts": len(rows), "gate_level": gate.level,
        "qa_score": QA_SCORE,
    }


def paired_differences(correct_a, correct_b, nll_a, nll_b, nbytes) -> dict:
    """Setting a against setting b on the same prompts and texts: paired intervals and their verdicts."""
    out = {}
    if correct_a:
        qa = accuracy_difference(correct_a, correct_b)
        out["qa_accuracy"] = {**qa.as_dict(), "verdict": qa.verdict(higher_is_better=True)}
    if nbytes:
        bpb = bits_per_byte_difference(nll_a, nll_b, nbytes)
        out["bits_per_byte"] = {**bpb.as_dict(), "verdict": bpb.verdict(higher_is_better=False)}
    return out


def gated_table(result: Mapping[str, Any]) -> tuple[list[str], list[list]]:
    """(header, rows) of :func:`evaluate_gated`'s table, teacher last: for printing and ``log_table``."""
    header = ["setting", "qa_accuracy", "bits_per_byte", "mean_gate_qa"]
    rows = [[name, v.get("qa_accuracy"), v.get("bits_per_byte"), v.get("mean_gate_qa")]
            for name, v in result["table"].items()]
    rows.append(["teacher", result["teacher"]["qa_accuracy"], result["teacher"]["bits_per_byte"], None])
    return header, rows


def print_gated_table(result: Mapping[str, Any], console=None) -> None:
    from rich.console import Console


    header, rows = gated_table(result)
    title = (f"gated injection: facts QA ({result['num_prompts']} prompts) and bits per byte "
             f"({result['num_texts']} texts), {result['gate_level']}-level gate")
    console = console or Console()
    console.print(numbers_table(title, header, rows))
    for line in gated_verdict(result):
        console.print(f"• {line}")


def gated_verdict(result: Mapping[str, Any]) -> list[str]:
    """Plain-language reading of the gated table: gated against constant at the same alpha, and both
    against no injection; says so when the gate does not help."""
    table, lines = result["table"], []
    kinds = result.get("gate_by_kind", {})
    if {"answerable", "unanswerable"} <= set(kinds):
        lines.append(f"mean gate on held-out prompts: answerable {kinds['answerable']:.3f}, "
                     f"unanswerable / false premise {kinds['unanswerable']:.3f}")
    for name, gated in table.items():
        if not name.startswith("gated@"):
            continue
        alpha = name.split("@", 1)[1]
        parts = []
        for metric, unit in (("bits_per_byte", "bits/byte"), ("qa_accuracy", "QA accuracy")):
            against = gated.get(f"vs_constant@{alpha}", {}).get(metric)
            if against is None:
                continue
            verdict = {"better": "better than", "worse": "WORSE than", "no difference": "no different from"}
            parts.append(f"{unit} {gated[metric]:.4f} {verdict[against['verdict']]} constant "
                         f"{table[f'constant@{alpha}'][metric]:.4f} (Δ {against['estimate']:+.4f}, 95% paired interval "
                         f"[{against['low']:+.4f}, {against['high']:+.4f}]; no injection {table['none'][metric]:.4f})")
        if parts:
            lines.append(f"gated@{alpha}: " + "; ".join(parts))
    return lines
