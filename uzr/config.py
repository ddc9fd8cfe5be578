"""The run configuration: one structured schema over the Hydra config groups, validated up front.

``resolve_config(cfg)`` merges the composed Hydra config into :class:`RunConfig` (a typo'd key or a
wrongly typed value fails here, naming the key) and then checks ranges and cross-field constraints
(layer indices against the student's declared depth, the teacher-layer mapping against the teacher's)
— all before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uzr.controller import ControllerSpec
from uzr.controller import validate_spec as validate_controller_spec
from uzr.corpus import CorpusSpec, validate_corpus_spec
from uzr.gate import GateSpec, validate_gate_spec
from uzr.inject import MODES, AlphaSpec, injected_layers_valid, validate_alpha
from uzr.models import ModelSpec, validate_spec

STAGES = ("harvest", "controller", "gate", "evaluate")


@dataclass
class InjectSpec:
    """Which student layers get the teacher's habits, from which teacher layers, and how."""

    layers: list[int] = field(default_factory=lambda: [4])
    # Teacher layer mapped to each injected layer; None = proportional depth round(l * (Lt-1)/(Ls-1)).
    teacher_layers: list[int] | None = None
    mode: str = "bias"  # one of inject.MODES


@dataclass
class HarvestSpec:
    # Student layers stored (a superset of inject.layers, so a sweep over layers shares one store);
    # None = inject.layers.
    layers: list[int] | None = None
    max_length: int = 256  # student tokens per text (longer texts are truncated)
    # Head-mean distributions are stored for the leading min(S, this) positions only: they take S^2
    # per layer, everything else (statistics, hidden states) covers all S.
    max_dist_len: int = 512
    block_size: int = 256  # query rows per block in the statistics (memory grows linearly with S)
    locality_window: int = 8
    shard_size: int = 16  # texts per resumable shard
    max_bad_fraction: float = 0.05  # stop if more texts than this have non-finite attention scores
    devices: int = 1  # processes for Trainer.predict (accelerator from trainer.accelerator)
    strategy: str = "auto"  # e.g. ddp, ddp_spawn: each rank writes whole shards into one store


@dataclass
class EvaluateSpec:
    num_texts: int = 40  # held-out texts to evaluate (0 = all)
    figure: bool = True
    # Facts QA (uzr/facts_qa.py) on the held-out answerable prompts of the built-in set; the split and
    # prompt format are the gate's (gate.prompt_seed, gate.heldout_fraction, gate.prompt_format), so a
    # prompt-level gate never trains on a QA question.
    facts_qa: bool = True
    qa_prompts: int = 0  # held-out answerable prompts scored (0 = all)


@dataclass
class TrainerSpec:
    """Lightning Trainer options for the controller stage."""

    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 5


@dataclass
class LoggerSpec:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "uzr"
    group: str | None = None
    csv: bool = True


