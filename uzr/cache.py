"""Content-addressed artifact cache shared by runs: harvest stores, controllers, gates.

An artifact lives in ``<root>/<kind>/<key>/`` where ``key`` hashes the config that produced it, so a
sweep over ``alpha`` finds the store and the controller already built. Builds happen in a temporary
folder beside the final one and are renamed into place, under a file lock, so concurrent jobs never
see half an artifact. Each artifact carries ``manifest.json``: the producing config, the sha256 of
every file (``files``) and, since manifest version 2, each file's size and ``st_mtime_ns``
(``file_stats``), both recorded when the artifact was built.

Checking an artifact comes in two strengths:

- **Reuse** (:meth:`ArtifactCache.get_or_build`, ``verify(folder, full=False)``) lists the files and
  compares each one's size and mtime with the manifest: a multi-GB store is accepted in milliseconds.
  Only a file whose size or mtime differs is hashed again; a changed size, or a changed sha256, is
  damage (:class:`CorruptArtifact`, with the delete-and-rebuild advice), while a file whose mtime
  moved but whose content still matches (a copy without ``-p``) is accepted. Files added or removed
  are always detected. A manifest without ``file_stats`` (written by an older uzr) is checked by
  hashing every file. Reuse never rewrites the manifest: the cache may be shared read-only.
- **Full** (``verify(folder)``, ``python -m uzr.cache verify``) hashes every file.

The trade-off: a modification that keeps a file's size and leaves its mtime as recorded (restored
with ``os.utime``, or made so soon after the build that the filesystem's coarse clock did not move)
is not seen by reuse. Such damage is reported by ``python -m uzr.cache verify``, and the checkpoint loaders check
their weights' own sha256 regardless. Run the verify command after copying a cache or when in doubt::

    python -m uzr.cache verify [--cache-dir DIR] [KIND[/KEY] ...]

It prints one line per artifact (``OK`` or ``DAMAGED`` with the reason and the fix) and exits with
status 1 if anything is damaged or a named artifact is missing. ``--cache-dir`` defaults to
``$UZR_CACHE``, else ``./.cache/uzr`` (as ``cache_dir`` in ``conf/train.yaml``).

This module does not import torch, so the verify command and config-time checks start at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 2: ``file_stats`` (size and st_mtime_ns of every file) beside the sha256 digests in ``files``.
MANIFEST_VERSION = 2



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


def artifact_files(folder: Path) -> dict[str, Path]:
    """The files a manifest covers, by path relative to ``folder``: all but the manifest and lock files."""
    return {
        str(path.relative_to(folder)): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".lock")
    }


def file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class CorruptArtifact(RuntimeError):
    pass


def _rebuild_advice(folder: Path) -> str:
    return f"Delete {folder} and run again to rebuild it."


def read_manifest(folder: Path) -> dict:
    """The artifact's manifest; :class:`CorruptArtifact` if it is missing or damaged."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CorruptArtifact(f"{folder} has no {MANIFEST}: it was not completed. Delete the folder to rebuild it.")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise TypeError(f"the manifest is a {type(manifest).__name__}")
        for field, required in (("files", True), ("file_stats", False)):
            value = manifest[field] if required else manifest.get(field, {})
            if not isinstance(value, dict):
                raise TypeError(f"{field!r} is a {type(value).__name__}")
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptArtifact(
            f"{manifest_path} is damaged ({type(err).__name__}: {err}). {_rebuild_advice(folder)}"
        ) from None
    return manifest


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def verify(folder: Path, full: bool = True) -> dict:
    """Check the files of an artifact against its manifest; returns the manifest.

    ``full=True`` hashes every file. ``full=False`` (reuse) compares each file's size and mtime with
    the manifest's ``file_stats`` and hashes only the files that differ, or every file when the
    manifest has no stats (see the module docstring for what this misses).

    Raises :class:`CorruptArtifact` (saying to delete the folder and run again) when the manifest is
    missing or unreadable, or when a file was changed, truncated, removed or added.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    expected: dict = manifest["files"]
    stats: dict = {} if full else manifest.get("file_stats", {})
    present = artifact_files(folder)
    changed, stat_only = [], []
    for name in sorted(set(expected) & set(present)):
        recorded = stats.get(name)
        if recorded is not None:
            current = file_stat(present[name])
            if current == recorded:
                continue
            if isinstance(recorded, dict) and current["size"] != recorded.get("size"):
                changed.append(f"{name} ({current['size']} bytes, built with {recorded.get('size')})")
                continue
        if file_digest(present[name]) != expected[name]:
            changed.append(name)
        elif recorded is not None:
            stat_only.append(name)
    missing, extra = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    problems = [f"{what}: {_names(names)}" for what, names in
                (("changed", changed), ("missing", missing), ("extra", extra)) if names]
    if problems:
        raise CorruptArtifact(
            f"{folder} does not match its manifest ({'; '.join(problems)}). {_rebuild_advice(folder)}"
        )
    if stat_only:
        log.info("%s: %d file(s) have another mtime than when built (%s) but the same content; they are "
                 "hashed on every reuse (copy caches with cp -p or rsync -t to keep mtimes)",
                 folder, len(stat_only), _names(stat_only))
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
    """Record every file's sha256 (``files``) and size/mtime (``file_stats``) in ``folder/manifest.json``."""
    files, file_stats = {}, {}
    for name, path in artifact_files(folder).items():
        file_stats[name] = file_stat(path)  # before hashing: a later change shows as a new mtime
        files[name] = file_digest(path)
    manifest = {"config": config, "created": time.time(), "manifest_version": MANIFEST_VERSION,
                "files": files, "file_stats": file_stats, **(extra or {})}
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
        """Return (folder, built_now). ``build(work_dir)`` fills the folder and may return manifest extras.

        A finished artifact (one with a manifest) is never modified, so reusing it takes no lock (the
        cache may be read-only) and checks it by size/mtime (``verify(full=False)``). The lock is held
        only to build, so that concurrent jobs build an artifact once.
        """
        final = self.path(kind, key)
        if not (final / MANIFEST).exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(final) + ".lock"):
                if not (final / MANIFEST).exists():  # nobody built it while we waited
                    self._build(kind, key, config, build, allow_build)
                    return final, True
        verify(final, full=False)
        return final, False

    def _build(self, kind: str, key: str, config: dict, build: Callable[[Path], dict | None],
               allow_build: bool) -> None:
        """Build into the work folder and rename it into place; call it holding the artifact's lock."""
        final = self.path(kind, key)
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

    def artifacts(self, selectors: Sequence[str] = ()) -> list[tuple[str, Path]]:
        """``(kind/key, folder)`` of the named artifacts (``KIND`` or ``KIND/KEY``), or of all of them.

        Folders that are not finished artifacts are left out: ``*.partial`` builds in progress,
        temporaries, and ``models/`` (converted models, cached by :mod:`uzr.models` without a manifest).
        A ``KIND/KEY`` that does not exist is listed anyway; checking it reports it missing.
        """

        def keys(kind_dir: Path) -> list[tuple[str, Path]]:
            return [(f"{kind_dir.name}/{d.name}", d) for d in sorted(kind_dir.iterdir())
                    if d.is_dir() and not d.name.endswith(".partial") and not is_temporary(d.name)]

        if not selectors:
            kinds = [d for d in sorted(self.root.iterdir()) if d.is_dir() and d.name not in NOT_ARTIFACTS
                     and not is_temporary(d.name)] if self.root.is_dir() else []
            return [item for kind_dir in kinds for item in keys(kind_dir)]
        found = []
        for selector in selectors:
            kind, _, key = selector.strip("/").partition("/")
            if key:
                found.append((f"{kind}/{key}", self.path(kind, key)))
            elif (self.root / kind).is_dir():
                found.extend(keys(self.root / kind))
            else:
                found.append((kind, self.root / kind))
        return found


