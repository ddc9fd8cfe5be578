"""Memory of the dominance measurement at long prompts: a plain forward vs the GroupMass-recorded forward.

For the packaged teacher (Gemma 3 270M, sliding-window and full layers) at S tokens (batch 1, random ids;
``--image-tokens`` of them, after the first, form the "other" group as the image tokens of a LLaVA prompt
would, the rest are "text"), each case runs in a fresh subprocess (the measurement of
``benchmarks/harvest.py``: weights copied to anonymous memory, one 32-token warm-up, ``malloc_trim``,
peak RSS above the loaded model via a ``VmHWM`` reset; CUDA: ``max_memory_allocated``):

- ``plain``: ``model.base_model`` with attention ``sdpa``, nothing recorded;
- ``dominance``: :func:`uzr.dominance.measure.record_masses` — the ``uzr`` attention function with a
  :class:`~uzr.dominance.measure.GroupMass` reducer on every layer (float32 blocks of
  ``harvest.block_size`` rows, one matmul per block with the keys x groups indicator).

``python benchmarks/dominance.py --threads 1 --rounds 2 --lengths 2600`` prints peak MB, seconds and the
ratio dominance / plain (the issue's bar: <= 1.3x at S = 2,600 with 576 image tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harvest import MemoryMeter, _ids, _load  # noqa: E402  (the harvest benchmark's measurement)


def run_case(model, case: str, ids, args) -> None:
    import numpy as np
    import torch

    from uzr.attention import use_uzr_attention
    from uzr.dominance.measure import record_masses

    if case == "plain":
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
        return
    labels = np.zeros(ids.shape[1], dtype=np.int64)
    labels[0] = -1  # BOS-like: neither group
    labels[1:1 + args.image_tokens] = 1
    use_uzr_attention(model)
    record_masses(model, {"input_ids": ids}, labels, 2, args.block_size)


def child(args) -> None:
    model = _load(args)
    meter = MemoryMeter(args.device)
    run_case(model, args.case, _ids(model, 32, args.device), argparse.Namespace(**{**vars(args), "image_tokens": 8}))
    ids = _ids(model, args.length, args.device)
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    run_case(model, args.case, ids, args)
    print(json.dumps({"wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                      "peak_mb": meter.stop(), "method": meter.method}))


def spawn(args, case: str, length: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--length", str(length),
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--block-size", str(args.block_size), "--image-tokens", str(args.image_tokens)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{case} S={length} failed (rc {proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    from uzr.config import HarvestSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="teacher/gemma3_270m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=HarvestSpec().block_size)
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2600])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--case", default="plain")
    parser.add_argument("--length", type=int, default=0)
    parser.add_argument("--window", type=int, default=8)  # read by the harvest benchmark's loader
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    best: dict = {}
    for _ in range(args.rounds):
        for length in args.lengths:
            for case in ("plain", "dominance"):
                r = spawn(args, case, length)
                cell = best.setdefault((length, case), {"seconds": float("inf"), "peak_mb": 0.0})
                cell["seconds"] = min(cell["seconds"], r[f"{args.clock}_seconds"])
                cell["peak_mb"] = max(cell["peak_mb"], r["peak_mb"])
                cell["method"] = r["method"]
    print(f"{args.model}, {args.device}/{args.dtype}, {args.threads} thread(s), block {args.block_size} rows, "
          f"{args.image_tokens} 'image' tokens, {args.rounds} round(s), {args.clock} seconds, memory: "
          f"{best[(args.lengths[0], 'plain')]['method']}")
    print("| S | plain s / MB | dominance s / MB | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        p, d = best[(length, "plain")], best[(length, "dominance")]
        print(f"| {length} | {p['seconds']:.2f} / {p['peak_mb']:.0f} | {d['seconds']:.2f} / {d['peak_mb']:.0f} | "
              f"{d['seconds'] / p['seconds']:.2f} | {d['peak_mb'] / max(p['peak_mb'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
