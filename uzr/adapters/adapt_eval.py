"""The adapt stage's report: the trained arm beside the control arm and the frozen student, on the same items.

Every role runs through the evaluate stage's own scoring: held-out texts of the run's data and of
``evaluate.domains`` through :func:`~uzr.evaluate.texts.score_settings` (each role a :class:`~uzr.evaluate.texts.Setting`
whose edit is the role's adapter plus its arm's injector), facts QA and ``evaluate.qa_domains`` through
:func:`~uzr.evaluate.qa.facts_qa` / :func:`~uzr.evaluate.qa.domain_qa` (the arm in the ``injected`` role, the
control in the ``oracle`` role, relabelled here). Every difference carries its paired interval
(:mod:`uzr.intervals`): ``adapted_minus_control``, ``adapted_minus_student``, ``control_minus_student``.

Roles: ``student`` (frozen, nothing attached), ``control`` (the control arm's adapter: plain LoRA) and ``adapted``
(this run's arm with its injector). When the run's arm is the control, only ``adapted`` is scored beside the student.
The teacher arm's QA needs the live oracle on every prompt: scored only with ``adapt.teacher_qa=true``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from uzr.adapters.adapt_arms import qa_edit, text_edit
from uzr.config.corpus import domain_spec
from uzr.evaluate.domains import domain_store
from uzr.evaluate.qa import QAInjection, domain_qa, facts_qa
from uzr.evaluate.texts import PLAIN, Setting, heldout_rows, score_settings
from uzr.harvest.stage import HarvestStage
from uzr.hooks import Edits
from uzr.intervals import bits_per_byte_difference

if TYPE_CHECKING:  # the stage module imports this one
    from uzr.adapters.adapt_stage import AdaptedArm

PAIRS = {"adapted_minus_control": ("adapted", "control"), "adapted_minus_student": ("adapted", PLAIN.name),
         "control_minus_student": ("control", PLAIN.name)}


def adapt_report(run, roles: Mapping[str, AdaptedArm]) -> dict:
    """Training logs, bits per byte per domain and QA of ``roles`` (``adapted``: the run's arm; ``control``: the
    control arm, when compared) beside the frozen student (see the module docstring)."""
    cfg = run.cfg
    store = run.upstream(HarvestStage)
    run = scoring_run(run)
    out = {"training": {role: training_log(a) for role, a in roles.items()}, "domains": {}}
    data_name = cfg.data.name if cfg.data else "data"
    for name, domain in [(data_name, store), *((d, domain_store(run, d)[0]) for d in cfg.evaluate.domains)]:
        rows = heldout_rows(domain, cfg.evaluate.num_texts)
        out["domains"][name] = {**text_section(run, domain, rows, roles),
                                "cut": cfg.data.long_text if name == data_name and cfg.data else domain_spec(name).long_text}
    out.update(qa_sections(run, store, roles))
    return out


def scoring_run(run):
    """``run`` whose stored scores (:meth:`~uzr.runner.RunContext.stored`) are keyed by the harvest alone beside each
    setting's own key: a role's key holds its arm's artifact key, which fixes its adapter and injector (controller,
    ``inject.*``, ``alpha.*``), and the harvest fixes the models and texts. So the control arm's scores, computed by
    the first run that compares with it, are read by every other arm of a sweep instead of computed again."""
    return dataclasses.replace(run, info={"harvest": run.info["harvest"]})


def training_log(arm: AdaptedArm) -> dict:
    """An arm's training record: steps, time, the per-step losses and the held-out learning curve."""
    return {**arm.meta["training"], "key": arm.key, "history": arm.meta["history"], "curve": arm.meta["curve"]}


def role_settings(run, store, roles: Mapping[str, AdaptedArm]) -> list[Setting]:
    """The frozen student and each role as a setting of :func:`score_settings` on ``store``'s rows."""
    model, _ = run.models.get("student")
    settings = [PLAIN]
    for role, arm in roles.items():
        injector = text_edit(run, store, arm.arm)
        settings.append(Setting(role, ("adapt", arm.key),
                                lambda ids, row, arm=arm, injector=injector: Edits(arm.adapter(model), injector(row))))
    return settings


