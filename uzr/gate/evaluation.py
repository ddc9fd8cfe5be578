"""No injection, constant and gated alphas side by side: facts QA and bits per byte."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from uzr.config.gate import (
    GateSpec,
    coerce_gate_spec,
)
from uzr.facts_qa import QA_SCORE, qa_accuracy, qa_prompts
from uzr.gate.features import controllers_on, sequence_parts, token_ids
from uzr.gate.model import GateModule
from uzr.inject import AlphaSpec, Injector
from uzr.models import model_device
from uzr.next_token import next_token_stats
from uzr.prompts import PromptSet, adds_special_tokens, format_prompt, resolve_format
from uzr.text_bytes import predicted_bytes

if TYPE_CHECKING:
    from uzr.config import RunConfig
    from uzr.harvest.store import HarvestStore

log = logging.getLogger(__name__)

def _alpha_settings(cfg: RunConfig, spec: GateSpec) -> list[tuple[str, AlphaSpec | None]]:
    alphas = sorted({float(a) for a in spec.eval_alphas} | ({float(cfg.alpha.value)} if cfg.alpha.value > 0 else set()))
    weights = dict(cfg.alpha.layer_weights)
    settings: list[tuple[str, AlphaSpec | None]] = [("none", None)]
    settings += [(f"constant@{a:g}", AlphaSpec("constant", a, layer_weights=weights)) for a in alphas]
    settings += [(f"gated@{a:g}", AlphaSpec("gated", a, entropy_local=cfg.alpha.entropy_local, layer_weights=weights))
                 for a in alphas]
    return settings


@torch.no_grad()
def evaluate_gated(cfg: RunConfig, store: HarvestStore, controllers: Mapping, gate: GateModule, models,
                   num_texts: int | None = None, num_prompts: int | None = None,
                   plain_qa: Callable[[str], float | None] | None = None) -> dict:
    """Facts-QA accuracy and bits per byte for no injection, constant alphas and gated alphas.

    QA (:mod:`uzr.facts_qa`): the held-out answerable prompts (``evaluate.qa_prompts`` of them, or
    ``num_prompts``); the gated rows hold each prompt's gate value (the gate at its last token, from an
    uninjected pass) for all its candidates. Bits per byte: the store's held-out rows
    (``evaluate.num_texts``, or ``num_texts``), gate per position (causal). The teacher's own QA
    accuracy and bits per byte sit beside them. ``plain_qa(role)``: the facts-QA accuracy of the
    uninjected ``"student"`` or the ``"teacher"`` on the same prompts, measured once per run and shared
    with the evaluate stage (default: scored here).

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
    settings = _alpha_settings(cfg, spec)

    def injector_for(alpha: AlphaSpec | None, gate_values: Tensor) -> Injector | None:
        if alpha is None:
            return None
        inj = Injector(ctrls, alpha, cfg.inject.mode, prompt_len=0)
        if alpha.schedule == "gated":
            inj.gate = gate_values.to(device)
        return inj

    # --- gate value per held-out prompt, answerable and not
    heldout = PromptSet(spec.prompt_seed, spec.heldout_fraction).heldout
    style = resolve_format(tok, spec.prompt_format)
    texts = [format_prompt(p.question, tok, style) for p in heldout]
    parts = sequence_parts(student, ctrls, [token_ids(tok, t, adds_special_tokens(style)) for t in texts], layers)
    prompt_gate = {p.id: gate.prompt_value(pp) for p, pp in zip(heldout, parts)}
    by_kind = {kind: float(np.mean([prompt_gate[p.id] for p in heldout if p.kind == kind]))
               for kind in ("answerable", "unanswerable") if any(p.kind == kind for p in heldout)}

    # --- facts QA
    qa = qa_prompts(spec.prompt_seed, spec.heldout_fraction,
                    cfg.evaluate.qa_prompts if num_prompts is None else num_prompts)
    def qa_injector(alpha: AlphaSpec | None):
        # one gate value per prompt, held for each of its (len(candidates), S) scoring rows
        return lambda p: injector_for(alpha, torch.full((len(p.candidates), 1), prompt_gate[p.id]))

    if plain_qa is None:
        def plain_qa(role: str) -> float | None:
            model, model_tok = models.get(role)
            return qa_accuracy(model, model_tok, tqdm(qa, desc=f"facts QA: {role}", leave=False), spec.prompt_format)

    accuracy = {name: plain_qa("student") if alpha is None else
                qa_accuracy(student, tok, tqdm(qa, desc=f"facts QA: {name}", leave=False), spec.prompt_format,
                            qa_injector(alpha))
                for name, alpha in settings}
    teacher_qa = plain_qa("teacher")

    # --- bits per byte on held-out store rows, gate per position
    rows = store.rows("heldout")
    wanted = cfg.evaluate.num_texts if num_texts is None else num_texts
    n = len(rows) if wanted == 0 else min(wanted, len(rows))
    nll = {name: 0.0 for name, _ in settings}
    n_bytes, t_nll, t_bytes, gate_sum, gate_count = 0, 0.0, 0, 0.0, 0
    for i in tqdm(range(n), desc="bits per byte: gated vs constant", unit="text", leave=False):
        row = rows[i]
        ids = [int(t) for t in np.asarray(row["input_ids"]).reshape(-1)]
        enc = tok(row["text"], return_offsets_mapping=True, truncation=True, max_length=cfg.harvest.max_length)
        n_bytes += predicted_bytes(row["text"], [tuple(o) for o in enc["offset_mapping"]])
        t_nll += float(row["teacher_nll_sum"])
        t_bytes += int(row["teacher_bytes"])
        seq_parts = sequence_parts(student, ctrls, [ids], layers, with_nll=True)[0]
        g = gate.positions(seq_parts)[None]  # (1, S)
        gate_sum, gate_count = gate_sum + float(g.sum()), gate_count + g.numel()
        ids_t = torch.tensor([ids], device=device)
        for name, alpha in settings:
            if alpha is None:
                nll[name] += float(seq_parts["nll"].sum())
                continue
            inj = injector_for(alpha, g)
            inj.attach(student)
            try:
                final = student.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).last_hidden_state
            finally:
                inj.remove()
            nll[name] += float(next_token_stats(student, final[:, :-1], ids_t[:, 1:])["nll"].sum())

    table = {}
    for name, _ in settings:
        entry = {"qa_accuracy": accuracy[name],
                 "bits_per_byte": nll[name] / (math.log(2) * n_bytes) if n_bytes else None}
        if name.startswith("gated"):
            entry["mean_gate_qa"] = float(np.mean([prompt_gate[p.id] for p in qa])) if qa else None
            entry["mean_gate_text"] = gate_sum / gate_count if gate_count else None
        table[name] = entry
    return {
        "table": table,
        "teacher": {"qa_accuracy": teacher_qa,
                    "bits_per_byte": t_nll / (math.log(2) * t_bytes) if t_bytes else None},
        "gate_by_kind": by_kind, "num_prompts": len(qa), "num_texts": n, "gate_level": gate.level,
        "qa_score": QA_SCORE,
    }


