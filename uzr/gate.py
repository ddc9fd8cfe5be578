"""The gate: learn *when* to inject (DESIGN.md §7).

A small MLP reads the student's side only — the teacher is absent at run time — and predicts whether
the teacher would be confident here; the ``gated`` alpha schedule multiplies alpha by its output.

**Labels** (``gate.label``):

- ``token``: free from the harvest store: the teacher's next-token entropy at a position below the
  ``confident_quantile`` quantile of the training positions (or below ``confident_entropy`` nats)
  means confident (positive).
- ``prompt``: the teacher answers each prompt of the built-in set (:mod:`uzr.prompts`) greedily, at
  most ``max_new_tokens`` tokens, up to the end of its first line. Hedging phrases (``hedges``,
  case-insensitive, whole words) or a mean answer entropy above the ``waffle`` threshold give
  WAFFLE; a mean entropy below the ``confident`` threshold without hedging gives CONFIDENT (the
  positive class); the rest is CAUTIOUS. See :func:`prompt_label`.

**Features** (``gate.features``), per student position, from one uninjected student pass:
``hidden`` (the hidden state entering each injected layer), ``ctrl_entropy`` / ``ctrl_peak`` (the
controller's normalised entropy and peak probability of that query row, per injected layer) and
``student_entropy`` (the student's own next-token entropy). ``gate.pool`` turns them into the gate's
input: ``current`` (this position), ``mean`` (running mean over the prefix, causal) or ``both``.
A prompt's feature vector is the pooled vector at its last token; at run time the gate value of a
prompt is the gate at that position, held for the whole answer.

**GateModule** (Lightning, BCE) logs held-out AUROC and accuracy beside two baselines — the
training majority class, and a threshold on the student's own next-token entropy fitted on the
training split — and :meth:`GateModule.report` says whether the gate beats them. Checkpoints are
``gate.safetensors`` + ``gate.json`` (written atomically, sha256 checked on load).

Stage entry points for the pipeline: :func:`gate_key`, :func:`train_gate`, :func:`load_gate`,
:func:`evaluate_gated` (facts-QA accuracy by answer likelihood and bits per byte for no injection,
constant alphas and gated alphas, as one table).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from uzr.attention import attention_modules
from uzr.cache import atomic_write, content_key, file_digest
from uzr.controller import causal_mask, masked_log_softmax
from uzr.facts_qa import QA_SCORE, pad_sequences, qa_accuracy, qa_prompts
from uzr.inject import AlphaSpec, Injector
from uzr.next_token import next_token_stats
from uzr.prompts import PROMPTS_VERSION, PromptSet, adds_special_tokens, format_prompt, resolve_format
from uzr.resumable_fit import fit_resumable
from uzr.text_bytes import predicted_bytes

if TYPE_CHECKING:
    from uzr.config import RunConfig
    from uzr.harvest.store import HarvestStore

log = logging.getLogger(__name__)

__all__ = [
    "CAUTIOUS", "CONFIDENT", "FEATURES", "LABELS", "POOLS", "WAFFLE",
    "GateModule", "GateNet", "GateSpec",
    "auroc", "auroc_se", "distribution_entropy", "evaluate_gated", "fit_gate", "gate_features",
    "gate_key", "gate_positions", "gated_table", "generate_answers", "hedged", "load_gate", "pool_prefix", "prompt_label",
    "prompt_labels", "save_gate", "sequence_parts", "teacher_answers", "teacher_uncertainty", "token_label_threshold",
    "token_labels", "train_gate", "validate_gate_spec",
]

LABELS = ("token", "prompt")
FEATURES = ("hidden", "ctrl_entropy", "ctrl_peak", "student_entropy")
POOLS = ("current", "mean", "both")
CONFIDENT, CAUTIOUS, WAFFLE = "CONFIDENT", "CAUTIOUS", "WAFFLE"
DEFAULT_HEDGES = [
    "not sure", "unsure", "cannot", "can't", "can not", "could not", "couldn't", "depends", "it depends",
    "unclear", "unknown", "not known", "no one knows", "nobody knows", "i don't know", "don't know",
    "i do not know", "uncertain", "impossible", "not possible", "no way to", "unable", "i'm afraid",
    "there is no", "there's no", "there are no", "does not exist", "doesn't exist", "fictional",
    "hypothetical", "not real", "perhaps", "maybe", "possibly", "might be", "probably", "i think",
    "i believe", "not enough information", "hard to say", "difficult to say",
]
CHECKPOINT_FORMAT = "uzr.gate"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "gate.safetensors"
META_FILE = "gate.json"
LABELS_FILE = "labels.jsonl"
# Bump when feature extraction changes meaning: part of the gate artifact's cache key.
FEATURES_VERSION = 1
# GateSpec fields that only shape the evaluation, not the trained gate (left out of its cache key).
EVAL_ONLY_FIELDS = ("eval_alphas",)


# ----------------------------------------------------------------------------------------- config
@dataclass
class GateSpec:
    """Gate labels, features, model and training knobs (the ``gate`` Hydra group)."""

    label: str = "token"  # token | prompt
    # token: teacher next-token entropy below this quantile of the training positions = confident;
    # prompt: mean answer entropy below this quantile of the training prompts = low (CONFIDENT unless hedged)
    confident_quantile: float = 0.5
    confident_entropy: float | None = None  # absolute threshold in nats; overrides confident_quantile
    waffle_quantile: float = 0.8  # prompt: mean answer entropy above this quantile = WAFFLE
    waffle_entropy: float | None = None  # absolute (nats); overrides waffle_quantile
    hedges: list[str] = field(default_factory=lambda: list(DEFAULT_HEDGES))
    max_new_tokens: int = 24  # prompt: teacher answer length bound (greedy, stops at the end of a line)
    prompt_format: str = "auto"  # qa ("Question: ...\nAnswer:") | chat (chat template) | auto (chat if the tokenizer has one)
    prompt_seed: int = 0  # train/held-out split of the built-in prompt set
    heldout_fraction: float = 0.25
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    pool: str = "both"  # current | mean (running mean over the prefix) | both
    max_tokens: int = 20000  # token: training positions kept (seeded subsample); held-out keeps half as many
    hidden_pca: int = 32  # project the hidden-state columns onto this many principal components (0 = all columns)
    hidden: int = 64  # MLP width
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_epochs: int = 30
    batch_size: int = 256
    balance: bool = True  # weight positives by negatives/positives of the training split in the BCE
    eval_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])  # constant and gated rows of the table


def validate_gate_spec(spec: GateSpec) -> GateSpec:
    """Check every field; raise ValueError naming ``gate.<key>``, its value and what is valid."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"gate.{key}={getattr(spec, key)!r} is invalid; valid: {valid}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if spec.label not in LABELS:
        raise bad("label", " | ".join(LABELS))
    for key in ("confident_quantile", "waffle_quantile", "heldout_fraction"):
        v = getattr(spec, key)
        if not number(v) or not 0 < v < 1:
            raise bad(key, "a number strictly between 0 and 1")
    if spec.waffle_quantile <= spec.confident_quantile:
        raise bad("waffle_quantile", f"a quantile above confident_quantile={spec.confident_quantile}")
    for key in ("confident_entropy", "waffle_entropy"):
        v = getattr(spec, key)
        if v is not None and (not number(v) or v < 0):
            raise bad(key, "null or a finite number of nats >= 0")
    if (spec.confident_entropy is not None and spec.waffle_entropy is not None
            and spec.waffle_entropy <= spec.confident_entropy):
        raise bad("waffle_entropy", f"a value above confident_entropy={spec.confident_entropy}")
    if not all(isinstance(h, str) and h.strip() for h in spec.hedges):
        raise bad("hedges", "a list of non-empty phrases")
    if spec.prompt_format not in ("qa", "chat", "auto"):
        raise bad("prompt_format", "qa | chat | auto")
    if not spec.features or any(f not in FEATURES for f in spec.features) or len(set(spec.features)) != len(spec.features):
        raise bad("features", f"a non-empty list of distinct names from {list(FEATURES)}")
    if spec.pool not in POOLS:
        raise bad("pool", " | ".join(POOLS))
    if isinstance(spec.hidden_pca, bool) or not isinstance(spec.hidden_pca, int) or spec.hidden_pca < 0:
        raise bad("hidden_pca", "an integer >= 0 (0 = no projection)")
    for key in ("max_new_tokens", "max_tokens", "hidden", "max_epochs", "batch_size"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, "an integer >= 1")
    if isinstance(spec.prompt_seed, bool) or not isinstance(spec.prompt_seed, int):
        raise bad("prompt_seed", "an integer")
    if not number(spec.dropout) or not 0 <= spec.dropout < 1:
        raise bad("dropout", "a number in [0, 1)")
    if not number(spec.lr) or spec.lr <= 0:
        raise bad("lr", "a finite number > 0")
    if not number(spec.weight_decay) or spec.weight_decay < 0:
        raise bad("weight_decay", "a finite number >= 0")
    if not spec.eval_alphas or any(not number(a) or a < 0 for a in spec.eval_alphas):
        raise bad("eval_alphas", "a non-empty list of finite numbers >= 0")
    return spec


