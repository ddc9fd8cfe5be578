"""The ``inject`` and ``alpha`` config groups: where, how and how strongly to inject (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from uzr.config.checks import check_choice, check_float, check_int, is_int
from uzr.config.evaluate import QA_DOMAINS
from uzr.config.groups import ConfigGroup

SCHEDULES = ("constant", "linear", "cosine", "entropy_local", "gated")
MODES = ("bias", "mix")
# What is injected (uzr.injection.priors): the method, its oracle ceiling, three controls, and emphasis steering (a
# hand-set prior toward a prompt's marked spans, no controller or teacher involved).
SOURCES = ("controller", "teacher", "student_self", "uniform", "shuffled", "emphasis")
EMPHASIS_FORMS = ("bias", "pasta")  # inject.emphasis_form (uzr.injection.priors.EmphasisPrior)
EMPHASIS_SPANS = ("marked", "evidence")  # inject.emphasis_span (uzr.qa.prompts.Prompt.spans)
# Sources a per-head profile (inject.heads=auto) can inject one head at a time: those that act on QA prompts.
PROFILE_SOURCES = ("controller", "teacher", "emphasis")
PROFILE_SETS = ("facts_qa",)  # inject.profile_qa, besides the QA domains (uzr.config.evaluate.QA_DOMAINS)
SINKS = ("replace", "keep")  # inject.sinks: the injected prior shapes every key, or leaves the student's sinks (uzr.injection.sinks)
AUTO = "auto"  # inject.teacher_layers=auto: the harvest picks each layer's teacher layer (uzr.harvest.layer_matching)


@dataclass
class AlphaSpec:
    """Injection strength. ``value`` is the base alpha; the schedule shapes it per query row.

    ``linear``/``cosine`` warm up from 0 to ``value`` over ``warmup_steps`` decoding steps;
    ``entropy_local`` scales by ``1 - normalised entropy`` of the controller's row;
    ``gated`` multiplies by the gate's output (and by the entropy-local factor if ``entropy_local``).
    ``layer_weights`` maps a student layer to a multiplier (default 1).
    """

    schedule: str = "constant"
    value: float = 0.5
    warmup_steps: int = 16
    entropy_local: bool = False
    layer_weights: dict[int, float] = field(default_factory=dict)

    def variant(self, schedule: str, value: float) -> AlphaSpec:
        """This alpha (layer weights, warm-up, entropy-local) with another schedule and base value."""
        return replace(self, schedule=schedule, value=value)


def validate_alpha(spec: AlphaSpec) -> None:
    if spec.schedule not in SCHEDULES:
        raise ValueError(f"alpha.schedule={spec.schedule!r} is unknown; valid choices: {', '.join(SCHEDULES)}")
    if not math.isfinite(spec.value) or spec.value < 0:
        raise ValueError(f"alpha.value={spec.value} must be a finite number >= 0")
    if spec.warmup_steps < 1:
        raise ValueError(f"alpha.warmup_steps={spec.warmup_steps} must be >= 1")
    for layer, weight in spec.layer_weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"alpha.layer_weights[{layer}]={weight} must be a finite number >= 0")


def injected_layers_valid(layers: list[int], num_layers: int, depth_note: str = "") -> None:
    """Fail fast on bad layer lists before any model loads (``depth_note``: why the student has ``num_layers``)."""
    if not layers:
        raise ValueError("inject.layers is empty; give at least one student layer, e.g. inject.layers=[4]")
    if len(set(layers)) != len(layers):
        raise ValueError(f"inject.layers={layers} contains duplicates")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"inject.layers={layers}: {bad} outside the student's layers 0..{num_layers - 1}{depth_note}")


@dataclass
class InjectSpec:
    """Which student layers get the teacher's habits, from which teacher layers, and how."""

    layers: list[int] = field(default_factory=lambda: [4, 15, 26])  # 0-based student layers
    # Teacher layer mapped to each injected layer: a list, None = proportional depth round(l * (Lt-1)/(Ls-1)),
    # or "auto" = for each injected layer the teacher layer whose aligned attention is closest (least mean row KL
    # to the student's own, on the training texts; uzr.harvest.layer_matching). Typed Any: a list or "auto".
    teacher_layers: Any = None
    mode: str = "bias"  # one of MODES
    source: str = "controller"  # one of SOURCES: what is injected (see uzr.injection.priors)
    # replace: the prior shapes every key (the student loses its sink mass); keep: the student's own mass on its sink
    # keys stays and the prior shapes the rest. Sinks are detected per layer on the harvest's training texts: the
    # first position, or a token id (in >= 2 texts), whose mean mass over queries at least harvest.locality_window
    # later is >= sink_ratio times the uniform share 1/(i+1) (uzr.injection.sinks).
    sinks: str = "replace"
    sink_ratio: float = 10.0
    # Which heads of the injected layers are injected: null = all; a list of [layer, head] pairs (layers among
    # inject.layers); "auto" = the top_k_heads heads of a per-head profile (uzr.evaluate.heads). Other heads keep
    # their own attention exactly. Typed Any: null, a list or "auto".
    heads: Any = None
    top_k_heads: int = 8  # heads=auto: how many of the profiled heads are injected
    # The per-head profile (heads=auto): each (layer, head) injected alone on profile_items training prompts of
    # profile_qa (facts_qa and the attention-bound domains: their train split; causal_loop: items of another seed), with
    # profile_source (null = inject.source), ranked by the mean change of the right candidate's log-likelihood.
    profile_source: str | None = None
    profile_qa: str = "facts_qa"
    profile_items: int = 32
    # inject.source=emphasis: the marked keys' probabilities x emphasis_beta against the rest (bias mode, alpha 1).
    # emphasis_form=bias: + log beta on marked keys; pasta: - log beta on the prompt's non-marked keys (PASTA), so the
    # keys after the prompt (the answer) are not scaled down.
    emphasis_beta: float = 100.0
    emphasis_form: str = "bias"
    # Which spans of a prompt are up-weighted: marked = the passage (what a user would mark); evidence = the part of
    # the passage that holds the answer (kv_retrieval: the asked line), which tells the model where to look: a
    # positive control of steering, not a method.
    emphasis_span: str = "marked"
    # inject.source=teacher on QA only: the oracle's rows from this one teacher head of each mapped teacher layer, for
    # every student head, instead of the head mean (or the matched heads). null = off. Find a head that retrieves with
    # evaluate.qa_evidence_mass; held-out texts are not scored (their stored rows hold head means or matched heads).
    teacher_head: int | None = None


