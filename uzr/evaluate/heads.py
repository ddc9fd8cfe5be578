"""Per-head profiling and the run's injected heads (``inject.heads``).

PASTA (arXiv 2311.02262) steers only the few heads where steering helps, found by steering one head at a time on a
profiling set. :func:`profile_heads` does the same for any QA-capable source (``inject.profile_source``: the teacher
oracle, the controller or emphasis): every (layer, head) of the injected layers is injected alone on
``inject.profile_items`` training prompts (:func:`profile_prompts`: never the evaluated ones), and its effect is the
mean change of the right candidate's log-likelihood against the uninjected student (and the change of accuracy, for
the report). ``inject.heads=auto`` injects the ``inject.top_k_heads`` heads of highest effect (:meth:`HeadProfile.top`).

The profile is a cached sub-artifact (``head_profile/<key>``, :func:`cached_head_profile`): a run computes it once,
later runs and the jobs of a sweep read it; :func:`uzr.evaluate.injection.run_injection` injects its top heads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from uzr.config.inject import profile_source, source_label
from uzr.config.keys import key_of
from uzr.evaluate.qa import domain_prompts
from uzr.evaluate.texts import injection_key
from uzr.injection.qa_edits import qa_edit_for
from uzr.injection.setup import Injection
from uzr.qa.facts import qa_scores
from uzr.qa.prompts import Prompt, PromptSet
from uzr.report.figures import head_effect_figure

PROFILE_VERSION = 1  # bump when what the profile measures changes meaning
Heads = dict[int, tuple[int, ...]]  # {layer: injected heads}


@dataclass(frozen=True)
class HeadProfile:
    """Each profiled head's effect, injected alone, on the same prompts: ``heads`` [(layer, head), ...];
    ``loglik_delta``: mean change (nats) of the right candidate's summed log-likelihood vs the uninjected student;
    ``accuracy_delta``: change of accuracy; ``student_accuracy``: the uninjected student's."""

    heads: list[tuple[int, int]]
    loglik_delta: list[float]
    accuracy_delta: list[float]
    student_accuracy: float
    num_prompts: int

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` heads of highest log-likelihood effect (ties: higher accuracy effect, then profiling order)."""
        order = sorted(range(len(self.heads)), key=lambda i: (-self.loglik_delta[i], -self.accuracy_delta[i], i))
        return [self.heads[i] for i in order[:k]]

    def grid(self, layers: Sequence[int], num_heads: int) -> np.ndarray:
        """(len(layers), num_heads) log-likelihood effects (NaN for a head not profiled)."""
        out = np.full((len(layers), num_heads), np.nan)
        for (layer, head), delta in zip(self.heads, self.loglik_delta):
            out[list(layers).index(layer), head] = delta
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "heads": [list(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> HeadProfile:
        return cls(**{**data, "heads": [tuple(h) for h in data["heads"]]})


def profile_heads(score: Callable[[Heads | None], list[list[float]]], prompts: Sequence[Prompt],
                  heads: Sequence[tuple[int, int]]) -> HeadProfile:
    """Each of ``heads`` injected alone: ``score(None)`` gives the uninjected student's candidate scores on
    ``prompts``, ``score({layer: (head,)})`` the scores with that one head injected."""
    right = [p.correct_index() for p in prompts]

    def summary(scores: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([s[i] for s, i in zip(scores, right)]),
                np.array([int(np.argmax(s)) == i for s, i in zip(scores, right)], dtype=float))

    plain_ll, plain_ok = summary(score(None))
    loglik, accuracy = [], []
    for layer, head in heads:
        ll, ok = summary(score({layer: (head,)}))
        loglik.append(float((ll - plain_ll).mean()))
        accuracy.append(float((ok - plain_ok).mean()))
    return HeadProfile([tuple(h) for h in heads], loglik, accuracy, float(plain_ok.mean()), len(prompts))


def profile_prompts(cfg) -> list[Prompt]:
    """The profiling prompts: ``inject.profile_items`` of ``inject.profile_qa`` that are never evaluated — facts QA's
    train split (answerable), a QA domain's train split, or (causal_loop, held-out items only) its items of seed
    ``evaluate.qa_domain_seed + 1``."""
    spec, n = cfg.inject, cfg.inject.profile_items
    if spec.profile_qa == "facts_qa":
        return [p for p in PromptSet(cfg.gate.prompt_seed, cfg.gate.heldout_fraction).train if p.answerable][:n]
    if spec.profile_qa == "causal_loop":
        return domain_prompts("causal_loop", replace(cfg.evaluate, qa_domain_items=n,
                                                     qa_domain_seed=cfg.evaluate.qa_domain_seed + 1))
    return domain_prompts(spec.profile_qa, replace(cfg.evaluate, qa_domain_items=n), split="train")


def cached_head_profile(run, injection: Injection, controllers: Mapping, layout,
                        heads_of: Mapping[int, Sequence[int]] | None) -> HeadProfile:
    """The run's per-head profile (``inject.profile_*``), computed once and kept as ``head_profile/<key>``.

    ``injection``: the run's (alpha, mode, sinks; its heads are ignored); ``controllers``, ``layout`` (the harvest
    store's) and ``heads_of`` (per-head targets' head matching) as the evaluate stage injects them. A gated alpha is profiled at
    its constant value (the profile has no gate)."""
    cfg = run.cfg
    source = profile_source(cfg.inject)
    alpha = injection.alpha
    alpha = alpha.variant("constant", alpha.value) if alpha.schedule == "gated" else alpha
    prompts = profile_prompts(cfg)
    heads = [(layer, head) for layer in cfg.inject.layers for head in range(cfg.student.num_heads)]
    payload = {
        "student": key_of(cfg.student, "facts_qa"), "device": cfg.device,
        "injection": list(injection_key(source_label(cfg.inject, source), injection.mode, alpha, injection.sinks)),
        # the oracle's teacher; the controller comes with the stage keys, emphasis' knobs with its label
        "teacher": key_of(cfg.teacher, "facts_qa") if source == "teacher" else None,
        "artifacts": {} if source == "emphasis" else {k: run.info[k]["key"] for k in ("harvest", "controller")
                                                      if k in run.info},
        "heads": [list(h) for h in heads], "prompt_format": cfg.gate.prompt_format,
        "batch_size": cfg.evaluate.qa_batch_size,
        "prompts": [[p.id, p.question, list(p.candidates), [list(s) for s in p.spans(cfg.inject.emphasis_span)]]
                    for p in prompts]}

    def build(folder: Path) -> dict:
        student, tokenizer = run.models.get("student")
        base = replace(injection, alpha=alpha)

        def score(only: Heads | None) -> list[list[float]]:
            edit_for = None if only is None else qa_edit_for(run, replace(base, heads=only), source, controllers,
                                                             layout, heads_of)
            what = "student" if only is None else ", ".join(f"L{layer}H{h}" for layer, hs in only.items() for h in hs)
            return qa_scores(student, tokenizer, prompts, cfg.gate.prompt_format, edit_for,
                             cfg.evaluate.qa_batch_size, desc=f"head profile: {what}")

        profile = profile_heads(score, prompts, heads)
        (folder / "profile.json").write_text(json.dumps(profile.as_dict()))
        return {"num_heads": len(heads), "num_prompts": len(prompts)}

    folder, _ = run.artifact("head_profile", payload, build, version=PROFILE_VERSION)
    return HeadProfile.from_dict(json.loads((folder / "profile.json").read_text()))


def run_profile(run, injection: Injection, controllers: Mapping, layout,
                heads_of: Mapping[int, Sequence[int]] | None) -> HeadProfile:
    """:func:`cached_head_profile`, once per run."""
    return run.memo(("head_profile",), lambda: cached_head_profile(run, injection, controllers, layout, heads_of))


def head_profile_section(run, profile: HeadProfile) -> dict:
    """The evaluate stage's ``head_profile`` section (the run's profile and the heads it chose) and its figure."""
    cfg = run.cfg
    selected = profile.top(cfg.inject.top_k_heads)
    path = run.out_dir / "figures" / "head_profile.png"
    head_effect_figure(path, profile.grid(cfg.inject.layers, cfg.student.num_heads), list(cfg.inject.layers),
                       selected, f"{profile_source(cfg.inject)} on {cfg.inject.profile_qa} ({profile.num_prompts} "
                       "train prompts)")
    run.images["head_profile"] = path
    return {"source": source_label(cfg.inject, profile_source(cfg.inject)), "qa": cfg.inject.profile_qa,
            **profile.as_dict(), "selected": [list(h) for h in selected],
            # by name too, so the loggers' flat metrics carry every head's effect
            "by_head": {f"L{layer}H{head}": delta for (layer, head), delta in zip(profile.heads, profile.loglik_delta)},
            "effect": "mean change of the right candidate's summed log-likelihood (nats), one head injected",
            **({"note": "no head changed any score (emphasis on prompts without a marked span?): the selected heads "
                        "are the first in profiling order"} if not any(profile.loglik_delta) else {})}
