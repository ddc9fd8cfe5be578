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
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

MANIFEST = "manifest.json"
# Bump when the layout of an artifact kind changes, so old caches are rebuilt rather than misread.
SCHEMA_VERSION = {"harvest": 1, "controller": 1, "gate": 1}


def content_key(kind: str, payload: dict) -> str:
    """Stable 16-hex-digit key of a JSON-serialisable payload (plus the kind's schema version)."""
    blob = json.dumps({"kind": kind, "schema": SCHEMA_VERSION.get(kind, 1), **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".lock")
    }


class CorruptArtifact(RuntimeError):
    pass


def verify(folder: Path) -> dict:
    """Check every file of an artifact against its manifest; returns the manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CorruptArtifact(f"{folder} has no {MANIFEST}: it was not completed. Delete the folder to rebuild it.")
    manifest = json.loads(manifest_path.read_text())
    actual = folder_digests(folder)
    expected = manifest["files"]
    bad = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if bad:
        raise CorruptArtifact(
            f"{folder} does not match its manifest (changed, missing or extra: {', '.join(bad[:5])}). "
            f"Delete {folder} and run again to rebuild it."
        )
    return manifest


def write_manifest(folder: Path, config: dict, extra: dict | None = None) -> dict:
    manifest = {"config": config, "created": time.time(), "files": folder_digests(folder), **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return manifest


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
            write_manifest(work, config, extras)
            if final.exists():  # a stale incomplete folder (no manifest) from a crash
                shutil.rmtree(final)
            os.replace(work, final)
            return final, True
