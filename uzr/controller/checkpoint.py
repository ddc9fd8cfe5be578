"""Controller weights on disk: safetensors + JSON metadata."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from uzr.cache import atomic_write, file_digest
from uzr.config.controller import ControllerSpec, coerce_spec
from uzr.controller.archs import Controller, build_controller
from uzr.controller.module import ControllerModule

CHECKPOINT_FORMAT = "uzr.controller"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "controller.safetensors"
META_FILE = "controller.json"


def _unpack(obj: Any) -> tuple[dict[str, Controller], ControllerSpec, int]:
    if isinstance(obj, ControllerModule):
        return dict(obj.controllers.items()), obj.spec, obj.hidden_size
    if isinstance(obj, (Mapping, nn.ModuleDict)):
        ctrls = {str(k): v for k, v in obj.items()}
        if not ctrls or not all(isinstance(c, Controller) for c in ctrls.values()):
            raise TypeError("save_controller expects a ControllerModule or a non-empty {layer: Controller} mapping")
        first = next(iter(ctrls.values()))
        if any(c.spec != first.spec or c.hidden_size != first.hidden_size for c in ctrls.values()):
            raise ValueError("all controllers saved together must share one spec and hidden size")
        return ctrls, first.spec, first.hidden_size
    raise TypeError(f"save_controller expects a ControllerModule or a {{layer: Controller}} mapping, got {type(obj)}")




def save_controller(module_or_controllers: ControllerModule | Mapping[str, Controller], path_dir: str | os.PathLike,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``controller.safetensors`` + ``controller.json`` into ``path_dir``, each atomically.

    ``metadata`` (JSON-serialisable; e.g. ``student``, cache key, harvest key) is stored beside the
    framework's own fields: ``hidden_size``, ``layers``, ``spec``, format version and the weights'
    sha256 (so a half-written or modified pair is detected on load). Returns ``path_dir``.
    """
    controllers, spec, hidden_size = _unpack(module_or_controllers)
    layers = sorted(int(k) for k in controllers)
    own = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "hidden_size": hidden_size,
           "layers": layers, "spec": dataclasses.asdict(spec)}
    meta = dict(metadata or {})
    for key, value in own.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata[{key!r}]={meta[key]!r} contradicts the controllers' {key}={value!r}")
    meta.update(own)
    meta.setdefault("student", None)
    json.dumps(meta)  # fail before writing anything if the caller's metadata is not JSON-serialisable
    tensors = {f"{key}.{name}": t.detach().cpu().contiguous()
               for key, ctrl in controllers.items() for name, t in ctrl.state_dict().items()}
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": CHECKPOINT_FORMAT}))
    meta["weights_sha256"] = file_digest(out / WEIGHTS_FILE)

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    atomic_write(out / META_FILE, write_json)
    return out


def _normalise(field: str, value: Any) -> Any:
    if field == "layers" and value is not None:
        return [int(x) for x in value]
    if field == "hidden_size" and value is not None:
        return int(value)
    return value


def _rebuild_hint(d: Path) -> str:
    return (f"delete {d} and run again with 'controller' in stages=[...] to retrain it, "
            f"or restore the checkpoint from a trusted copy")


def _check_safetensors_file(wpath: Path, d: Path) -> None:
    """Refuse, before anything parses it, a weights file that is not safetensors (e.g. a pickle).

    A safetensors file starts with an 8-byte little-endian header length N followed by a JSON header
    (``{``) of N bytes. Pickles (``torch.save`` zips, raw pickles) are named as such: uzr never
    unpickles weights, since unpickling can run arbitrary code.
    """
    size = wpath.stat().st_size
    with open(wpath, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save zip archive" if head[:2] == b"PK" else "a pickle"
        raise ValueError(
            f"refusing to load {wpath}: it is {kind}, not a safetensors file. uzr reads controller weights "
            f"only with safetensors and never unpickles them (unpickling can run arbitrary code); "
            f"{_rebuild_hint(d)}")
    raise ValueError(f"{wpath} is not a valid safetensors file (damaged or truncated header, {size} bytes); "
                     f"{_rebuild_hint(d)}")


def load_controller(path_dir: str | os.PathLike, expected: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Controller], dict[str, Any]]:
    """Rebuild controllers saved by :func:`save_controller` (weights via safetensors, never pickle).

    ``expected``: fields the current run requires (``student``, ``hidden_size``, ``layers``, or any
    other metadata key); a mismatch raises ValueError naming the field and both values.
    Returns ``({str(layer): Controller in eval mode}, metadata)``.
    """
    d = Path(path_dir)
    wpath, mpath = d / WEIGHTS_FILE, d / META_FILE
    for p in (mpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"controller checkpoint incomplete: {p} is missing; train the controller "
                                    f"(stages=[controller]) or point to a folder holding {WEIGHTS_FILE} and {META_FILE}")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged: {_rebuild_hint(d)}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{mpath} is not a uzr controller checkpoint (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{mpath} has format_version={meta.get('format_version')!r}, this uzr reads "
                         f"{CHECKPOINT_VERSION}; retrain the controller")
    for field, current in (expected or {}).items():
        ckpt, cur = _normalise(field, meta.get(field)), _normalise(field, current)
        if ckpt != cur:
            raise ValueError(
                f"controller checkpoint {d} does not match this run: {field}={ckpt!r} in the checkpoint, "
                f"{field}={cur!r} now; retrain the controller for this configuration (stages=[controller]) "
                f"or point to the checkpoint trained for it")
    _check_safetensors_file(wpath, d)
    if "weights_sha256" in meta and file_digest(wpath) != meta["weights_sha256"]:
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath}: the weights file is truncated, "
                         f"modified or from another save; {_rebuild_hint(d)}")
    try:
        tensors = load_file(wpath)
    except Exception as e:  # safetensors raises its own error type on damaged headers / short files
        raise ValueError(f"cannot read {wpath}: {e}; the file is damaged: {_rebuild_hint(d)}") from e
    spec = coerce_spec(meta["spec"])
    controllers: dict[str, Controller] = {}
    for layer in meta["layers"]:
        key = str(layer)
        ctrl = build_controller(spec, meta["hidden_size"])
        state = {name[len(key) + 1 :]: t for name, t in tensors.items() if name.startswith(key + ".")}
        try:
            ctrl.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wpath} does not fit the architecture in {mpath} (layer {key}): {e}") from e
        controllers[key] = ctrl.eval()
    return controllers, meta
