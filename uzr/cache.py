"""Content-addressed artifact cache shared by runs: harvest stores, controllers, gates.

An artifact lives in ``<root>/<kind>/<key>/`` where ``key`` hashes the config that produced it, so a
sweep over ``alpha`` finds the store and the controller already built. Builds happen in a temporary
folder beside the final one and are renamed into place, under a file lock, so concurrent jobs never
see half an artifact. Each artifact carries ``manifest.json``: the producing config and a content hash
of every file, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

MANIFEST = "manifest.json"



def content_key(kind: str, payload: dict, version: int) -> str:
    """Stable 16-hex-digit key of a JSON-serialisable payload, the artifact kind and its version
    (the stage's version in :data:`uzr.stages.REGISTRY`: bumped when the artifact changes meaning)."""
    blob = json.dumps({"kind": kind, "schema": version, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file beside ``path``, then rename it over ``path``.

    Readers never see half a file; the mode is 0644 (mkstemp's 0600 would hide a shared cache's files).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def folder_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".lock")
    }


class CorruptArtifact(RuntimeError):
    pass


def verify(folder: Path) -> dict:
    """Check every file of an artifact against its manifest; returns the manifest.

    Raises :class:`CorruptArtifact` (saying to delete the folder and run again) when the manifest is
    missing or unreadable, or when a file was changed, truncated, removed or added.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CorruptArtifact(f"{folder} has no {MANIFEST}: it was not completed. Delete the folder to rebuild it.")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
        if not isinstance(expected, dict):
            raise TypeError(f"'files' is a {type(expected).__name__}")
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptArtifact(
            f"{manifest_path} is damaged ({type(err).__name__}: {err}). Delete {folder} and run again to rebuild it."
        ) from None
    actual = folder_digests(folder)
    bad = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if bad:
        raise CorruptArtifact(
            f"{folder} does not match its manifest (changed, missing or extra: {', '.join(bad[:5])}). "
            f"Delete {folder} and run again to rebuild it."
        )
    return manifest


def is_temporary(name: str) -> bool:
    """Names of in-progress writes (``.tmp-shard-...``, ``.controller.safetensors.XXXX.tmp``, ...)."""
    return name.startswith(".tmp") or name.endswith(".tmp")


def remove_temporaries(folder: Path) -> list[str]:
    """Delete what unfinished writes left in ``folder`` (a crashed build); returns the removed names.

    Only call it while holding the artifact's lock, after the build finished: then nothing else is
    writing there and every temporary entry is garbage.
    """
    removed = []
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts)):
        if is_temporary(path.name) and (path.exists() or path.is_symlink()):
            removed.append(str(path.relative_to(folder)))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return removed


def write_manifest(folder: Path, config: dict, extra: dict | None = None) -> dict:
    manifest = {"config": config, "created": time.time(), "files": folder_digests(folder), **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return manifest


class UnsafeWeightsFile(ValueError):
    """A weights file that cannot be read without unpickling arbitrary objects."""


def load_torch_weights(path: str | os.PathLike, map_location: str = "cpu"):
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``), never pickle.

    The only way uzr reads a ``torch.save`` file: a file whose pickle would build arbitrary objects
    (and could run code while doing so) is refused with :class:`UnsafeWeightsFile` before anything in
    it executes. Prefer safetensors for new files.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message starts by suggesting weights_only=False: not advice uzr passes on.
        lines = [ln for ln in str(err).splitlines() if ln.strip() and "weights_only" not in ln]
        reason = f" ({lines[0].strip()})" if lines else ""
        raise UnsafeWeightsFile(
            f"refusing to load {path}: it holds pickled objects other than tensors{reason}, and unpickling them "
            f"could run code. uzr reads torch files only with weights_only=True; use a file from a trusted "
            f"source saved as safetensors or as a plain state dict of tensors."
        ) from None
    except RuntimeError as err:  # not a torch.save file at all (e.g. truncated zip)
        raise UnsafeWeightsFile(f"cannot read {path} as torch weights: {str(err).splitlines()[0]}") from None


class ArtifactCache:
    """``<root>/<kind>/<key>/`` folders, built at most once even by concurrent jobs."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / MANIFEST).exists()

    def work_dir(self, kind: str, key: str) -> Path:
        """A persistent in-progress folder (resumable builds keep their finished parts here)."""
        return self.root / kind / f"{key}.partial"

    def get_or_build(self, kind: str, key: str, config: dict, build: Callable[[Path], dict | None],
                     allow_build: bool = True) -> tuple[Path, bool]:
        """Return (folder, built_now). ``build(work_dir)`` fills the folder and may return manifest extras."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / MANIFEST).exists():
                verify(final)
                return final, False
            if not allow_build:
                raise FileNotFoundError(
                    f"no {kind} artifact {key} in {self.root / kind}, and building it is switched off. "
                    f"Add '{kind}' to stages=[...] (or run the earlier stage first) to build it."
                )
            work = self.work_dir(kind, key)
            work.mkdir(parents=True, exist_ok=True)
            extras = build(work) or {}
            # A crash of an earlier attempt may have left half-written temporaries in the work folder;
            # they must not end up in the artifact (or its manifest).
            remove_temporaries(work)
            write_manifest(work, config, extras)
            if final.exists():  # a stale incomplete folder (no manifest) from a crash
                shutil.rmtree(final)
            os.replace(work, final)
            return final, True