def gated_table(result: Mapping[str, Any]) -> tuple[list[str], list[list]]:
    """(header, rows) of :func:`evaluate_gated`'s table, teacher last: for printing and ``log_table``."""
    header = ["setting", "qa_accuracy", "bits_per_byte", "mean_gate_qa"]
    rows = [[name, v.get("qa_accuracy"), v.get("bits_per_byte"), v.get("mean_gate_qa")]
            for name, v in result["table"].items()]
    rows.append(["teacher", result["teacher"]["qa_accuracy"], result["teacher"]["bits_per_byte"], None])
    return header, rows


def print_gated_table(result: Mapping[str, Any], console=None) -> None:
    from rich.console import Console

    from uzr.report_table import numbers_table

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
    base = table["none"]
    for name, gated in table.items():
        if not name.startswith("gated@"):
            continue
        alpha = name.split("@", 1)[1]
        const = table[f"constant@{alpha}"]
        parts = []
        for metric, better, unit in (("bits_per_byte", -1, "bits/byte"), ("qa_accuracy", 1, "QA accuracy")):
            g, c, b = gated.get(metric), const.get(metric), base.get(metric)
            if None in (g, c, b):
                continue
            verdict = "better than" if better * (g - c) > 0 else "equal to" if g == c else "WORSE than"
            parts.append(f"{unit} {g:.4f} {verdict} constant {c:.4f} (no injection {b:.4f})")
        if parts:
            lines.append(f"gated@{alpha}: " + "; ".join(parts))
    return lines