# Folders of the cache root that hold no manifest artifacts (uzr.models' converted models).
NOT_ARTIFACTS = frozenset({"models"})


def default_root() -> Path:
    """``$UZR_CACHE``, else ``./.cache/uzr`` (``cache_dir`` in ``conf/train.yaml`` run from here)."""
    env = os.environ.get("UZR_CACHE")
    return Path(env).expanduser() if env else Path.cwd() / ".cache" / "uzr"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def verify_cache(root: Path, selectors: Sequence[str] = (), out=None) -> int:
    """Fully verify artifacts, printing one line each; returns how many are damaged or missing."""
    out = out or sys.stdout
    bad = 0
    artifacts = ArtifactCache(root).artifacts(selectors)
    if not artifacts:
        print(f"no artifacts in {root}", file=sys.stderr)
    for name, folder in artifacts:
        if not folder.is_dir():
            bad += 1
            print(f"MISSING  {name}: no such artifact in {root}", file=out, flush=True)
            continue
        try:
            manifest = verify(folder, full=True)
        except CorruptArtifact as err:
            bad += 1
            print(f"DAMAGED  {name}: {err}", file=out, flush=True)
            continue
        total = sum(path.stat().st_size for path in artifact_files(folder).values())
        print(f"OK       {name} ({len(manifest['files'])} files, {_size(total)})", file=out, flush=True)
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uzr.cache", description="Check the artifact cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "verify", help="hash every file of every (or the named) artifact and compare it with the manifest",
        description="Hash every file of every (or the named) artifact and compare it with its manifest. "
                    "Prints OK, DAMAGED (with the reason and the fix) or MISSING per artifact; exit status 1 "
                    "if any is damaged or missing.")
    check.add_argument("--cache-dir", type=Path, default=None,
                       help="the cache root (default: $UZR_CACHE, else ./.cache/uzr)")
    check.add_argument("artifacts", nargs="*", metavar="KIND[/KEY]",
                       help="e.g. harvest or harvest/0123456789abcdef (default: every artifact)")
    args = parser.parse_args(argv)
    root = args.cache_dir.expanduser() if args.cache_dir else default_root()
    return 1 if verify_cache(root, args.artifacts) else 0


if __name__ == "__main__":
    sys.exit(main())
