"""Controller weights on disk: safetensors + JSON metadata."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.config.controller import ControllerSpec, coerce_spec
from uzr.controller.archs import Controller, build_controller
from uzr.controller.module import ControllerModule

CHECKPOINT_FORMAT = "uzr.controller"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "controller.safetensors"
META_FILE = "controller.json"


def _unpack(obj: Any) -> tuple[dict[str, Controller], ControllerSpec, int, int | None]:
    if isinstance(obj, ControllerModule):
        return dict(obj.controllers.items()), obj.spec, obj.hidden_size, obj.heads
    if isinstance(obj, (Mapping, nn.ModuleDict)):
        ctrls = {str(k): v for k, v in obj.items()}
        if not ctrls or not all(isinstance(c, Controller) for c in ctrls.values()):
            raise TypeError("save_controller expects a ControllerModule or a non-empty {layer: Controller} mapping")
        first = next(iter(ctrls.values()))
        if any(c.spec != first.spec or c.hidden_size != first.hidden_size or c.heads != first.heads
               for c in ctrls.values()):
            raise ValueError("all controllers saved together must share one spec, hidden size and number of heads")
        return ctrls, first.spec, first.hidden_size, first.heads
    raise TypeError(f"save_controller expects a ControllerModule or a {{layer: Controller}} mapping, got {type(obj)}")




def save_controller(module_or_controllers: ControllerModule | Mapping[str, Controller], path_dir: str | os.PathLike,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``controller.safetensors`` + ``controller.json`` into ``path_dir``, each atomically.

    ``metadata`` (JSON-serialisable; e.g. ``student``, cache key, harvest key) is stored beside the
    framework's own fields: ``hidden_size``, ``layers``, ``spec``, format version and the weights'
    sha256 (so a half-written or modified pair is detected on load). Returns ``path_dir``.
    """
    controllers, spec, hidden_size, heads = _unpack(module_or_controllers)
    layers = sorted(int(k) for k in controllers)
    # heads: None for head-mean controllers, the student's head count for per-head ones
    own = {"hidden_size": hidden_size, "layers": layers, "spec": dataclasses.asdict(spec), "heads": heads}
    meta = dict(metadata or {})
    for key, value in own.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata[{key!r}]={meta[key]!r} contradicts the controllers' {key}={value!r}")
    meta = {"student": None, **meta, **own}
    tensors = {f"{key}.{name}": t for key, ctrl in controllers.items() for name, t in ctrl.state_dict().items()}
    return save_checkpoint(path_dir, WEIGHTS_FILE, META_FILE, tensors, meta, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def _rebuild_hint(d: Path) -> str:
    return (f"delete {d} and run again with 'controller' in stages=[...] to retrain it, "
            f"or restore the checkpoint from a trusted copy")


def load_controller(path_dir: str | os.PathLike, expected: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Controller], dict[str, Any]]:
    """Rebuild controllers saved by :func:`save_controller` (weights via safetensors, never pickle).

    ``expected``: fields the current run requires (``student``, ``hidden_size``, ``layers``, or any
    other metadata key); a mismatch raises ValueError naming the field and both values.
    Returns ``({str(layer): Controller in eval mode}, metadata)``.
    """
    d = Path(path_dir)
    tensors, meta = load_checkpoint(d, WEIGHTS_FILE, META_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, expected,
                                    _rebuild_hint(d))
    wpath, mpath = d / WEIGHTS_FILE, d / META_FILE
    spec = coerce_spec(meta["spec"])
    controllers: dict[str, Controller] = {}
    for layer in meta["layers"]:
        key = str(layer)
        ctrl = build_controller(spec, meta["hidden_size"], meta.get("heads"))
        state = {name[len(key) + 1 :]: t for name, t in tensors.items() if name.startswith(key + ".")}
        try:
            ctrl.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wpath} does not fit the architecture in {mpath} (layer {key}): {e}") from e
        controllers[key] = ctrl.eval()
    return controllers, meta