def validate_inject(spec: InjectSpec, student_layers: int, depth_note: str = "") -> None:
    injected_layers_valid(spec.layers, student_layers, depth_note)
    if spec.mode not in MODES:
        raise ValueError(f"inject.mode={spec.mode!r} is unknown; valid choices: {', '.join(MODES)}")
    t = spec.teacher_layers
    if not (t is None or t == AUTO or (isinstance(t, (list, tuple)) and all(isinstance(x, int) for x in t))):
        raise ValueError(f"inject.teacher_layers={t!r} is invalid; valid choices: a list of teacher layers (one per "
                         f"injected layer), null (proportional depth) or {AUTO!r}")
    if spec.sinks not in SINKS:
        raise ValueError(f"inject.sinks={spec.sinks!r} is unknown; valid choices: {', '.join(SINKS)}")
    if not math.isfinite(spec.sink_ratio) or spec.sink_ratio <= 1:
        raise ValueError(f"inject.sink_ratio={spec.sink_ratio} must be a finite number > 1 (times a key's uniform "
                         "share of a row's mass)")
    if spec.source not in SOURCES:
        raise ValueError(f"inject.source={spec.source!r} is unknown; valid choices: {', '.join(SOURCES)}")
    check_float("inject.emphasis_beta", spec.emphasis_beta, 1.0, valid="a finite number >= 1 (1: no emphasis)")
    check_choice("inject.emphasis_form", spec.emphasis_form, EMPHASIS_FORMS)
    check_choice("inject.emphasis_span", spec.emphasis_span, EMPHASIS_SPANS)
    if spec.teacher_head is not None and spec.source != "teacher":
        raise ValueError(f"inject.teacher_head={spec.teacher_head} needs inject.source=teacher (the oracle's rows from "
                         f"one teacher head), not {spec.source!r}; or set inject.teacher_head=null")


