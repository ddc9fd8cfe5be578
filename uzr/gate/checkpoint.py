"""Gate weights on disk: safetensors + JSON metadata."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.gate.model import GateModule

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "uzr.gate"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "gate.safetensors"
META_FILE = "gate.json"


def save_gate(module: GateModule, folder: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``gate.safetensors`` (weights + normalisation) and ``gate.json`` (spec, feature names,
    level, layers, baselines, report, caller metadata, weights sha256), each atomically."""
    meta = {**dict(metadata or {}), "in_features": module.in_features, "feature_names": module.feature_names,
            "level": module.level, "layers": module.layers, "spec": dataclasses.asdict(module.spec),
            "baselines": module.baselines, "report": module.report()}
    tensors = {**module.net.state_dict(), "pos_weight": module.pos_weight.reshape(1)}
    return save_checkpoint(folder, WEIGHTS_FILE, META_FILE, tensors, meta, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def load_gate(folder: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> tuple[GateModule, dict]:
    """Rebuild a gate saved by :func:`save_gate` (safetensors, never pickle); ``expected`` fields (e.g.
    ``layers``, ``student``) must match the checkpoint. Returns (module in eval mode, metadata)."""
    d = Path(folder)
    tensors, meta = load_checkpoint(
        d, WEIGHTS_FILE, META_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, expected,
        f"delete {d} and run again with 'gate' in stages=[...] to retrain it, or restore the checkpoint from a "
        "trusted copy")
    module = GateModule(meta["in_features"], meta["spec"], meta["feature_names"], meta["level"], meta["layers"])
    module.pos_weight.fill_(float(tensors.pop("pos_weight")[0]))
    module.net.load_state_dict(tensors, strict=True)
    module.baselines = dict(meta.get("baselines") or {})
    module._report = dict(meta.get("report") or {})
    return module.eval(), meta
