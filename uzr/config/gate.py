"""The ``gate`` config group: labels, features, model and training knobs of the gate (torch-free)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uzr.config.checks import (
    check_bool,
    check_choice,
    check_distinct,
    check_float,
    check_int,
    invalid,
    is_number,
)
from uzr.config.fields import from_mapping
from uzr.config.groups import ConfigGroup
from uzr.config.keys import NOT_KEYED

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
    # prompt: CONFIDENT also needs the fact-table answer in the teacher's answer. Keyed by prompt-level gates only
    # (gate_payload), so token-level gates keep their keys.
    check_answers: bool = field(default=True, metadata=NOT_KEYED)
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
    # constant and gated rows of the table: the evaluation only, not the trained gate
    eval_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata=NOT_KEYED)
    # generated answers (uzr.gate.answers): greedy answers of the student, constant- and gate-injected at alpha.value
    # to this many held-out answerable prompts, judged against the fact tables (0 = off); the evaluation only
    generated_answers: int = field(default=0, metadata=NOT_KEYED)
    answer_tokens: int = field(default=24, metadata=NOT_KEYED)  # new tokens per generated answer


def validate_gate_spec(spec: GateSpec) -> GateSpec:
    """Check every field; raise ValueError naming ``gate.<key>``, its value and what is valid."""

    def key(name: str) -> str:
        return f"gate.{name}"

    check_choice(key("label"), spec.label, LABELS)
    for name in ("confident_quantile", "waffle_quantile", "heldout_fraction"):
        check_float(key(name), getattr(spec, name), 0, 1, open_low=True, open_high=True,
                    valid="a number strictly between 0 and 1")
    if spec.waffle_quantile <= spec.confident_quantile:
        raise invalid(key("waffle_quantile"), spec.waffle_quantile,
                      f"a quantile above confident_quantile={spec.confident_quantile}")
    for name in ("confident_entropy", "waffle_entropy"):
        if getattr(spec, name) is not None:
            check_float(key(name), getattr(spec, name), low=0, valid="null or a finite number of nats >= 0")
    if (spec.confident_entropy is not None and spec.waffle_entropy is not None
            and spec.waffle_entropy <= spec.confident_entropy):
        raise invalid(key("waffle_entropy"), spec.waffle_entropy, f"a value above confident_entropy={spec.confident_entropy}")
    if not all(isinstance(h, str) and h.strip() for h in spec.hedges):
        raise invalid(key("hedges"), spec.hedges, "a list of non-empty phrases")
    check_bool(key("check_answers"), spec.check_answers)
    check_choice(key("prompt_format"), spec.prompt_format, ("qa", "chat", "auto"))
    check_distinct(key("features"), spec.features, FEATURES)
    check_choice(key("pool"), spec.pool, POOLS)
    check_int(key("hidden_pca"), spec.hidden_pca, minimum=0, valid="an integer >= 0 (0 = no projection)")
    for name in ("max_new_tokens", "max_tokens", "hidden", "max_epochs", "batch_size"):
        check_int(key(name), getattr(spec, name), minimum=1)
    check_int(key("prompt_seed"), spec.prompt_seed)
    check_int(key("generated_answers"), spec.generated_answers, minimum=0,
              valid="an integer >= 0 (0 = off, N = that many held-out answerable prompts)")
    check_int(key("answer_tokens"), spec.answer_tokens, minimum=1)
    check_float(key("dropout"), spec.dropout, 0, 1, open_high=True)
    check_float(key("lr"), spec.lr, low=0, open_low=True)
    check_float(key("weight_decay"), spec.weight_decay, low=0)
    if not spec.eval_alphas or any(not is_number(a) or a < 0 for a in spec.eval_alphas):
        raise invalid(key("eval_alphas"), spec.eval_alphas, "a non-empty list of finite numbers >= 0")
    return spec


def coerce_gate_spec(spec: GateSpec | Mapping[str, Any] | None) -> GateSpec:
    """GateSpec from a spec, a mapping or None (defaults); validated."""
    spec = from_mapping(GateSpec, spec, "gate")
    return validate_gate_spec(spec)


CONFIG_GROUPS = (ConfigGroup("gate", GateSpec, lambda cfg: validate_gate_spec(cfg.gate)),)