def validate_heads(spec: InjectSpec, num_heads: int) -> None:
    """``inject.heads`` (and the profile's knobs when ``auto``) against the injected layers and the student's
    ``num_heads`` (declared by its config, checked against the loaded model), before any model loads."""
    heads = spec.heads
    ranges = f"layers {list(spec.layers)} (inject.layers), heads 0..{num_heads - 1}"
    if heads is None:
        return
    if heads == AUTO:
        check_int("inject.top_k_heads", spec.top_k_heads, 1, len(spec.layers) * num_heads,
                  valid=f"an integer in [1, {len(spec.layers) * num_heads}] (the injected layers' heads)")
        source = profile_source(spec)
        check_choice("inject.profile_source", source, PROFILE_SOURCES)
        check_choice("inject.profile_qa", spec.profile_qa, (*PROFILE_SETS, *QA_DOMAINS))
        check_int("inject.profile_items", spec.profile_items, 1)
        return
    pairs = heads if isinstance(heads, (list, tuple)) else None
    if pairs is None or not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(is_int, p))
                                             for p in pairs):
        raise ValueError(f"inject.heads={heads!r} is invalid; valid: null (every head), {AUTO!r} (the top "
                         f"inject.top_k_heads of a per-head profile) or a non-empty list of [layer, head] pairs within "
                         f"{ranges}")
    bad = [list(p) for p in pairs if p[0] not in spec.layers or not 0 <= p[1] < num_heads]
    if bad:
        raise ValueError(f"inject.heads: {bad} outside the injected heads; valid: {ranges}")
    if len({tuple(p) for p in pairs}) != len(pairs):
        raise ValueError(f"inject.heads={[list(p) for p in pairs]} contains duplicates")


def profile_source(spec: InjectSpec) -> str:
    """The source a per-head profile injects: ``inject.profile_source``, else ``inject.source``."""
    return spec.profile_source or spec.source


def emphasis_alone(spec: InjectSpec) -> bool:
    """Whether the evaluate stage injects with neither controllers nor the harvest store: ``inject.source=emphasis``
    steers the student's own attention, unless ``inject.sinks=keep`` (sinks are found on the store's texts) or
    ``inject.heads=auto`` profiles another source."""
    profiled = spec.heads == AUTO and profile_source(spec) != "emphasis"
    return spec.source == "emphasis" and spec.sinks != "keep" and not profiled


def evaluate_unneeded(cfg) -> dict[str, str]:
    """The evaluate stage's ``unneeded_when`` (:mod:`uzr.stages`): the controller (and the harvest behind it) when
    :func:`emphasis_alone`."""
    if cfg.inject is None or not emphasis_alone(cfg.inject):
        return {}
    return {"controller": "inject.source=emphasis steers the student's own attention on QA prompts"}


def source_label(spec: InjectSpec, source: str | None = None) -> str:
    """``source`` (default ``inject.source``) as results and cache keys name it: emphasis with its strength, form and
    (unless ``marked``) spans (``emphasis(beta=100,form=bias)``), any other source by its name."""
    source = spec.source if source is None else source
    if source == "teacher" and spec.teacher_head is not None:
        return f"teacher(head={spec.teacher_head})"
    if source != "emphasis":
        return source
    span = "" if spec.emphasis_span == "marked" else f",span={spec.emphasis_span}"
    return f"emphasis(beta={spec.emphasis_beta:g},form={spec.emphasis_form}{span})"


