"""The injected student's edit on QA prompts, for each ``inject.source``: the evaluate stage's facts QA and QA domains
and the per-head profile (:mod:`uzr.injection.profile`) score prompts through it alike.

QA prompts have no stored rows: the controller and the student's own priors run on the student's pass, the teacher
oracle reads each prompt live (:class:`~uzr.injection.oracle.TeacherPrior`), emphasis marks each prompt's spans
(:mod:`uzr.injection.emphasis`), and ``shuffled`` (another text's stored rows) has no QA edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from uzr.injection.emphasis import emphasis_edits
from uzr.injection.injector import Injector
from uzr.injection.oracle import run_teacher_prior
from uzr.injection.priors import AttentionPrior, live_prior
from uzr.qa.prompts import Prompt

if TYPE_CHECKING:  # the setup resolves inject.heads=auto through the profile, which scores through this module
    from uzr.injection.setup import Injection

EditFor = Callable[[list[Prompt]], Injector]  # edit_for(row_prompts) of uzr.qa.facts.qa_scores


def qa_edit_for(run, injection: Injection, source: str, controllers: Mapping[int, torch.nn.Module], layout,
                heads_of: Mapping[int, Sequence[int]] | None) -> EditFor | None:
    """A fresh injector of ``injection`` per batch of QA rows, injecting ``source``; None for ``shuffled``.

    Args:
        run: the :class:`~uzr.runner.RunContext` (its models and config); ``controllers``: ``{layer: controller}``.
        layout: the harvest store's layout (the teacher oracle's layer map); ``heads_of``: per-head targets'
            ``{layer: teacher head of each student head}``, None for head-mean targets.
    """
    cfg = run.cfg
    layers = list(cfg.inject.layers)
    if source == "shuffled":
        return None
    if source == "emphasis":
        _, tokenizer = run.models.get("student")
        return emphasis_edits(lambda prior: injection.injector(prompt_len=0, source=prior), tokenizer,
                              cfg.gate.prompt_format, layers, cfg.inject.emphasis_beta, cfg.inject.emphasis_form,
                              cfg.inject.emphasis_span)

    def prior() -> AttentionPrior:  # the oracle keeps each text's teacher pass: a fresh one per batch
        if source == "teacher":
            return run_teacher_prior(run, layout, layers, heads_of)
        return live_prior(source, controllers, heads_of is not None)

    return lambda rows: injection.injector(prompt_len=0, source=prior())
