"""The run configuration: one schema over the Hydra config groups, validated up front.

``resolve_config(cfg)`` merges the composed Hydra config into :class:`RunConfig` (a typo'd key or a
wrongly typed value fails here, naming the key), then validates only what the selected stages read
(:mod:`uzr.stages`): each group's ranges and choices, and the cross-group constraints (layer indices
against the student's declared depth, the teacher-layer mapping against the teacher's) — all before
any model is loaded. Every default lives in the dataclasses below; the YAML files under ``conf/``
hold only what differs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uzr.config.controller import LOCALITY_WINDOW, ControllerSpec
from uzr.config.controller import validate_spec as validate_controller
from uzr.config.corpus import CorpusSpec, domain_spec, validate_corpus_spec
from uzr.config.dominance import DominanceSpec, extra_stages, validate_dominance
from uzr.config.gate import GateSpec, validate_gate_spec
from uzr.config.inject import AUTO, AlphaSpec, InjectSpec, validate_alpha, validate_inject
from uzr.config.lru_mla import LRUMLASpec, validate_lru_mla
from uzr.config.model import ModelSpec
from uzr.config.model import validate_spec as validate_model
from uzr.config.svf import SVFSpec, svf_extra_stages, validate_distill, validate_svf, validate_svf_injection
from uzr.stages import REGISTRY, groups_read, unknown_stages

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Stages of the folded-in systems (DESIGN.md §9): selected by their experiments (stages=[...]), not by default.
HEAD_MATCHING = ("attention", "output")  # harvest.head_matching
QA_DOMAINS = ("causal_loop",)  # evaluate.qa_domains (uzr/evaluate/qa_domains.py)
SYSTEM_STAGES = ("dominance", "svf", "svf_baselines", "svf_eval", "lru_mla")


@dataclass
class HarvestSpec:
    # Student layers stored (a superset of inject.layers, so a sweep over layers shares one store);
    # None = inject.layers.
    layers: list[int] | None = None
    max_length: int = 256  # student tokens per text (longer texts are truncated)
    # Head-mean distributions are stored for the leading min(S, this) positions only: they take S^2
    # per layer, everything else (statistics, hidden states) covers all S.
    max_dist_len: int = 512
    # Query rows per block in the statistics (memory grows linearly with S); 64 was the fastest of 32-512 at
    # S = 1024 and 4096 in benchmarks/harvest.py (see its README), 256 was 9% slower at 4096.
    block_size: int = 64
    locality_window: int = LOCALITY_WINDOW  # keys with i - j < window count as local (DESIGN.md §4)
    shard_size: int = 16  # texts per resumable shard
    max_bad_fraction: float = 0.05  # stop if more texts than this have non-finite attention scores
    # Per-head targets (controller.target=per_head): attention = teacher heads matched to student heads by attention
    # similarity (mean row KL, Hungarian or nearest); output = by output slot (o_proj/v_proj weights: a damaged
    # copy of the teacher, whose permuted heads attention matching cannot repair). uzr/harvest/head_matching.py
    head_matching: str = "attention"
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
    # Prompts per facts-QA forward pass (each brings its 4 candidates): larger amortises per-call overhead,
    # smaller bounds memory; the scores agree to float rounding for any value. 32 took the least CPU time
    # for SmolLM2-135M on the 93 held-out prompts (8: +37%, 16: +11-16%, 93: +5%; benchmarks/pipeline.py).
    qa_batch_size: int = 32
    # More text domains for bits per byte (conf/data options, e.g. [korean, licenses]), each harvested as its own
    # store (evaluate.num_texts texts) and reported with its own paired interval beside the run's data.
    domains: list[str] = field(default_factory=list)
    # Checkable QA domains scored like facts QA (teacher, student, injected student; 4 candidates, the right one by
    # summed log-likelihood; paired interval of injected minus student): causal_loop = uzr.tasks.causal_loop items
    # (levels 1-4, 2-4 variables, at most 3 rounds) whose 3 wrong candidates each move one variable's value
    # (uzr/evaluate/qa_domains.py). [] = none: the default experiment is at its time budget.
    qa_domains: list[str] = field(default_factory=list)
    qa_domain_items: int = 64  # items per QA domain
    qa_domain_seed: int = 0  # generator seed of the QA domains' items


@dataclass
class TrainerSpec:
    """Lightning Trainer options for the training stages (and the harvest's accelerator)."""

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
class PathsSpec:
    # Shared artifact cache (harvest stores, controllers, gates, converted models), reused across runs
    # and sweeps. None: $UZR_CACHE if set, else .cache/uzr under the directory you launch from.
    cache_dir: str | None = None


def resolve_cache_dir(value: str | None = None) -> Path:
    """The artifact cache folder: ``value``, else ``$UZR_CACHE``, else ``./.cache/uzr``."""
    value = value or os.environ.get("UZR_CACHE")
    return Path(value).expanduser() if value else Path.cwd() / ".cache" / "uzr"


@dataclass
class RunConfig:
    """One run. Groups a run's stages do not read may be absent (None)."""

    teacher: ModelSpec | None = None
    student: ModelSpec | None = None
    data: CorpusSpec | None = None
    inject: InjectSpec | None = None
    alpha: AlphaSpec | None = None
    controller: ControllerSpec | None = None
    gate: GateSpec | None = None
    dominance: DominanceSpec | None = None
    svf: SVFSpec | None = None
    lru_mla: LRUMLASpec | None = None
    harvest: HarvestSpec = field(default_factory=HarvestSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    logger: LoggerSpec = field(default_factory=LoggerSpec)
    paths: PathsSpec = field(default_factory=PathsSpec)
    stages: list[str] = field(default_factory=lambda: [s for s in REGISTRY if s not in SYSTEM_STAGES])
    name: str = "run"
    seed: int = 0
    device: str = "cpu"
    # torch intra-op threads for the run (null: torch's default, one per core). On a CPU machine shared with
    # other jobs, 1 avoids threads waiting for each other: the smoke run took 35 s with 1 and 107 s with 2
    # on the 2-core machine at load average ~6 (README, Performance).
    threads: int | None = None

    @property
    def cache_dir(self) -> Path:
        return resolve_cache_dir(self.paths.cache_dir)


def proportional_teacher_layer(cfg: RunConfig, layer: int) -> int:
    lt, ls = cfg.teacher.num_layers, cfg.student.num_layers
    return round(layer * (lt - 1) / max(ls - 1, 1))


def auto_teacher_layers(cfg: RunConfig) -> bool:
    """Whether the harvest chooses the teacher layers (``inject.teacher_layers=auto``)."""
    return cfg.inject is not None and cfg.inject.teacher_layers == AUTO


def teacher_layer_map(cfg: RunConfig) -> list[int]:
    """The teacher layer mapped to each injected student layer (a given or proportional map; with
    ``teacher_layers=auto`` the harvest store's ``layout.teacher_layers`` holds the map)."""
    if auto_teacher_layers(cfg):
        raise ValueError("inject.teacher_layers=auto: the map is chosen by the harvest (store layout.teacher_layers)")
    if cfg.inject.teacher_layers is not None:
        return list(cfg.inject.teacher_layers)
    return [proportional_teacher_layer(cfg, layer) for layer in cfg.inject.layers]


def harvest_layers(cfg: RunConfig) -> tuple[list[int], list[int] | None]:
    """Student layers the store holds and the teacher layer of each (injected layers use their mapping);
    None for the teacher layers when the harvest chooses them (``inject.teacher_layers=auto``)."""
    injected = cfg.inject.layers if cfg.inject is not None else []
    if auto_teacher_layers(cfg):
        return sorted(set(cfg.harvest.layers or []) | set(injected)), None
    mapping = dict(zip(injected, teacher_layer_map(cfg))) if injected else {}
    layers = sorted(set(cfg.harvest.layers or []) | set(injected))
    return layers, [mapping.get(layer, proportional_teacher_layer(cfg, layer)) for layer in layers]



def per_head_targets(cfg: RunConfig) -> bool:
    """Whether the run's targets are per head (``controller.target=per_head``; a harvest-only run without a
    controller group keeps head-mean rows)."""
    return cfg.controller is not None and cfg.controller.target == "per_head"

def register_configs() -> None:
    """Register the schema as ``run_schema`` (the first default of ``conf/train.yaml``), so a composed
    config carries every default and a typo'd key fails at composition."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def resolve_config(cfg: DictConfig) -> RunConfig:
    """Merge a composed Hydra config into the schema and validate it; raises ValueError on bad input."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        run: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid config: {err.msg} (key: {getattr(err, 'full_key', '?')})") from None
    validate(run)
    return run


def group_options(group: str) -> list[str]:
    """The options of a config group in ``conf/`` (for error messages)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate(cfg: RunConfig) -> None:
    """Validate the groups the selected stages read, and the constraints between them."""
    bad = unknown_stages(cfg.stages)
    if bad:
        raise ValueError(f"stages={cfg.stages}: unknown {bad}; valid stages: {', '.join(REGISTRY)}")
    extra = [*extra_stages(cfg), *svf_extra_stages(cfg)]  # stages a selected stage needs only for some settings
    stages = [*cfg.stages, *extra]
    required, optional = groups_read(stages)
    for group in sorted(required):
        if getattr(cfg, group) is None:
            readers = [s.name for s in REGISTRY.values() if group in s.reads and s.name in stages]
            options = ", ".join(group_options(group)) or "see conf/"
            why = (" (dominance.models includes 'injected', which needs the controller; or drop 'injected')"
                   if set(readers) & set(extra_stages(cfg)) else
                   " (svf.injection=true scores the attention-injected student, which needs the controller)"
                   if set(readers) & set(svf_extra_stages(cfg)) else "")
            raise ValueError(f"stages {readers or cfg.stages} read the '{group}' config group, which this config "
                             f"lacks; add {group}=<option> (options: {options}) or drop those stages{why}")
    groups = required | {g for g in optional if getattr(cfg, g) is not None}
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads={cfg.threads} must be >= 1 (torch intra-op threads), or null for torch's default")
    if cfg.logger.wandb_mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.wandb_mode={cfg.logger.wandb_mode!r}; valid choices: offline, online, disabled")
    for role in ("teacher", "student"):
        if role in groups:
            validate_model(getattr(cfg, role), role)
    if "data" in groups:
        validate_corpus_spec(cfg.data)
    if "controller" in groups:
        _follow_harvest_window(cfg.controller, cfg.harvest)
        validate_controller(cfg.controller)
    if "alpha" in groups:
        validate_alpha(cfg.alpha)
    if "gate" in groups:
        validate_gate_spec(cfg.gate)
    if "inject" in groups:
        _validate_injection(cfg, groups)
    if "harvest" in groups:
        _validate_harvest(cfg)
    if "evaluate" in groups:
        _validate_evaluate(cfg.evaluate)
        if cfg.data is not None and cfg.data.name in cfg.evaluate.domains:
            raise ValueError(f"evaluate.domains={cfg.evaluate.domains} names the run's own data ({cfg.data.name!r}), "
                             "which is evaluated anyway; drop it from evaluate.domains")
    if "dominance" in groups:
        validate_dominance(cfg)
    if "svf" in groups:
        student = cfg.student if "student" in groups else None
        validate_svf(cfg.svf, student and student.name, student and student.num_layers)
        validate_distill(cfg.svf, cfg.teacher if "teacher" in groups else None, student)
        validate_svf_injection(cfg)
    if "lru_mla" in groups:
        validate_lru_mla(cfg.lru_mla)


def _validate_injection(cfg: RunConfig, groups: set[str]) -> None:
    validate_inject(cfg.inject, cfg.student.num_layers)
    mapping = [] if auto_teacher_layers(cfg) else teacher_layer_map(cfg)  # auto: chosen by the harvest
    if not auto_teacher_layers(cfg) and len(mapping) != len(cfg.inject.layers):
        raise ValueError(
            f"inject.teacher_layers={mapping} must have one teacher layer per injected layer "
            f"(inject.layers={cfg.inject.layers})"
        )
    bad = [t for t in mapping if not 0 <= t < cfg.teacher.num_layers]
    if bad:
        raise ValueError(
            f"inject.teacher_layers={mapping}: {bad} outside the teacher's layers 0..{cfg.teacher.num_layers - 1}"
        )
    if "alpha" in groups:
        for bad_layer in cfg.alpha.layer_weights:
            if bad_layer not in cfg.inject.layers:
                raise ValueError(f"alpha.layer_weights names layer {bad_layer}, not in inject.layers={cfg.inject.layers}")
    if "controller" in groups:
        c, h = cfg.controller, cfg.harvest
        if c.arch == "seed_mlp" and c.max_len < h.max_length:
            raise ValueError(
                f"controller.max_len={c.max_len} < harvest.max_length={h.max_length}: the seed_mlp "
                "controller only predicts up to max_len positions; raise controller.max_len"
            )


def _follow_harvest_window(c: ControllerSpec, h: HarvestSpec) -> None:
    """One locality window for the harvest's statistics and the controller's loss."""
    if c.locality_window is None:
        c.locality_window = h.locality_window
    elif c.locality_window != h.locality_window:
        raise ValueError(
            f"controller.locality_window={c.locality_window} differs from harvest.locality_window="
            f"{h.locality_window}: the controller's locality loss would measure another habit than the store "
            "holds; set only harvest.locality_window (the controller follows it)")


def _validate_harvest(cfg: RunConfig) -> None:
    h = cfg.harvest
    if h.layers is None and cfg.inject is None:
        raise ValueError("the harvest stores hidden states of chosen student layers: set harvest.layers=[...] "
                         "or select an inject group (inject.layers)")
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
    if h.head_matching not in HEAD_MATCHING:
        raise ValueError(f"harvest.head_matching={h.head_matching!r} is unknown; valid choices: {', '.join(HEAD_MATCHING)}")
    if h.head_matching == "output" and cfg.teacher is not None and cfg.student is not None and (
            (cfg.teacher.hidden_size, cfg.teacher.num_heads) != (cfg.student.hidden_size, cfg.student.num_heads)):
        raise ValueError(f"harvest.head_matching=output needs one attention shape on both sides (teacher hidden "
                         f"{cfg.teacher.hidden_size} x {cfg.teacher.num_heads} heads, student {cfg.student.hidden_size} "
                         f"x {cfg.student.num_heads}): use harvest.head_matching=attention")
    if h.block_size < 1 or h.locality_window < 1 or h.shard_size < 1:
        raise ValueError("harvest.block_size, harvest.locality_window and harvest.shard_size must be >= 1")
    if not (0 <= h.max_bad_fraction <= 1 and math.isfinite(h.max_bad_fraction)):
        raise ValueError(f"harvest.max_bad_fraction={h.max_bad_fraction} must be in [0, 1]")


def _validate_evaluate(ev: EvaluateSpec) -> None:
    if ev.num_texts < 0:
        raise ValueError(f"evaluate.num_texts={ev.num_texts} must be >= 0 (0 = all held-out texts)")
    if ev.qa_prompts < 0:
        raise ValueError(f"evaluate.qa_prompts={ev.qa_prompts} must be >= 0 (0 = all held-out QA prompts)")
    if ev.qa_batch_size < 1:
        raise ValueError(f"evaluate.qa_batch_size={ev.qa_batch_size} must be >= 1 (prompts per facts-QA batch)")
    unknown = [d for d in ev.qa_domains if d not in QA_DOMAINS]
    if unknown or len(set(ev.qa_domains)) != len(ev.qa_domains):
        raise ValueError(f"evaluate.qa_domains={list(ev.qa_domains)} is invalid (unknown: {unknown}); valid: distinct "
                         f"names from {', '.join(QA_DOMAINS)}, or [] for none")
    if isinstance(ev.qa_domain_items, bool) or not isinstance(ev.qa_domain_items, int) or ev.qa_domain_items < 1:
        raise ValueError(f"evaluate.qa_domain_items={ev.qa_domain_items!r} is invalid; valid: an integer >= 1")
    if isinstance(ev.qa_domain_seed, bool) or not isinstance(ev.qa_domain_seed, int) or ev.qa_domain_seed < 0:
        raise ValueError(f"evaluate.qa_domain_seed={ev.qa_domain_seed!r} is invalid; valid: an integer >= 0")
    if len(set(ev.domains)) != len(ev.domains):
        raise ValueError(f"evaluate.domains={ev.domains} names a domain twice")
    for name in ev.domains:
        domain_spec(name)
