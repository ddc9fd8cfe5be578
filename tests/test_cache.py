"""Artifact cache: cheap reuse by size/mtime, full verification on request (``python -m uzr.cache verify``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import uzr.cache
from uzr.cache import MANIFEST, ArtifactCache, CorruptArtifact, main, verify

from .conftest import ROOT

FILES = {"shard-00000/data.arrow": b"a" * 4096, "shard-00001/data.arrow": b"b" * 3000, "layout.json": b'{"n": 2}'}


def build(cache: ArtifactCache, kind: str = "harvest", key: str = "k0", files: dict[str, bytes] = FILES) -> Path:
    def write(work: Path):
        for name, data in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)

    folder, built = cache.get_or_build(kind, key, {"kind": kind}, write)
    assert built
    return folder


def must_not_build(work: Path):
    raise AssertionError("an existing artifact was rebuilt")


@pytest.fixture
def digests(monkeypatch):
    """Counts the files hashed in full (every full hash goes through uzr.cache.file_digest)."""
    hashed: list[str] = []
    real = uzr.cache.file_digest

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(uzr.cache, "file_digest", counting)
    return hashed


def rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Replace the content of ``path`` and restore its size and mtime (what reuse cannot see)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def move_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_manifest_records_digests_sizes_and_mtimes(tmp_path):
    folder = build(ArtifactCache(tmp_path))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["manifest_version"] == 2
    assert sorted(manifest["files"]) == sorted(FILES)
    assert manifest["files"]["layout.json"] == uzr.cache.file_digest(folder / "layout.json")
    for name, data in FILES.items():
        st = (folder / name).stat()
        assert manifest["file_stats"][name] == {"size": len(data), "mtime_ns": st.st_mtime_ns}


def test_reuse_hashes_nothing_and_takes_no_lock(tmp_path, digests, monkeypatch):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    assert len(digests) == len(FILES)  # the build hashes each file once, for the manifest
    digests.clear()

    def no_lock(*args, **kwargs):
        raise AssertionError("reuse took the lock")

    monkeypatch.setattr(uzr.cache, "FileLock", no_lock)
    manifest_before = (folder / MANIFEST).read_bytes()
    assert cache.get_or_build("harvest", "k0", {}, must_not_build) == (folder, False)
    assert cache.get_or_build("harvest", "k0", {}, must_not_build) == (folder, False)
    assert digests == []
    assert (folder / MANIFEST).read_bytes() == manifest_before


def test_same_size_modification_with_a_new_mtime_is_detected_on_reuse(tmp_path, digests):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    target = folder / "shard-00001" / "data.arrow"
    target.write_bytes(b"c" * 3000)  # same size, other bytes
    move_mtime(target)  # a new mtime even on filesystems with coarse timestamps
    digests.clear()
    with pytest.raises(CorruptArtifact) as err:
        cache.get_or_build("harvest", "k0", {}, must_not_build)
    assert "changed: shard-00001/data.arrow)" in str(err.value)
    assert f"Delete {folder} and run again to rebuild it." in str(err.value)
    assert digests == ["data.arrow"]  # only the file whose stat changed was hashed


def test_new_mtime_with_the_same_content_is_accepted_without_rewriting_the_manifest(tmp_path, digests):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    move_mtime(folder / "layout.json")  # e.g. copied without keeping mtimes
    manifest_before = (folder / MANIFEST).read_bytes()
    digests.clear()
    assert cache.get_or_build("harvest", "k0", {}, must_not_build) == (folder, False)
    assert digests == ["layout.json"]
    assert (folder / MANIFEST).read_bytes() == manifest_before


def test_size_change_is_detected_without_hashing(tmp_path, digests):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    (folder / "shard-00000" / "data.arrow").write_bytes(b"a" * 100)  # truncated
    digests.clear()
    with pytest.raises(CorruptArtifact, match=r"changed: shard-00000/data.arrow \(100 bytes, built with 4096\)"):
        cache.get_or_build("harvest", "k0", {}, must_not_build)
    assert digests == []


def test_modification_with_size_and_mtime_restored_is_missed_by_reuse_but_found_by_verify(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    rewrite_keeping_stat(folder / "shard-00000" / "data.arrow", b"x" * 4096)
    # the documented trade-off: reuse compares size and mtime only
    assert cache.get_or_build("harvest", "k0", {}, must_not_build) == (folder, False)
    with pytest.raises(CorruptArtifact, match=r"changed: shard-00000/data.arrow\)"):
        verify(folder)
    assert main(["verify", "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"DAMAGED  harvest/k0: {folder} does not match its manifest (changed: shard-00000/data.arrow). "
                   f"Delete {folder} and run again to rebuild it."]


@pytest.mark.parametrize("change", ["added", "removed"])
def test_added_and_removed_files_are_detected_on_reuse(tmp_path, digests, change):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    if change == "added":
        (folder / "shard-00002").mkdir()
        (folder / "shard-00002" / "data.arrow").write_bytes(b"new")
        expected = "extra: shard-00002/data.arrow"
    else:
        (folder / "layout.json").unlink()
        expected = "missing: layout.json"
    digests.clear()
    with pytest.raises(CorruptArtifact) as err:
        cache.get_or_build("harvest", "k0", {}, must_not_build)
    assert f"({expected}). Delete {folder} and run again" in str(err.value)
    assert digests == []


def test_old_manifest_without_stats_is_verified_by_hashing(tmp_path, digests):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["file_stats"], manifest["manifest_version"]  # as written before manifest version 2
    (folder / MANIFEST).write_text(json.dumps(manifest))
    digests.clear()
    assert cache.get_or_build("harvest", "k0", {}, must_not_build) == (folder, False)
    assert sorted(digests) == sorted(Path(name).name for name in FILES)  # every file hashed
    assert "file_stats" not in json.loads((folder / MANIFEST).read_text())  # and not upgraded in place
    rewrite_keeping_stat(folder / "layout.json", b'{"n": 3}')
    with pytest.raises(CorruptArtifact, match=r"changed: layout.json\)"):
        cache.get_or_build("harvest", "k0", {}, must_not_build)


def test_damaged_file_stats_are_a_damaged_manifest(tmp_path):
    cache = ArtifactCache(tmp_path)
    folder = build(cache)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["file_stats"] = ["not", "a", "dict"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match=rf"manifest.json is damaged.*'file_stats' is a list.*Delete {folder}"):
        cache.get_or_build("harvest", "k0", {}, must_not_build)


def test_verify_cli_lines_and_exit_status(tmp_path, capsys, monkeypatch):
    cache = ArtifactCache(tmp_path)
    harvest = build(cache, "harvest", "h1")
    controller = build(cache, "controller", "c1", {"controller.safetensors": b"w" * 10, "controller.json": b"{}"})
    (tmp_path / "models" / "tiny-0123").mkdir(parents=True)  # converted models carry no manifest: not listed
    (tmp_path / "harvest" / "h2.partial").mkdir()  # a build in progress: not listed

    monkeypatch.setenv("UZR_CACHE", str(tmp_path))  # the default cache dir
    assert main(["verify"]) == 0
    assert capsys.readouterr().out.splitlines() == ["OK       controller/c1 (2 files, 0.0 MB)",
                                                     "OK       harvest/h1 (3 files, 0.0 MB)"]

    (controller / "controller.json").write_text("[]")  # same size, other content
    assert main(["verify", "--cache-dir", str(tmp_path), "harvest", "controller/c1", "gate/g9"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "OK       harvest/h1 (3 files, 0.0 MB)",
        f"DAMAGED  controller/c1: {controller} does not match its manifest (changed: controller.json). "
        f"Delete {controller} and run again to rebuild it.",
        f"MISSING  gate/g9: no such artifact in {tmp_path}",
    ]
    assert main(["verify", f"harvest/{harvest.name}"]) == 0
    assert capsys.readouterr().out.startswith("OK       harvest/h1 ")

    (harvest / MANIFEST).unlink()
    assert main(["verify", "harvest"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"DAMAGED  harvest/h1: {harvest} has no {MANIFEST}: it was not completed. Delete the folder to rebuild it."]


def test_verify_cli_default_dir_is_under_the_working_directory(tmp_path):
    """``python -m uzr.cache verify`` without $UZR_CACHE reads ./.cache/uzr."""
    folder = build(ArtifactCache(tmp_path / ".cache" / "uzr"))
    (folder / "layout.json").write_text('{"n": 9}')
    env = {k: v for k, v in os.environ.items() if k != "UZR_CACHE"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's uzr, run from another folder
    proc = subprocess.run([sys.executable, "-m", "uzr.cache", "verify"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"DAMAGED  harvest/k0: {folder.resolve()} does not match its manifest "
                                  f"(changed: layout.json)")
    empty = subprocess.run([sys.executable, "-m", "uzr.cache", "verify", "--cache-dir", str(tmp_path / "none")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert (empty.returncode, empty.stdout) == (0, "") and f"no artifacts in {tmp_path / 'none'}" in empty.stderr


def test_cache_module_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", "import uzr.cache, sys; assert 'torch' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