@dataclass
class RunConfig:
    teacher: ModelSpec
    student: ModelSpec
    data: CorpusSpec
    inject: InjectSpec
    alpha: AlphaSpec
    controller: ControllerSpec
    gate: GateSpec
    trainer: TrainerSpec
    logger: LoggerSpec
    harvest: HarvestSpec = field(default_factory=HarvestSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    name: str = "run"
    seed: int = 0
    device: str = "cpu"
    cache_dir: str = "~/.cache/uzr"


def proportional_teacher_layer(cfg: RunConfig, layer: int) -> int:
    lt, ls = cfg.teacher.num_layers, cfg.student.num_layers
    return round(layer * (lt - 1) / max(ls - 1, 1))


def teacher_layer_map(cfg: RunConfig) -> list[int]:
    """The teacher layer mapped to each injected student layer."""
    if cfg.inject.teacher_layers is not None:
        return list(cfg.inject.teacher_layers)
    return [proportional_teacher_layer(cfg, layer) for layer in cfg.inject.layers]


def harvest_layers(cfg: RunConfig) -> tuple[list[int], list[int]]:
    """Student layers the store holds and the teacher layer of each (injected layers use their mapping)."""
    mapping = dict(zip(cfg.inject.layers, teacher_layer_map(cfg)))
    layers = sorted(set(cfg.harvest.layers or []) | set(cfg.inject.layers))
    return layers, [mapping.get(layer, proportional_teacher_layer(cfg, layer)) for layer in layers]


def resolve_config(cfg: DictConfig) -> RunConfig:
    """Merge a composed Hydra config into the schema and validate it; raises ValueError on bad input."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid config: {err.msg} (key: {getattr(err, 'full_key', '?')})") from None
    run: RunConfig = OmegaConf.to_object(merged)
    validate(run)
    return run


def validate(cfg: RunConfig) -> None:
    validate_spec(cfg.teacher, "teacher")
    validate_spec(cfg.student, "student")
    validate_corpus_spec(cfg.data)
    validate_controller_spec(cfg.controller)
    validate_alpha(cfg.alpha)
    validate_gate_spec(cfg.gate)
    bad_stages = [s for s in cfg.stages if s not in STAGES]
    if bad_stages:
        raise ValueError(f"stages={cfg.stages}: unknown {bad_stages}; valid stages: {', '.join(STAGES)}")
    injected_layers_valid(cfg.inject.layers, cfg.student.num_layers)
    if cfg.inject.mode not in MODES:
        raise ValueError(f"inject.mode={cfg.inject.mode!r} is unknown; valid choices: {', '.join(MODES)}")
    mapping = teacher_layer_map(cfg)
    if len(mapping) != len(cfg.inject.layers):
        raise ValueError(
            f"inject.teacher_layers={mapping} must have one teacher layer per injected layer "
            f"(inject.layers={cfg.inject.layers})"
        )
    bad = [t for t in mapping if not 0 <= t < cfg.teacher.num_layers]
    if bad:
        raise ValueError(
            f"inject.teacher_layers={mapping}: {bad} outside the teacher's layers 0..{cfg.teacher.num_layers - 1}"
        )
    for bad_layer in cfg.alpha.layer_weights:
        if bad_layer not in cfg.inject.layers:
            raise ValueError(f"alpha.layer_weights names layer {bad_layer}, not in inject.layers={cfg.inject.layers}")
    h = cfg.harvest
    if h.layers is not None:
        bad = [layer for layer in h.layers if not 0 <= layer < cfg.student.num_layers]
        if bad:
            raise ValueError(f"harvest.layers={h.layers}: {bad} outside the student's layers 0..{cfg.student.num_layers - 1}")
    if h.max_length < 2:
        raise ValueError(f"harvest.max_length={h.max_length} must be >= 2 (a text needs a token to predict)")
    if h.max_dist_len < 2:
        raise ValueError(
            f"harvest.max_dist_len={h.max_dist_len} must be >= 2 (the stored distributions cover that many leading "
            "positions; one row attends only to itself); set harvest.max_dist_len=512 or more"
        )
    if h.block_size < 1 or h.locality_window < 1 or h.shard_size < 1:
        raise ValueError("harvest.block_size, harvest.locality_window and harvest.shard_size must be >= 1")
    if not (0 <= h.max_bad_fraction <= 1 and math.isfinite(h.max_bad_fraction)):
        raise ValueError(f"harvest.max_bad_fraction={h.max_bad_fraction} must be in [0, 1]")
    if cfg.controller.arch == "seed_mlp" and cfg.controller.max_len < h.max_length:
        raise ValueError(
            f"controller.max_len={cfg.controller.max_len} < harvest.max_length={h.max_length}: the seed_mlp "
            "controller only predicts up to max_len positions; raise controller.max_len"
        )
    if cfg.logger.wandb_mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.wandb_mode={cfg.logger.wandb_mode!r}; valid choices: offline, online, disabled")
    if cfg.evaluate.num_texts < 0:
        raise ValueError(f"evaluate.num_texts={cfg.evaluate.num_texts} must be >= 0 (0 = all held-out texts)")
    if cfg.evaluate.qa_prompts < 0:
        raise ValueError(f"evaluate.qa_prompts={cfg.evaluate.qa_prompts} must be >= 0 (0 = all held-out QA prompts)")