def listed_heads(spec: InjectSpec) -> dict[int, tuple[int, ...]] | None:
    """``inject.heads`` as ``{layer: heads}`` when it lists pairs; None for null (every head) and ``auto``."""
    if spec.heads is None or spec.heads == AUTO:
        return None
    return heads_by_layer([tuple(p) for p in spec.heads])


def heads_by_layer(pairs) -> dict[int, tuple[int, ...]]:
    """``[(layer, head), ...]`` -> ``{layer: sorted heads}``."""
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(int(layer), []).append(int(head))
    return {layer: tuple(sorted(heads)) for layer, heads in sorted(out.items())}


def proportional_teacher_layer(cfg, layer: int) -> int:
    """The teacher layer at the same relative depth as student ``layer``. A pruned student's layer counts at the depth
    of its source layer (``student.kept_layers``): with the unpruned model as teacher, each layer maps to itself."""
    lt, ls = cfg.teacher.loaded_layers, cfg.student.num_layers  # the student at its source depth
    return round(cfg.student.kept_layers[layer] * (lt - 1) / max(ls - 1, 1))


def auto_teacher_layers(cfg) -> bool:
    """Whether the harvest chooses the teacher layers (``inject.teacher_layers=auto``)."""
    return cfg.inject is not None and cfg.inject.teacher_layers == AUTO


def teacher_layer_map(cfg) -> list[int]:
    """The teacher layer mapped to each injected student layer (a given or proportional map; with
    ``teacher_layers=auto`` the harvest store's ``layout.teacher_layers`` holds the map)."""
    if auto_teacher_layers(cfg):
        raise ValueError("inject.teacher_layers=auto: the map is chosen by the harvest (store layout.teacher_layers)")
    if cfg.inject.teacher_layers is not None:
        return list(cfg.inject.teacher_layers)
    return [proportional_teacher_layer(cfg, layer) for layer in cfg.inject.layers]


def validate_injection(cfg) -> None:
    """The inject group against the models' depths, and against the alpha and controller groups when read."""
    student = cfg.student
    pruned = (f" (student.prune.layers drops {len(student.prune.layers)} of its {student.num_layers}: inject.layers "
              "counts the pruned model's layers)") if student.prune.layers else ""
    validate_inject(cfg.inject, student.loaded_layers, pruned)
    validate_heads(cfg.inject, cfg.student.num_heads)
    mapping = [] if auto_teacher_layers(cfg) else teacher_layer_map(cfg)  # auto: chosen by the harvest
    if not auto_teacher_layers(cfg) and len(mapping) != len(cfg.inject.layers):
        raise ValueError(
            f"inject.teacher_layers={mapping} must have one teacher layer per injected layer "
            f"(inject.layers={cfg.inject.layers})"
        )
    if cfg.inject.teacher_head is not None:
        check_int("inject.teacher_head", cfg.inject.teacher_head, 0, cfg.teacher.num_heads - 1,
                  valid=f"a teacher head in [0, {cfg.teacher.num_heads - 1}] or null")
    bad = [t for t in mapping if not 0 <= t < cfg.teacher.loaded_layers]
    if bad:
        raise ValueError(
            f"inject.teacher_layers={mapping}: {bad} outside the teacher's layers 0..{cfg.teacher.loaded_layers - 1}"
        )
    if cfg.alpha is not None:
        for bad_layer in cfg.alpha.layer_weights:
            if bad_layer not in cfg.inject.layers:
                raise ValueError(f"alpha.layer_weights names layer {bad_layer}, not in inject.layers={cfg.inject.layers}")
    if cfg.controller is not None:
        c, h = cfg.controller, cfg.harvest
        if c.arch == "seed_mlp" and c.max_len < h.max_length:
            raise ValueError(
                f"controller.max_len={c.max_len} < harvest.max_length={h.max_length}: the seed_mlp "
                "controller only predicts up to max_len positions; raise controller.max_len"
            )


CONFIG_GROUPS = (
    ConfigGroup("inject", InjectSpec, validate_injection),
    ConfigGroup("alpha", AlphaSpec, lambda cfg: validate_alpha(cfg.alpha)),
)
