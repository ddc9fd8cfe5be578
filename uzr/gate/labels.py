"""Gate labels from the teacher: token level (next-token entropy) and prompt level (its answers)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from uzr.config.gate import (
    CAUTIOUS,
    CONFIDENT,
    DEFAULT_HEDGES,
    WAFFLE,
    GateSpec,
)
from uzr.generation import generate_answers
from uzr.qa.answers import contains_phrase
from uzr.qa.prompts import adds_special_tokens, format_prompt, resolve_format

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

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


def hedged(text: str, phrases: Sequence[str] = DEFAULT_HEDGES) -> bool:
    """True if ``text`` contains one of ``phrases`` as whole words, ignoring case, curly apostrophes
    and runs of whitespace ("I'm NOT  sure" matches "not sure"; "Maybelline" does not match "maybe")."""
    return contains_phrase(text, phrases)


# The gate value read as the prompt-level labels: CONFIDENT at or above the first, CAUTIOUS down to the second,
# WAFFLE below (the live demo's green / yellow / red).
CONFIDENCE_LEVELS = ((0.5, CONFIDENT), (0.25, CAUTIOUS))


def confidence_level(value: float) -> str:
    """CONFIDENT / CAUTIOUS / WAFFLE of a gate value in [0, 1] (:data:`CONFIDENCE_LEVELS`)."""
    return next((name for floor, name in CONFIDENCE_LEVELS if value >= floor), WAFFLE)


def prompt_label(answer: str, mean_entropy: float, confident_below: float, waffle_above: float,
                 phrases: Sequence[str] = DEFAULT_HEDGES, correct: bool | None = None) -> str:
    """CONFIDENT / CAUTIOUS / WAFFLE from the teacher's answer and its mean next-token entropy.

    WAFFLE: the entropy is above ``waffle_above``, or the answer hedges without being low-entropy;
    CONFIDENT: entropy below ``confident_below``, no hedging and not known to be wrong (``correct``: the
    answer checked against the fact tables, None where nothing was checked); CAUTIOUS: everything else
    (a low-entropy hedge such as a confident "there is no capital of Mars", a confident wrong answer, or
    a mid-entropy plain answer).
    """
    hedge = hedged(answer, phrases)
    low = mean_entropy < confident_below
    if mean_entropy > waffle_above or (hedge and not low):
        return WAFFLE
    if low and not hedge and correct is not False:
        return CONFIDENT
    return CAUTIOUS


def prompt_labels(answers: Sequence[tuple[str, float]], train_mask: Sequence[bool], spec: GateSpec,
                  correct: Sequence[bool | None] | None = None) -> tuple[list[str], dict[str, float]]:
    """Labels of every prompt from ``(answer, mean_entropy)`` and, where given, whether each answer is right
    (:func:`prompt_label`); quantile thresholds come from the training prompts only. Returns (labels,
    {"confident_below", "waffle_above"})."""
    ents = np.array([e for _, e in answers], np.float64)
    train = ents[np.asarray(train_mask, bool)]
    if train.size == 0:
        raise ValueError("no training prompts to set the prompt-level thresholds from")
    lo = spec.confident_entropy if spec.confident_entropy is not None else float(np.quantile(train, spec.confident_quantile))
    hi = spec.waffle_entropy if spec.waffle_entropy is not None else float(np.quantile(train, spec.waffle_quantile))
    hi = max(hi, lo)
    checked = [None] * len(answers) if correct is None else list(correct)
    labels = [prompt_label(a, e, lo, hi, spec.hedges, ok) for (a, e), ok in zip(answers, checked)]
    return labels, {"confident_below": float(lo), "waffle_above": float(hi)}


def teacher_answers(teacher, tokenizer, questions: Sequence[str], spec: GateSpec, batch_size: int = 32,
                    desc: str | None = None) -> list[dict]:
    """The teacher answers each question (formatted per ``spec.prompt_format``), greedily; ``desc``: label of
    a progress bar (with ETA) counting answered questions (None: no bar)."""
    style = resolve_format(tokenizer, spec.prompt_format)
    texts = [format_prompt(q, tokenizer, style) for q in questions]
    return generate_answers(teacher, tokenizer, texts, spec.max_new_tokens, batch_size,
                            add_special_tokens=adds_special_tokens(style), desc=desc)