def coerce_gate_spec(spec: GateSpec | Mapping[str, Any] | None) -> GateSpec:
    if spec is None:
        spec = GateSpec()
    elif not isinstance(spec, GateSpec):
        known = {f.name for f in dataclasses.fields(GateSpec)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown gate key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        spec = GateSpec(**{k: (list(v) if k in ("hedges", "features", "eval_alphas") else v) for k, v in spec.items()})
    return validate_gate_spec(spec)


def gate_key(cfg: RunConfig, controller_key: str) -> tuple[str, dict]:
    """Cache key of the gate artifact: the controller's key plus the gate's training knobs."""
    gate = dataclasses.asdict(cfg.gate)
    for name in EVAL_ONLY_FIELDS:
        gate.pop(name, None)
    payload = {
        "controller": controller_key, "gate": gate, "seed": cfg.seed, "features_version": FEATURES_VERSION,
        "prompts_version": PROMPTS_VERSION if cfg.gate.label == "prompt" else None,
        "trainer": {"accelerator": cfg.trainer.accelerator, "precision": cfg.trainer.precision,
                    "deterministic": cfg.trainer.deterministic},
    }
    return content_key("gate", payload), payload


# ----------------------------------------------------------------------------------------- labels
def distribution_entropy(probs: Tensor | np.ndarray) -> np.ndarray:
    """Entropy in nats of each distribution along the last axis (probabilities, rows summing to 1)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    return (-torch.special.xlogy(p, p).sum(-1)).numpy()


def token_label_threshold(train_entropies: Sequence[np.ndarray], spec: GateSpec) -> float:
    """The confident threshold (nats): ``confident_entropy`` or the ``confident_quantile`` quantile
    of every training position's teacher next-token entropy."""
    if spec.confident_entropy is not None:
        return float(spec.confident_entropy)
    pooled = np.concatenate([np.asarray(e, np.float64).reshape(-1) for e in train_entropies])
    if pooled.size == 0:
        raise ValueError("no training positions to set the token-level confident threshold from")
    return float(np.quantile(pooled, spec.confident_quantile))


def teacher_uncertainty(row: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """The teacher's next-token entropy (S,) of a store row (``teacher_next_entropy``, nats), and the
    column it came from. Not ``teacher_entropy``: that is the attention-entropy statistic (L, H, S)."""
    seq_len = len(np.asarray(row["input_ids"]).reshape(-1))
    value = row.get("teacher_next_entropy")
    if value is None or np.asarray(value).shape != (seq_len,):
        raise KeyError("store row has no (S,) teacher_next_entropy column: the store predates it; delete the "
                       "harvest folder and run again")
    return np.asarray(value, np.float64), "teacher_next_entropy"


def token_labels(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Teacher next-token entropy (S,) -> (S,) bool, True = confident (entropy strictly below threshold)."""
    return np.asarray(entropy, np.float64) < threshold


def _normalise_text(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip().lower()


def hedged(text: str, phrases: Sequence[str] = DEFAULT_HEDGES) -> bool:
    """True if ``text`` contains one of ``phrases`` as whole words, ignoring case, curly apostrophes
    and runs of whitespace ("I'm NOT  sure" matches "not sure"; "Maybelline" does not match "maybe")."""
    norm = _normalise_text(text)
    for phrase in phrases:
        p = _normalise_text(phrase)
        if p and re.search(rf"(?<![\w']){re.escape(p)}(?![\w'])", norm):
            return True
    return False


def prompt_label(answer: str, mean_entropy: float, confident_below: float, waffle_above: float,
                 phrases: Sequence[str] = DEFAULT_HEDGES) -> str:
    """CONFIDENT / CAUTIOUS / WAFFLE from the teacher's answer and its mean next-token entropy.

    WAFFLE: the entropy is above ``waffle_above``, or the answer hedges without being low-entropy;
    CONFIDENT: entropy below ``confident_below`` and no hedging; CAUTIOUS: everything else (a
    low-entropy hedge such as a confident "there is no capital of Mars", or a mid-entropy plain answer).
    """
    hedge = hedged(answer, phrases)
    low = mean_entropy < confident_below
    if mean_entropy > waffle_above or (hedge and not low):
        return WAFFLE
    if low and not hedge:
        return CONFIDENT
    return CAUTIOUS


def prompt_labels(answers: Sequence[tuple[str, float]], train_mask: Sequence[bool], spec: GateSpec
                  ) -> tuple[list[str], dict[str, float]]:
    """Labels of every prompt from ``(answer, mean_entropy)``; quantile thresholds come from the
    training prompts only. Returns (labels, {"confident_below", "waffle_above"})."""
    ents = np.array([e for _, e in answers], np.float64)
    train = ents[np.asarray(train_mask, bool)]
    if train.size == 0:
        raise ValueError("no training prompts to set the prompt-level thresholds from")
    lo = spec.confident_entropy if spec.confident_entropy is not None else float(np.quantile(train, spec.confident_quantile))
    hi = spec.waffle_entropy if spec.waffle_entropy is not None else float(np.quantile(train, spec.waffle_quantile))
    hi = max(hi, lo)
    labels = [prompt_label(a, e, lo, hi, spec.hedges) for a, e in answers]
    return labels, {"confident_below": float(lo), "waffle_above": float(hi)}


# ------------------------------------------------------------------------------- teacher answers
class _EntropyRecorder:
    """LogitsProcessor that records the next-token entropy (B,) of every decoding step."""

    def __init__(self):
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logp = torch.log_softmax(scores.float(), -1)
        self.steps.append(-(logp.exp() * logp).sum(-1).cpu())
        return scores


class _LineStop:
    """StoppingCriteria: a sequence is done once its answer has text and then a line break."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([_line_done(t) for t in texts], device=input_ids.device)


def _line_done(text: str) -> bool:
    body = text.lstrip()
    return bool(body) and "\n" in body


def _clean_answer(text: str) -> str:
    return text.lstrip().split("\n", 1)[0].strip()


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answers(model, tokenizer, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                     injector: Injector | None = None, add_special_tokens: bool = True) -> list[dict]:
    """Greedy answers (first line, at most ``max_new_tokens`` tokens) with their mean next-token entropy.

    Returns one ``{"answer", "mean_entropy", "tokens", "content_tokens"}`` per text; the mean entropy
    covers the content tokens (the final end-of-turn / line-break step is left out). An ``injector``
    (attached here and removed afterwards) injects into the model while it answers; it then needs
    ``batch_size=1`` or a gate of shape (B, 1).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    eos_ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop_ids = {tokenizer.eos_token_id, *(eos_ids if isinstance(eos_ids, list) else [eos_ids])} - {None}
    results = []
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # e.g. GGUF tokenizers without a pad token: pad with EOS
            tokenizer.pad_token = tokenizer.eos_token
        pad = tokenizer.pad_token_id
        stop_ids.add(pad)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
                            ).to(_device(model))
            n_prompt = enc["input_ids"].shape[1]
            recorder = _EntropyRecorder()
            if injector is not None:
                injector.attach(model)
            try:
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=StoppingCriteriaList([_LineStop(tokenizer, n_prompt)]),
                    top_p=None, top_k=None, temperature=None,
                )
            finally:
                if injector is not None:
                    injector.remove()
            new = out[:, n_prompt:].cpu()
            ents = torch.stack(recorder.steps, 1) if recorder.steps else torch.zeros(len(chunk), 0)  # (B, T)
            for b in range(len(chunk)):
                n, stopped = new.shape[1], False
                for t in range(new.shape[1]):
                    if int(new[b, t]) in stop_ids or _line_done(tokenizer.decode(new[b, :t + 1], skip_special_tokens=True)):
                        n, stopped = t + 1, True
                        break
                n = min(n, ents.shape[1])
                # The step that ends the answer (end of turn, or a line break) says "the answer is over",
                # not how sure the model is of it: the content steps alone give the mean entropy.
                last = tokenizer.decode(new[b, n - 1:n], skip_special_tokens=True) if n else ""
                content = n - 1 if stopped and n > 1 and not last.strip() else n
                text = tokenizer.decode(new[b, :n], skip_special_tokens=True)
                results.append({"answer": _clean_answer(text), "tokens": n, "content_tokens": content,
                                "mean_entropy": float(ents[b, :content].mean()) if content else 0.0})
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return results


def teacher_answers(teacher, tokenizer, questions: Sequence[str], spec: GateSpec, batch_size: int = 32) -> list[dict]:
    """The teacher answers each question (formatted per ``spec.prompt_format``), greedily."""
    style = resolve_format(tokenizer, spec.prompt_format)
    texts = [format_prompt(q, tokenizer, style) for q in questions]
    return generate_answers(teacher, tokenizer, texts, spec.max_new_tokens, batch_size,
                            add_special_tokens=adds_special_tokens(style))


# --------------------------------------------------------------------------------------- features
def _int_controllers(controllers: Mapping, device) -> dict[int, nn.Module]:
    return {int(k): v.to(device).eval() for k, v in controllers.items()}


@torch.no_grad()
def sequence_parts(student, controllers: Mapping, sequences: Sequence, layers: Sequence[int],
                   batch_size: int = 8, with_nll: bool = False) -> list[dict[str, Tensor]]:
    """One uninjected student pass per sequence of token ids; per sequence (length S) a dict of CPU
    float32 tensors: ``hidden`` (S, len(layers)*D), ``ctrl_entropy`` and ``ctrl_peak`` (S, len(layers)),
    ``student_entropy`` (S, 1) and, with ``with_nll``, ``nll`` (S-1,) of tokens 1..S-1."""
    device = _device(student)
    ctrls = _int_controllers(controllers, device)
    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in ctrls]
    if missing:
        raise ValueError(f"no controller for injected layer(s) {missing}; controllers cover {sorted(ctrls)}")
    modules = attention_modules(student)
    captured: dict[int, Tensor] = {}

    def capture(module, args, kwargs):
        captured[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [modules[x].register_forward_pre_hook(capture, with_kwargs=True) for x in layers]
    results: list[dict[str, Tensor]] = []
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_sequences(sequences[start:start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            captured.clear()
            final = student.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, S, D)
            targets = torch.roll(ids, -1, 1) if with_nll else None
            nt = next_token_stats(student, final, targets)
            allowed = causal_mask(mask)  # (B, S, S)
            n_keys = allowed.sum(-1).float()  # (B, S)
            ent_cols, peak_cols, hidden_cols = [], [], []
            for layer in layers:
                h = captured[layer].float()  # (B, S, D)
                logp = masked_log_softmax(ctrls[layer](h), allowed)  # (B, S, S)
                p = logp.exp() * allowed
                H = -(p * logp).sum(-1)
                ent_cols.append(torch.where(n_keys > 1, H / n_keys.clamp(min=2).log(), torch.zeros_like(H)))
                peak_cols.append(p.amax(-1))
                hidden_cols.append(h)
            parts = {
                "hidden": torch.cat(hidden_cols, -1), "ctrl_entropy": torch.stack(ent_cols, -1),
                "ctrl_peak": torch.stack(peak_cols, -1), "student_entropy": nt["entropy"][..., None],
            }
            for b in range(ids.shape[0]):
                n = int(mask[b].sum())
                row = {k: v[b, :n].float().cpu() for k, v in parts.items()}
                if with_nll:
                    row["nll"] = nt["nll"][b, : n - 1].float().cpu()
                results.append(row)
    finally:
        for handle in handles:
            handle.remove()
    return results


def feature_names(layers: Sequence[int], hidden_size: int, features: Sequence[str], pool: str) -> list[str]:
    base = []
    for name in FEATURES:  # fixed order, whatever order the config lists them in
        if name not in features:
            continue
        if name == "hidden":
            base += [f"hidden_L{layer}[{i}]" for layer in layers for i in range(hidden_size)]
        elif name == "student_entropy":
            base.append("student_entropy")
        else:
            base += [f"{name}_L{layer}" for layer in layers]
    prefixes = {"current": ["cur:"], "mean": ["mean:"], "both": ["cur:", "mean:"]}[pool]
    return [p + n for p in prefixes for n in base]


def token_matrix(parts: Mapping[str, Tensor], features: Sequence[str]) -> Tensor:
    """(S, F) concatenation of the selected parts, in the fixed order of :data:`FEATURES`."""
    return torch.cat([parts[name] for name in FEATURES if name in features], -1)


def pool_prefix(x: Tensor, pool: str) -> Tensor:
    """(S, F) per-position features -> (S, F') gate inputs: the position itself, the running mean over
    positions 0..i (causal), or both concatenated."""
    if pool == "current":
        return x
    mean = x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]
    return mean if pool == "mean" else torch.cat([x, mean], -1)


def gate_features(student, tokenizer, controllers: Mapping, texts_or_rows: Sequence, layers: Sequence[int],
                  features: Sequence[str] = FEATURES, pool: str = "both", batch_size: int = 8) -> list[Tensor]:
    """Gate inputs from the student side only, one (S_i, F) float32 tensor per text or store row.

    ``texts_or_rows``: strings (tokenised with ``tokenizer``, special tokens added) or store rows
    (their ``input_ids``). Row ``i`` of a result is the gate input at position ``i`` (causal); a
    prompt's vector is the last row. Column names: :func:`feature_names`.
    """
    seqs = [_ids_of(tokenizer, item) for item in texts_or_rows]
    parts = sequence_parts(student, controllers, seqs, layers, batch_size)
    return [pool_prefix(token_matrix(p, features), pool) for p in parts]


def gate_positions(gate: GateModule, student, controllers: Mapping, input_ids, layers: Sequence[int]) -> Tensor:
    """Gate value at every position of one sequence, shaped (1, S) for ``Injector.gate`` (schedule
    ``gated``, teacher-forced passes such as bits per byte); from an uninjected student pass."""
    ids = [int(t) for t in torch.as_tensor(np.asarray(input_ids)).reshape(-1)]
    return gate.positions(sequence_parts(student, controllers, [ids], layers)[0])[None]


def _ids_of(tokenizer, item, add_special_tokens: bool = True) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"])
    return [int(t) for t in np.asarray(item["input_ids"]).reshape(-1)]


# ------------------------------------------------------------------------------------------ model
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
        out = {
            "gate": {"auroc": auroc(p, y_np), "accuracy": float(((p > 0.5) == y_np).mean())},
            "majority": {"auroc": 0.5, "accuracy": float((y_np == self.baselines.get("majority_class", True)).mean())},
        }
        if "entropy_column" in self.baselines:
            s = self.baselines["entropy_sign"] * x[:, self.baselines["entropy_column"]].double().cpu().numpy()
            out["student_entropy"] = {"auroc": auroc(s, y_np),
                                      "accuracy": float(((s > self.baselines["entropy_threshold"]) == y_np).mean())}
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
            # majority: its AUROC is 0.5 by construction, so compare accuracy (and demand AUROC above chance)
            "beats_majority": bool(g["accuracy"] > m["accuracy"] and g["auroc"] > 0.5),
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
        parts = [f"held-out AUROC {g['auroc']:.3f}, accuracy {g['accuracy']:.3f}",
                 f"majority class accuracy {m['accuracy']:.3f}"]
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


# ------------------------------------------------------------------------------------ checkpoints


def save_gate(module: GateModule, folder: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``gate.safetensors`` (weights + normalisation) and ``gate.json`` (spec, feature names,
    level, layers, baselines, report, caller metadata, weights sha256), each atomically."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**dict(metadata or {}), "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "in_features": module.in_features, "feature_names": module.feature_names, "level": module.level,
            "layers": module.layers, "spec": dataclasses.asdict(module.spec), "baselines": module.baselines,
            "report": module.report()}
    json.dumps(meta, default=str)  # fail before writing anything
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
    tensors["pos_weight"] = module.pos_weight.detach().cpu().reshape(1)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": CHECKPOINT_FORMAT}))
    meta["weights_sha256"] = file_digest(out / WEIGHTS_FILE)

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)

    atomic_write(out / META_FILE, write_json)
    return out


def load_gate(folder: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> tuple[GateModule, dict]:
    """Rebuild a gate saved by :func:`save_gate` (safetensors, never pickle); ``expected`` fields (e.g.
    ``layers``, ``student``) must match the checkpoint. Returns (module in eval mode, metadata)."""
    d = Path(folder)
    wpath, mpath = d / WEIGHTS_FILE, d / META_FILE
    for p in (mpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"gate checkpoint incomplete: {p} is missing; train the gate (stages=[gate])")
    meta = json.loads(mpath.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{mpath} is not a uzr gate checkpoint of version {CHECKPOINT_VERSION}; retrain the gate")
    for key, value in (expected or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"gate checkpoint {d} does not match this run: {key}={meta.get(key)!r} in the checkpoint, "
                             f"{key}={value!r} now; retrain the gate for this configuration (stages=[gate])")
    if file_digest(wpath) != meta.get("weights_sha256"):
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath}: the weights are truncated or "
                         "modified; retrain the gate")
    tensors = load_file(wpath)
    module = GateModule(meta["in_features"], meta["spec"], meta["feature_names"], meta["level"], meta["layers"])
    module.pos_weight.fill_(float(tensors.pop("pos_weight")[0]))
    module.net.load_state_dict(tensors, strict=True)
    module.baselines = dict(meta.get("baselines") or {})
    module._report = dict(meta.get("report") or {})
    return module.eval(), meta


# ------------------------------------------------------------------------------------- gate stage
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
        parts = sequence_parts(student, controllers, [r["input_ids"] for r in items], layers, batch_size)
        x = torch.cat([pool_prefix(token_matrix(p, spec.features), spec.pool) for p in parts])
        y = torch.from_numpy(np.concatenate([token_labels(e, threshold) for e in entropies]))
        keep = torch.from_numpy(_subsample(len(y), spec.max_tokens if split == "train" else max(spec.max_tokens // 2, 1), rng))
        data[split] = (x[keep], y[keep])
    data["label_info"] = {"threshold": threshold, "source": source, "rule": f"{source} < threshold = confident"}
    return data


def prompt_dataset(student, student_tok, teacher, teacher_tok, controllers: Mapping, layers: Sequence[int],
                   spec: GateSpec, folder: Path | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Prompt-level labels from the teacher's answers and the student's gate inputs at each prompt's
    last token; writes ``labels.jsonl`` into ``folder`` for inspection."""
    prompts = PromptSet(spec.prompt_seed, spec.heldout_fraction).all
    answers = teacher_answers(teacher, teacher_tok, [p.question for p in prompts], spec, batch_size)
    labels, thresholds = prompt_labels([(a["answer"], a["mean_entropy"]) for a in answers],
                                       [p.split == "train" for p in prompts], spec)
    style = resolve_format(student_tok, spec.prompt_format)
    texts = [format_prompt(p.question, student_tok, style) for p in prompts]
    parts = sequence_parts(student, controllers, [_ids_of(student_tok, t, adds_special_tokens(style)) for t in texts],
                           layers)
    x = torch.stack([pool_prefix(token_matrix(p, spec.features), spec.pool)[-1] for p in parts])
    y = torch.tensor([lab == CONFIDENT for lab in labels])
    if folder is not None:
        lines = [json.dumps({"id": p.id, "question": p.question, "kind": p.kind, "split": p.split, **a, "label": lab})
                 for p, a, lab in zip(prompts, answers, labels)]
        atomic_write(Path(folder) / LABELS_FILE, lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    counts: dict[str, dict[str, int]] = {}
    for p, lab in zip(prompts, labels):
        counts.setdefault(f"{p.split}/{p.kind}", {CONFIDENT: 0, CAUTIOUS: 0, WAFFLE: 0})[lab] += 1
    train = torch.tensor([p.split == "train" for p in prompts])
    return {"train": (x[train], y[train]), "heldout": (x[~train], y[~train]),
            "label_info": {**thresholds, "label_counts": counts, "prompts": len(prompts),
                           "rule": "CONFIDENT = mean answer entropy < confident_below and no hedging phrase"}}


def train_gate(folder: Path, cfg: RunConfig, store: HarvestStore, controllers: Mapping, models,
               loggers=None) -> dict:
    """The gate stage: build labels and features, train, save ``gate.safetensors`` + ``gate.json`` into
    ``folder``. ``models``: the pipeline's ModelPool (``models.get("student")`` / ``("teacher")``).
    Returns manifest extras ``{"heldout": report}``."""
    spec = coerce_gate_spec(cfg.gate)
    layers = list(cfg.inject.layers)
    student, student_tok = models.get("student")
    if spec.label == "token":
        data = token_dataset(student, controllers, store, layers, spec, cfg.seed)
    else:
        teacher, teacher_tok = models.get("teacher")
        data = prompt_dataset(student, student_tok, teacher, teacher_tok, controllers, layers, spec, Path(folder))
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


# ------------------------------------------------------------------------------------- evaluation
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
                   known_qa: Mapping[str, float | None] | None = None) -> dict:
    """Facts-QA accuracy and bits per byte for no injection, constant alphas and gated alphas.

    QA (:mod:`uzr.facts_qa`): the held-out answerable prompts (``evaluate.qa_prompts`` of them, or
    ``num_prompts``); the gated rows hold each prompt's gate value (the gate at its last token, from an
    uninjected pass) for all its candidates. Bits per byte: the store's held-out rows
    (``evaluate.num_texts``, or ``num_texts``), gate per position (causal). The teacher's own QA
    accuracy and bits per byte sit beside them. ``known_qa``: accuracies already measured on the same
    prompts (``none``, ``teacher``, e.g. by the evaluate stage), reused instead of scored again.

    Returns ``{"table": {setting: {"qa_accuracy", "bits_per_byte", "mean_gate_qa"?, "mean_gate_text"?}},
    "teacher": {...}, "gate_by_kind": {"answerable", "unanswerable"}, "num_prompts", "num_texts", ...}``;
    settings are ``none``, ``constant@a`` and ``gated@a`` for every ``a`` in ``gate.eval_alphas`` (+
    ``alpha.value``).
    """
    spec = coerce_gate_spec(cfg.gate)
    layers = list(cfg.inject.layers)
    student, tok = models.get("student")
    device = _device(student)
    ctrls = _int_controllers(controllers, device)
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
    parts = sequence_parts(student, ctrls, [_ids_of(tok, t, adds_special_tokens(style)) for t in texts], layers)
    prompt_gate = {p.id: gate.prompt_value(pp) for p, pp in zip(heldout, parts)}
    by_kind = {kind: float(np.mean([prompt_gate[p.id] for p in heldout if p.kind == kind]))
               for kind in ("answerable", "unanswerable") if any(p.kind == kind for p in heldout)}

    # --- facts QA
    qa = qa_prompts(spec.prompt_seed, spec.heldout_fraction,
                    cfg.evaluate.qa_prompts if num_prompts is None else num_prompts)
    def qa_injector(alpha: AlphaSpec | None):
        # one gate value per prompt, held for each of its (len(candidates), S) scoring rows
        return lambda p: injector_for(alpha, torch.full((len(p.candidates), 1), prompt_gate[p.id]))

    known = dict(known_qa or {})
    accuracy = {name: known[name] if name in known else
                qa_accuracy(student, tok, tqdm(qa, desc=f"facts QA: {name}", leave=False), spec.prompt_format,
                            qa_injector(alpha))
                for name, alpha in settings}
    if "teacher" not in known:
        teacher, ttok = models.get("teacher")
        known["teacher"] = qa_accuracy(teacher, ttok, tqdm(qa, desc="facts QA: teacher", leave=False), spec.prompt_format)

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
        "teacher": {"qa_accuracy": known["teacher"],
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
