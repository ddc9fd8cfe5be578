"""Reusing a cached artifact: size/mtime check (what a sweep's jobs do) versus hashing every file.

Builds one artifact of ``--size-gb`` GB (default 2) in ``--files`` files (default 8) of random bytes
(written out, not sparse) through :class:`uzr.cache.ArtifactCache` in a temporary folder, then times,
side by side in one process:

- **reuse**: ``ArtifactCache.get_or_build`` on the finished artifact (lists the files, compares each
  one's size and mtime with the manifest; no lock, no hashing);
- **full hash**: ``verify(folder, full=True)``, what every reuse cost before manifest version 2 and
  what ``python -m uzr.cache verify`` does.

Full hashing is measured twice: with the files in the page cache (just written), and cold, after
asking the kernel to drop their cached pages (``posix_fadvise(DONTNEED)``, no root needed), which
is what a job on another node of a cluster sees. Each case runs ``--rounds`` times and the fastest
round is shown. The temporary folder is deleted at the end.

Usage::

    .venv/bin/python benchmarks/cache_reuse.py
    .venv/bin/python benchmarks/cache_reuse.py --size-gb 8 --files 16 --dir /scratch
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uzr.cache import ArtifactCache, artifact_files, verify  # noqa: E402

BLOCK = 16 << 20


def write_files(work: Path, total: int, files: int) -> None:
    per_file = total // files
    for i in range(files):
        path = work / f"shard-{i:05d}" / "data-00000-of-00001.arrow"
        path.parent.mkdir(parents=True)
        with open(path, "wb") as handle:
            left = per_file
            while left:
                chunk = os.urandom(min(BLOCK, left))
                handle.write(chunk)
                left -= len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    (work / "layout.json").write_text(f'{{"shards": {files}}}')


def drop_page_cache(folder: Path) -> None:
    for path in artifact_files(folder).values():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best_of(rounds: int, run, before=None) -> float:
    times = []
    for _ in range(rounds):
        if before:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="artifact size in GB (1e9 bytes)")
    parser.add_argument("--files", type=int, default=8, help="number of data files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to make the temporary cache (default: system temp)")
    args = parser.parse_args(argv)

    total = int(args.size_gb * 1e9)
    tmp = Path(tempfile.mkdtemp(prefix="uzr-cache-bench-", dir=args.dir))
    try:
        cache = ArtifactCache(tmp)
        start = time.perf_counter()
        folder, built = cache.get_or_build("harvest", "bench", {"size": total},
                                           lambda work: write_files(work, total, args.files))
        build_s = time.perf_counter() - start
        assert built
        size = sum(p.stat().st_size for p in artifact_files(folder).values())
        blocks = sum(p.stat().st_blocks * 512 for p in artifact_files(folder).values())

        def reuse():
            assert cache.get_or_build("harvest", "bench", {}, lambda work: 1 / 0) == (folder, False)

        reuse_s = best_of(args.rounds, reuse)
        warm_s = best_of(args.rounds, lambda: verify(folder, full=True))
        cold_s = best_of(args.rounds, lambda: verify(folder, full=True), before=lambda: drop_page_cache(folder))
        reuse_cold_s = best_of(args.rounds, reuse, before=lambda: drop_page_cache(folder))

        print(f"artifact: {len(artifact_files(folder))} files, {size / 1e9:.2f} GB "
              f"({blocks / 1e9:.2f} GB allocated on disk), built + manifest in {build_s:.1f} s; "
              f"best of {args.rounds} rounds")
        print(f"{'':28s}{'reuse (size/mtime)':>20s}{'full hash':>12s}{'full / reuse':>14s}")
        for label, fast, slow in (("page cache warm", reuse_s, warm_s), ("page cache dropped", reuse_cold_s, cold_s)):
            print(f"{label:28s}{fast * 1e3:17.2f} ms{slow:10.2f} s{slow / fast:13.0f}x")
        print(f"full-hash throughput: {size / warm_s / 1e9:.2f} GB/s warm, {size / cold_s / 1e9:.2f} GB/s cold")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
