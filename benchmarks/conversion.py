"""Packaged GGUF conversion: each GGUF parsed once (uzr's ``_gguf_read_once``) beside transformers' three parses.

A packaged model is de-quantised into float32 safetensors once per machine (the first ``make run`` or test
session). transformers builds a ``gguf.GGUFReader`` for the config, for the weights and for the tokenizer;
``uzr.models._gguf_read_once`` hands all three one reader per file. The two ways alternate in one process
(``--rounds``), each converting into a fresh temporary folder; the table keeps each one's best round, in wall and
in process CPU seconds (CPU is the figure to trust on a shared machine), and checks that both wrote the same
weights.

    .venv/bin/python benchmarks/conversion.py --model teacher/gemma3_270m --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def convert(spec, read_once: bool) -> tuple[float, float, str]:
    """Wall s, CPU s and the sha256 of the written weights for one conversion into a fresh folder."""
    from uzr.models import loading as models
    from uzr.timing import Stopwatch

    gguf, _ = models._locate_gguf(spec, "model")
    original = models._gguf_read_once
    if not read_once:
        models._gguf_read_once = contextlib.nullcontext
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clock = Stopwatch()
            models._convert_gguf(spec, gguf, Path(tmp) / "model")
            wall, cpu = clock.elapsed()
            digest = hashlib.sha256((Path(tmp) / "model" / "model.safetensors").read_bytes()).hexdigest()
    finally:
        models._gguf_read_once = original
    return wall, cpu, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="teacher/gemma3_270m", help="a conf/ model group entry")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import model_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = model_spec(args.model)
    load = os.getloadavg()[0]
    best: dict[str, tuple[float, float]] = {}
    digests = set()
    for _ in range(args.rounds):
        for name, read_once in (("three parses (transformers)", False), ("one parse (uzr)", True)):
            wall, cpu, digest = convert(spec, read_once)
            digests.add(digest)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
    print(f"{spec.name}: best of {args.rounds} rounds, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| conversion | wall s | CPU s |\n|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    (w3, c3), (w1, c1) = best.values()
    print(f"speed-up: {w3 / w1:.2f}x wall, {c3 / c1:.2f}x CPU; same weights written: {len(digests) == 1}")


if __name__ == "__main__":
    main()
