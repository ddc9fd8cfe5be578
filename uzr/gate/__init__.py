"""The gate: learn *when* to inject (DESIGN.md §7).

A small MLP reads the student's side only — the teacher is absent at run time — and predicts whether
the teacher would be confident here; the ``gated`` alpha schedule multiplies alpha by its output.

**Labels** (``gate.label``):

- ``token``: free from the harvest store: the teacher's next-token entropy at a position below the
  ``confident_quantile`` quantile of the training positions (or below ``confident_entropy`` nats)
  means confident (positive).
- ``prompt``: the teacher answers each prompt of the built-in set (:mod:`uzr.qa.prompts`) greedily, at
  most ``max_new_tokens`` tokens, up to the end of its first line. Hedging phrases (``hedges``,
  case-insensitive, whole words) or a mean answer entropy above the ``waffle`` threshold give
  WAFFLE; a mean entropy below the ``confident`` threshold without hedging gives CONFIDENT (the
  positive class) when the answer states the fact-table answer (``check_answers``, judged by
  :mod:`uzr.qa.answers`; an unanswerable prompt is never CONFIDENT); the rest is CAUTIOUS. See
  :func:`prompt_label`. The labels mean "the teacher answers this prompt confidently and correctly".

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

The package: :mod:`~uzr.gate.labels`, :mod:`~uzr.gate.features`, :mod:`~uzr.gate.model`,
:mod:`~uzr.gate.checkpoint`, :mod:`~uzr.gate.stage` (the cached artifact) and :mod:`~uzr.gate.evaluation`
(:func:`evaluate_gated` (facts-QA accuracy by answer likelihood and bits per byte for no injection,
constant alphas and gated alphas, as one table).
"""

from __future__ import annotations

from uzr.config.gate import (
    CAUTIOUS,
    CONFIDENT,
    FEATURES,
    LABELS,
    POOLS,
    WAFFLE,
    GateSpec,
    coerce_gate_spec,
    validate_gate_spec,
)
from uzr.gate.checkpoint import load_gate, save_gate
from uzr.gate.evaluation import evaluate_gated, gated_table, gated_verdict, print_gated_table
from uzr.gate.features import (
    feature_names,
    gate_features,
    gate_positions,
    pool_prefix,
    sequence_parts,
    token_matrix,
)
from uzr.gate.labels import (
    CONFIDENCE_LEVELS,
    confidence_level,
    distribution_entropy,
    hedged,
    prompt_label,
    prompt_labels,
    teacher_answers,
    teacher_uncertainty,
    token_label_threshold,
    token_labels,
)
from uzr.gate.model import GateModule, GateNet, auroc, auroc_se, fit_gate
from uzr.gate.stage import GateStage, gate_payload, train_gate

__all__ = ['CAUTIOUS', 'CONFIDENT', 'FEATURES', 'CONFIDENCE_LEVELS', 'confidence_level', 'GateModule', 'GateNet', 'GateSpec', 'LABELS', 'POOLS', 'WAFFLE', 'auroc', 'auroc_se', 'coerce_gate_spec', 'distribution_entropy', 'evaluate_gated', 'feature_names', 'fit_gate', 'gate_features', 'GateStage', 'gate_payload', 'gate_positions', 'gated_table', 'gated_verdict', 'hedged', 'load_gate', 'pool_prefix', 'print_gated_table', 'prompt_label', 'prompt_labels', 'save_gate', 'sequence_parts', 'teacher_answers', 'teacher_uncertainty', 'token_label_threshold', 'token_labels', 'token_matrix', 'train_gate', 'validate_gate_spec']
