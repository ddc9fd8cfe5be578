"""Checkpoint I/O shared by the controller and the gate: safetensors weights + JSON metadata.

A checkpoint is a folder holding a weights file (safetensors, never pickle) and a metadata file
(JSON) that records the checkpoint's ``format`` and ``format_version``, the caller's fields and the
weights' ``weights_sha256``. :func:`save_checkpoint` checks the metadata is JSON-serialisable before
writing anything, then writes the weights and then the JSON, each atomically
(:func:`uzr.cache.atomic_write`): a crash between the two leaves a pair whose hash does not match.

:func:`load_checkpoint` refuses, each with a ``FileNotFoundError`` or ``ValueError`` that names the
file and says how to fix it (the caller's ``rebuild_hint``):

- a missing weights or metadata file;
- metadata that is not JSON, not an object, of another format or format version, without a
  ``weights_sha256``, or whose fields differ from what the run ``expected`` (naming the field and
  both values);
- a weights file that is a pickle or a ``torch.save`` zip (named as such and never unpickled:
  unpickling can run arbitrary code), or whose safetensors header is damaged;
- weights whose sha256 differs from the recorded one (truncated, modified or from another save);
- weights that safetensors cannot parse.

The order matters: nothing parses the weights before the header check and the sha256 check passed.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from uzr.cache import atomic_write, file_digest

__all__ = ["load_checkpoint", "save_checkpoint"]

# Fields written by save_checkpoint itself.
FORMAT, VERSION, SHA256 = "format", "format_version", "weights_sha256"


def _what(format: str) -> str:
    """``uzr.controller`` -> ``controller``: how messages name the checkpoint."""
    return format.rsplit(".", 1)[-1]


def save_checkpoint(folder: str | os.PathLike, weights_file: str, meta_file: str, tensors: Mapping[str, Tensor],
                    meta: Mapping[str, Any], format: str, version: int) -> Path:
    """Write ``folder/weights_file`` (safetensors) and ``folder/meta_file`` (JSON), each atomically.

    The JSON holds ``meta`` plus ``format``, ``format_version`` and the weights' ``weights_sha256``.
    Raises ValueError/TypeError, before anything is written, when ``meta`` is not JSON-serialisable,
    contradicts ``format``/``version``, or ``tensors`` is not a mapping of names to tensors.
    Returns ``folder``.
    """
    meta = dict(meta)
    for key, value in ((FORMAT, format), (VERSION, version)):
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata[{key!r}]={meta[key]!r} contradicts the checkpoint's {key}={value!r}")
    meta.update({FORMAT: format, VERSION: version})
    meta.pop(SHA256, None)  # e.g. metadata of a loaded checkpoint: recomputed below
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{_what(format)} checkpoint metadata is not JSON-serialisable ({err}); "
                        f"nothing was written to {folder}") from None
    bad = [key for key, t in tensors.items() if not isinstance(key, str) or not isinstance(t, Tensor)]
    if bad or not tensors:
        raise TypeError(f"{_what(format)} checkpoint needs a non-empty mapping of names to tensors "
                        f"(bad entries: {bad[:5]}); nothing was written to {folder}")
    plain = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / weights_file, lambda p: save_file(plain, p, metadata={FORMAT: format}))
    meta[SHA256] = file_digest(out / weights_file)

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    atomic_write(out / meta_file, write_json)
    return out


def _plain(value: Any) -> Any:
    """JSON's view of a value, so that ``(2, 5)``, ``ListConfig([2, 5])`` and ``np.int64(2)`` compare equal
    to what the JSON file holds."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def check_safetensors_header(path: Path, what: str, rebuild_hint: str) -> None:
    """Refuse, before anything parses it, a weights file that is not safetensors (e.g. a pickle).

    A safetensors file starts with an 8-byte little-endian header length N followed by a JSON header
    (``{``) of N bytes. Pickles (``torch.save`` zips, raw pickles) are named as such.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save zip archive" if head[:2] == b"PK" else "a pickle"
        raise ValueError(
            f"refusing to load {path}: it is {kind}, not a safetensors file. uzr reads {what} weights only "
            f"with safetensors and never unpickles them (unpickling can run arbitrary code); {rebuild_hint}")
    raise ValueError(f"{path} is not a valid safetensors file (damaged or truncated header, {size} bytes); "
                     f"{rebuild_hint}")


def load_checkpoint(folder: str | os.PathLike, weights_file: str, meta_file: str, format: str, version: int,
                    expected: Mapping[str, Any] | None = None, rebuild_hint: str = ""
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; returns ``(tensors on CPU, metadata)``.

    ``expected``: fields the current run requires (compared as JSON values, so tuples match lists);
    a mismatch names the field and both values. ``rebuild_hint`` is the fix every error ends with,
    e.g. ``"delete <folder> and run again with 'gate' in stages=[...] to retrain it"``.
    """
    d = Path(folder)
    what = _what(format)
    hint = rebuild_hint or f"rebuild the {what} checkpoint"
    wpath, mpath = d / weights_file, d / meta_file
    for p in (mpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"{what} checkpoint incomplete: {p} is missing (a checkpoint is a folder "
                                    f"holding {weights_file} and {meta_file}); {hint}")
    try:
        meta = json.loads(mpath.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{mpath} is not valid JSON ({err}); the checkpoint is damaged: {hint}") from None
    if not isinstance(meta, dict) or meta.get(FORMAT) != format:
        found = meta.get(FORMAT) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{mpath} is not a {format} checkpoint (format={found!r}); {hint}")
    if meta.get(VERSION) != version:
        raise ValueError(f"{mpath} has format_version={meta.get(VERSION)!r}, this uzr reads {version}; {hint}")
    for field, current in (expected or {}).items():
        ckpt, now = _plain(meta.get(field)), _plain(current)
        if ckpt != now:
            raise ValueError(
                f"{what} checkpoint {d} does not match this run: {field}={ckpt!r} in the checkpoint, "
                f"{field}={now!r} now; it was made for another configuration: use the checkpoint made for "
                f"this one, or build one for it: {hint}")
    if not isinstance(meta.get(SHA256), str):
        raise ValueError(f"{mpath} records no weights_sha256 (edited or damaged), so {wpath} cannot be "
                         f"checked; {hint}")
    check_safetensors_header(wpath, what, hint)
    if file_digest(wpath) != meta[SHA256]:
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath}: the weights file is truncated, "
                         f"modified or from another save; {hint}")
    try:
        tensors = load_file(wpath)
    except Exception as err:  # safetensors raises its own error types on damaged headers / short files
        raise ValueError(f"cannot read {wpath}: {err}; the file is damaged: {hint}") from None
    return tensors, meta
