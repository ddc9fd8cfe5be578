"""The ``harvest`` config group: which student layers are stored, how long the texts are, how statistics are
blocked (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from uzr.config.controller import LOCALITY_WINDOW
from uzr.config.groups import ConfigGroup
from uzr.config.inject import auto_teacher_layers, proportional_teacher_layer, teacher_layer_map
from uzr.config.keys import KEYED_UNLESS_DEFAULT, NOT_KEYED

HEAD_MATCHING = ("attention", "output", "effect")  # harvest.head_matching


@dataclass
class HarvestSpec:
    # Student layers stored (a superset of inject.layers, so a sweep over layers shares one store);
    # None = inject.layers. Not keyed as given: the store's key holds the effective set (harvest_layers).
    layers: list[int] | None = field(default=None, metadata=NOT_KEYED)
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
    # effect = by the student's loss change when one teacher head's rows replace one student head's (any pair of
    # models; uzr/harvest/effect_matching.py). Keyed unless the default: stores keep the keys they had before.
    head_matching: str = field(default="attention", metadata=KEYED_UNLESS_DEFAULT)
    # head_matching=effect: training texts measured. Cost: per text 1 + layers x student heads passes of a batch of
    # H_t copies of its leading max_dist_len tokens; the LM head over Gemma's 262k tokens dominates (positive
    # control, 3 layers x 4 heads: 8 x 13 passes of 4 x <= 128 tokens, ~500 s wall, ~430 CPU s on one thread of the
    # 2-core CPU: more than the harvest itself; halve it with effect_texts=4, not measured).
    effect_texts: int = field(default=8, metadata=KEYED_UNLESS_DEFAULT)
    devices: int = 1  # processes for Trainer.predict (accelerator from trainer.accelerator)
    strategy: str = "auto"  # e.g. ddp, ddp_spawn: each rank writes whole shards into one store


def harvest_layers(cfg) -> tuple[list[int], list[int] | None]:
    """Student layers the store holds and the teacher layer of each (injected layers use their mapping);
    None for the teacher layers when the harvest chooses them (``inject.teacher_layers=auto``)."""
    injected = cfg.inject.layers if cfg.inject is not None else []
    if auto_teacher_layers(cfg):
        return sorted(set(cfg.harvest.layers or []) | set(injected)), None
    mapping = dict(zip(injected, teacher_layer_map(cfg))) if injected else {}
    layers = sorted(set(cfg.harvest.layers or []) | set(injected))
    return layers, [mapping.get(layer, proportional_teacher_layer(cfg, layer)) for layer in layers]


def validate_harvest(cfg) -> None:
    h = cfg.harvest
    if h.layers is None and cfg.inject is None:
        raise ValueError("the harvest stores hidden states of chosen student layers: set harvest.layers=[...] "
                         "or select an inject group (inject.layers)")
    if h.layers is not None:
        depth = cfg.student.loaded_layers  # after student.prune
        bad = [layer for layer in h.layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"harvest.layers={h.layers}: {bad} outside the student's layers 0..{depth - 1}")
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
    if h.effect_texts < 1:
        raise ValueError(f"harvest.effect_texts={h.effect_texts} must be >= 1 (training texts that measure each "
                         "head pair's effect for harvest.head_matching=effect)")
    if h.block_size < 1 or h.locality_window < 1 or h.shard_size < 1:
        raise ValueError("harvest.block_size, harvest.locality_window and harvest.shard_size must be >= 1")
    if not (0 <= h.max_bad_fraction <= 1 and math.isfinite(h.max_bad_fraction)):
        raise ValueError(f"harvest.max_bad_fraction={h.max_bad_fraction} must be in [0, 1]")


CONFIG_GROUPS = (ConfigGroup("harvest", HarvestSpec, validate_harvest, always=True),)
