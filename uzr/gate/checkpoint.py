"""Gate weights on disk: safetensors + JSON metadata."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from uzr.cache import atomic_write, file_digest
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
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**dict(metadata or {}), "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "in_features": module.in_features, "feature_names": module.feature_names, "level": module.level,
            "layers": module.layers, "spec": dataclasses.asdict(module.spec), "baselines": module.baselines,
            "report": module.report()}
    json.dumps(meta, default=str)  # fail before writing anything
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
    tensors["pos_weight"] = module.pos_weight.detach().cpu().reshape(1)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": CHECKPOINT_FORMAT}))
    meta["weights_sha256"] = file_digest(out / WEIGHTS_FILE)

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)

    atomic_write(out / META_FILE, write_json)
    return out


def load_gate(folder: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> tuple[GateModule, dict]:
    """Rebuild a gate saved by :func:`save_gate` (safetensors, never pickle); ``expected`` fields (e.g.
    ``layers``, ``student``) must match the checkpoint. Returns (module in eval mode, metadata)."""
    d = Path(folder)
    wpath, mpath = d / WEIGHTS_FILE, d / META_FILE
    for p in (mpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"gate checkpoint incomplete: {p} is missing; train the gate (stages=[gate])")
    meta = json.loads(mpath.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{mpath} is not a uzr gate checkpoint of version {CHECKPOINT_VERSION}; retrain the gate")
    for key, value in (expected or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"gate checkpoint {d} does not match this run: {key}={meta.get(key)!r} in the checkpoint, "
                             f"{key}={value!r} now; retrain the gate for this configuration (stages=[gate])")
    if file_digest(wpath) != meta.get("weights_sha256"):
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath}: the weights are truncated or "
                         "modified; retrain the gate")
    tensors = load_file(wpath)
    module = GateModule(meta["in_features"], meta["spec"], meta["feature_names"], meta["level"], meta["layers"])
    module.pos_weight.fill_(float(tensors.pop("pos_weight")[0]))
    module.net.load_state_dict(tensors, strict=True)
    module.baselines = dict(meta.get("baselines") or {})
    module._report = dict(meta.get("report") or {})
    return module.eval(), meta