def text_section(run, store, rows: list[dict], roles: Mapping[str, AdaptedArm]) -> dict:
    """Bits per byte of student, roles and teacher on ``rows`` of ``store``, with the paired intervals of
    :data:`PAIRS` whose roles were scored."""
    cfg = run.cfg
    student, tok = run.models.get("student")
    scores = score_settings(student, tok, rows, role_settings(run, store, roles), list(cfg.inject.layers),
                            cfg.harvest.locality_window, cfg.harvest.max_length, None, run.memo, "adapt evaluate",
                            stored=run.stored)
    names = [PLAIN.name, *roles]
    out = {"bits_per_byte": {("student" if n == PLAIN.name else n): scores.bits_per_byte(n) for n in names},
           "num_texts": len(rows), "bytes": sum(scores.bytes),
           "per_text": {"bytes": list(scores.bytes),
                        **{f"nll_{'student' if n == PLAIN.name else n}": scores.settings[n].nll for n in names}}}
    out["bits_per_byte"]["teacher"] = scores.teacher_bits_per_byte()
    for pair, (a, b) in PAIRS.items():
        if a in scores.settings and b in scores.settings and scores.bytes:
            difference = bits_per_byte_difference(scores.settings[a].nll, scores.settings[b].nll, scores.bytes)
            out["bits_per_byte"][pair] = {**difference.as_dict(), "verdict": difference.verdict(higher_is_better=False)}
    return out


def role_qa(run, store, arm: AdaptedArm) -> QAInjection | None:
    """A role's QA edit (adapter + arm injector per batch); None for the teacher arm without ``adapt.teacher_qa``."""
    if arm.arm == "teacher" and not run.cfg.adapt.teacher_qa:
        return None
    model, _ = run.models.get("student")
    injector = qa_edit(run, store, arm.arm)
    return QAInjection(lambda rows: Edits(arm.adapter(model), injector(rows) if injector else None), ("adapt", arm.key))


def qa_sections(run, store, roles: Mapping[str, AdaptedArm]) -> dict:
    """Facts QA and ``evaluate.qa_domains``: the evaluate stage's comparison with the roles relabelled."""
    cfg = run.cfg
    scored = {role: qa for role, arm in roles.items() if (qa := role_qa(run, store, arm)) is not None}
    if not scored:
        return {"qa": "not scored: adapt.teacher_qa=false (the teacher arm's QA reads every prompt with the live teacher)"}
    first, second = list(scored)[0], (list(scored)[1] if len(scored) > 1 else None)
    labels = {"injected": first, **({"oracle": second} if second else {})}
    labels.update({f"{k}_minus_student": f"{v}_minus_student" for k, v in list(labels.items())})
    if second:
        labels["injected_minus_oracle"] = f"{first}_minus_{second}"
    out = {}
    if cfg.evaluate.facts_qa:
        out["facts_qa"] = relabelled(facts_qa(run, scored[first], scored.get(second)), labels)
    if cfg.evaluate.qa_domains:
        out["qa_domains"] = {name: relabelled(domain_qa(run, name, scored[first], scored.get(second)), labels)
                             for name in cfg.evaluate.qa_domains}
    if "adapted" not in scored:
        out["adapted_qa"] = "not scored: adapt.teacher_qa=false (the teacher arm's QA reads every prompt live)"
    return out


def relabelled(section, labels: Mapping[str, str]):
    """``section`` with every mapping key in ``labels`` renamed (recursively)."""
    if isinstance(section, Mapping):
        return {labels.get(k, k): relabelled(v, labels) for k, v in section.items()}
    if isinstance(section, list):
        return [relabelled(v, labels) for v in section]
    return section
