"""The ``dominance`` config group: attention dominance (MDI / AEI) of teacher, student and injected student
on two token groups (torch-free; DESIGN.md §9, README "Attention dominance")."""

from __future__ import annotations

from dataclasses import dataclass, field

from uzr.config.groups import ConfigGroup

SOURCES = ("text", "mmmu_pro", "synthetic")  # text: instruction/passage prompts; the others: images
VISION_SOURCES = ("mmmu_pro", "synthetic")
QUERIES = ("generated", "prompt")
ROLES = ("teacher", "student", "injected")
TEXT_SPLITS = ("instruction_passage", "prompt_answer")
VISION_SPLITS = ("text_image",)
STAGE_NAMES = ("early", "middle", "late")


@dataclass
class DominanceSpec:
    source: str = "text"
    # Models measured: a config role, or "injected" (the student with the controller injected at the
    # inject/alpha settings; needs the inject, alpha and controller groups and builds the controller).
    models: list[str] = field(default_factory=lambda: ["teacher", "student", "injected"])
    splits: list[str] | None = None  # null: every split of the source (text: both; vision: text_image)
    queries: str = "generated"  # generated: the answer's tokens (the paper); prompt: the prompt's T tokens
    max_new_tokens: int = 24  # greedy answer length bound
    num_samples: int = 24
    # Stages: explicit layer lists (negative = from the end) or, when null, stage_width layers each:
    # the first, the middle ones and the last.
    stage_width: int = 2
    early: list[int] | None = None
    middle: list[int] | None = None
    late: list[int] | None = None
    bootstrap: int = 2000  # resamples of the 95% intervals (plain and paired)
    seed: int = 0  # sample choice and bootstrap
    figure: bool = True
    # text source: passages are the held-out texts of the data group, cut at this many characters
    max_passage_chars: int = 600
    # vision sources
    hub_id: str = "MMMU/MMMU_Pro"
    hub_config: str = "vision"
    hub_split: str = "test"
    prompt: str = "Answer with the option's letter from the given choices directly."
    image_size: int = 336  # synthetic images (pixels per side)
    anchor: str | None = None  # published row to compare with: llava_1_5_7b (Table 1, MMMU-Pro), or null


def splits_of(spec: DominanceSpec) -> list[str]:
    if spec.splits is not None:
        return list(spec.splits)
    return list(VISION_SPLITS if spec.source in VISION_SOURCES else TEXT_SPLITS)


def injects(spec: DominanceSpec | None) -> bool:
    return spec is not None and "injected" in spec.models


def injection_needs(cfg) -> dict[str, str]:
    """The dominance stage's needs that depend on settings: the controller when it measures the injected student."""
    if not injects(cfg.dominance):
        return {}
    return {"controller": "dominance.models includes 'injected', which needs the controller; or drop 'injected'"}


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"dominance.{key}={value!r} is invalid: expected one of {list(choices)}")


def validate_dominance(cfg) -> None:
    """Check the group and what it needs from the others (model depths, injection groups)."""
    d: DominanceSpec = cfg.dominance
    _choice("source", d.source, SOURCES)
    _choice("queries", d.queries, QUERIES)
    if not d.models:
        raise ValueError(f"dominance.models is empty: list some of {list(ROLES)}")
    for role in d.models:
        _choice("models[]", role, ROLES)
    if len(set(d.models)) != len(d.models):
        raise ValueError(f"dominance.models={d.models} lists a model twice")
    valid_splits = VISION_SPLITS if d.source in VISION_SOURCES else TEXT_SPLITS
    for split in splits_of(d):
        _choice("splits[]", split, valid_splits)
    if not splits_of(d):
        raise ValueError(f"dominance.splits is empty: list some of {list(valid_splits)} or set null")
    for key in ("num_samples", "stage_width", "bootstrap", "max_passage_chars", "image_size"):
        if getattr(d, key) < 1:
            raise ValueError(f"dominance.{key}={getattr(d, key)} must be >= 1")
    if d.max_new_tokens < 1:
        raise ValueError(f"dominance.max_new_tokens={d.max_new_tokens} must be >= 1 (answers are generated "
                         "for the answer queries and the prompt_answer split)")
    if d.anchor not in (None, "llava_1_5_7b"):
        raise ValueError(f"dominance.anchor={d.anchor!r} is invalid: expected null or 'llava_1_5_7b'")
    if injects(d):
        missing = [g for g in ("inject", "alpha", "controller") if getattr(cfg, g) is None]
        if missing:
            raise ValueError(f"dominance.models includes 'injected', which needs the {', '.join(missing)} config "
                             "group(s); add them (e.g. inject=default alpha=constant controller=bilinear) or drop "
                             "'injected' from dominance.models")
        if cfg.inject.mode != "bias":
            raise ValueError(f"inject.mode={cfg.inject.mode!r}: dominance measures the attention probabilities the "
                             "recorder sees, which in mix mode leave out the mixed-in controller share; use "
                             "inject.mode=bias or drop 'injected' from dominance.models")
    if d.source in VISION_SOURCES and injects(d):
        raise ValueError(f"dominance.source={d.source} measures vision-language models; uzr has no controller for "
                         "them: drop 'injected' from dominance.models")
    for role in dict.fromkeys("student" if r == "injected" else r for r in d.models):
        spec = getattr(cfg, role)
        if spec is None:
            raise ValueError(f"dominance.models includes '{role}' but the config has no {role} group; add "
                             f"{role}=<option>")
        if d.source in VISION_SOURCES and (spec.source == "gguf_package" or
                                           (spec.source == "tiny" and spec.architecture != "llava")):
            raise ValueError(f"dominance.source={d.source} needs a vision-language {role}, but {role}={spec.name} is a "
                             f"text model; use {role}=llava_1_5_7b, qwen2_5_vl_7b or tiny_llava")
        _validate_stages(d, spec.loaded_layers, role)


def _validate_stages(d: DominanceSpec, num_layers: int, role: str) -> None:
    if d.stage_width > num_layers:
        raise ValueError(f"dominance.stage_width={d.stage_width} exceeds the {role}'s {num_layers} layers")
    for stage in STAGE_NAMES:
        layers = getattr(d, stage)
        if layers is None:
            continue
        if not layers:
            raise ValueError(f"dominance.{stage}=[] is empty: list layers or set null (stage_width layers)")
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"dominance.{stage}={layers}: {bad} outside the {role}'s layers "
                             f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end)")


CONFIG_GROUPS = (ConfigGroup("dominance", DominanceSpec, validate_dominance),)
