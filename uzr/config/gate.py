"""The ``gate`` config group: labels, features, model and training knobs of the gate (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.fields import from_mapping

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
# GateSpec fields that only shape the evaluation, not the trained gate (left out of its cache key).
EVAL_ONLY_FIELDS = ("eval_alphas",)
# GateSpec fields that only shape prompt-level labels (left out of a token-level gate's cache key).
PROMPT_ONLY_FIELDS = ("check_answers",)



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
    check_answers: bool = True  # prompt: CONFIDENT also needs the fact-table answer in the teacher's answer
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
    if not isinstance(spec.check_answers, bool):
        raise bad("check_answers", "true | false")
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
    """GateSpec from a spec, a mapping or None (defaults); validated."""
    spec = from_mapping(GateSpec, spec, "gate")
    return validate_gate_spec(spec)
