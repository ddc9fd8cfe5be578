"""The config schema: plain dataclasses, one per Hydra config group, and their validation.

Importing this package never imports torch, so a bad config fails in a second, before any model
loads: ``python -c "import uzr.config, sys; assert 'torch' not in sys.modules"``.
"""

from uzr.config.controller import ARCHS, LOCALITY_WINDOW, ControllerSpec, coerce_spec
from uzr.config.corpus import CorpusSpec, validate_corpus_spec
from uzr.config.dominance import DominanceSpec, validate_dominance
from uzr.config.evaluate import EvaluateSpec
from uzr.config.gate import FEATURES, LABELS, POOLS, GateSpec, coerce_gate_spec, validate_gate_spec
from uzr.config.groups import ConfigGroup
from uzr.config.harvest import HarvestSpec, harvest_layers
from uzr.config.inject import (
    MODES,
    SCHEDULES,
    AlphaSpec,
    InjectSpec,
    proportional_teacher_layer,
    teacher_layer_map,
    validate_alpha,
    validate_inject,
)
from uzr.config.model import ModelSpec, as_spec, validate_spec
from uzr.config.platform import LoggerSpec, PathsSpec, TrainerSpec, resolve_cache_dir
from uzr.config.run import CONF_DIR, RunConfig, register_configs, resolve_config, validate

__all__ = [
    "ARCHS", "CONF_DIR", "FEATURES", "LABELS", "LOCALITY_WINDOW", "MODES", "POOLS", "SCHEDULES",
    "AlphaSpec", "ConfigGroup", "ControllerSpec", "CorpusSpec", "DominanceSpec", "EvaluateSpec", "GateSpec",
    "HarvestSpec", "InjectSpec", "LoggerSpec", "ModelSpec", "PathsSpec", "RunConfig", "TrainerSpec",
    "as_spec", "coerce_gate_spec", "coerce_spec", "harvest_layers", "proportional_teacher_layer", "register_configs",
    "resolve_cache_dir", "resolve_config", "teacher_layer_map", "validate", "validate_alpha",
    "validate_corpus_spec", "validate_dominance", "validate_gate_spec", "validate_inject", "validate_spec",
]
