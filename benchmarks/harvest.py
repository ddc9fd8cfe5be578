"""Harvest cost at long contexts: plain forward vs uzr's harvest vs the naive ``output_attentions`` path.

For the packaged teacher (Gemma 3 270M, ``conf/teacher/gemma3_270m.yaml``) at each sequence length S
(batch 1, random token ids) this compares three forward passes of the decoder stack
(``decoder_of(model)``, i.e. without the LM head, which none of the three needs over all positions):

- ``plain``: attention ``sdpa``, no statistics;
- ``harvest``: the ``uzr`` attention function with a :class:`~uzr.attention.LayerRecorder` on every
  layer (entropy, normalised entropy, locality, mean distance per layer/head/query, float32) and the
  head-mean distribution kept for the mapped layers (``--mapped-layers``) as the pipeline does
  (``harvest.max_dist_len``): a dense block of the leading ``min(S, --max-dist-len)`` query rows and keys,
  statistics over all S (``--max-dist-len 0``: the whole ``S x S`` head-mean);
- ``naive``: eager attention with ``output_attentions=True``, statistics computed afterwards from the
  returned ``(H, S, S)`` weights of every layer (dense head-mean for the mapped layers).

How it is measured
------------------
Every (S, case) runs in a fresh subprocess, so no case inherits another's allocator state. A child
loads the model, copies every parameter into anonymous memory (the converted weights are memory-mapped:
pages dropped and faulted in again would otherwise count as the case's memory), runs the case once at
32 tokens (kernel set-up), hands freed heap memory back to the system (``malloc_trim``: otherwise the
run could reuse pages freed while loading and look free), records its baseline and runs the case once
at S:

- time: wall-clock seconds of that run, and its CPU seconds (``time.process_time``: user + system time of
  all the process's threads). With ``--clock cpu`` the table uses the CPU seconds: on a machine shared with
  other jobs, time spent waiting for a core inflates the wall clock but not the CPU time (which still
  feels contention for caches and memory bandwidth);
- memory on CPU: the peak resident set size during the run minus the resident set size just before
  it. The kernel's high-water mark (``VmHWM``) is reset right before the run by writing ``5`` to
  ``/proc/self/clear_refs`` and read afterwards, so the figure is the real peak of the process's
  physical memory above the loaded model (allocator overhead and transient buffers included, not just
  what torch's allocator reports). If the reset is refused, ``ru_maxrss`` is used and the table says
  so. Children run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (``--mmap-threshold``): every buffer
  of 64 KiB or more is its own mapping, returned to the system when freed, so resident memory follows
  the live tensors rather than what the heap kept from earlier allocations (with the default dynamic
  threshold the same plain forward read 59 MB in one run and 97 MB in the next at S = 1024).
- memory on CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the run
  (peak statistics reset right before it).

With ``--rounds R`` the whole (S x case) sweep is repeated R times, cases interleaved, and the table
shows the fastest time and the largest peak per cell; ratios are taken from those. The machine may be
shared: interleaving the cases keeps the ratios fair when its load drifts.

``naive`` is only run up to ``--naive-max-len``; beyond it the table gives the memory its returned
weights alone would need (``layers x heads x S^2`` in the model dtype) instead of running it into the
out-of-memory killer on a shared machine. A child that runs out of memory prints ``OOM``.

Before the sweep one more child checks that the harvest's statistics (and head-mean block) equal the naive ones at
``--check-len`` tokens (maximum absolute differences printed).

Usage::

    .venv/bin/python benchmarks/harvest.py --threads 1 --rounds 2   # S = 256 1024 4096 on CPU
    .venv/bin/python benchmarks/harvest.py --threads 1 --lengths 16384 --no-check
    .venv/bin/python benchmarks/harvest.py --device cuda --dtype bfloat16 --lengths 1024 4096 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the uzr of this checkout, not whichever one the venv has installed
CASES = ("plain", "harvest", "naive")


# ------------------------------------------------------------------------------------------ child
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be underestimated, never overestimated
        pass


class MemoryMeter:
    """Peak memory of one run above the memory in use just before it (MB)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM reset"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
            return
        _malloc_trim()  # hand freed heap pages back, so the run's allocations show up as new resident pages
        self.base = _status_mb("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.method = "ru_maxrss (no reset: includes loading)"

    def stop(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.method == "VmHWM reset":
            return _status_mb("VmHWM:") - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def _load(args):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import model_spec

    from uzr.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = dataclasses.replace(model_spec(args.model), dtype=args.dtype)
    model, _ = load_model(spec, device=args.device)
    with torch.no_grad():
        # The converted weights are memory-mapped from the cache: file-backed pages that the kernel may drop
        # and fault in again during a run, which would count as that run's memory. Copy them into
        # anonymous memory (there is no swap here, so it stays resident); tied weights stay tied.
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def _ids(model, length: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(length)
    high = min(model.config.vocab_size, 32000)
    return torch.randint(1000, high, (1, length), generator=gen).to(device)


def _allowed(module, q_len: int, device):
    """Causal (and sliding-window) mask of one layer, for the naive path's statistics."""
    import torch

    i = torch.arange(q_len, device=device)
    allowed = i[None, :] <= i[:, None]
    window = getattr(module, "sliding_window", None)
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed


def run_case(model, case: str, ids, args) -> dict:
    """One forward pass of ``case``; returns its statistics (and head-means) so they are really computed."""
    import torch

    from uzr.attention import LayerRecorder, attention_modules, decoder_of, recording
    from uzr.attention.stats import BlockGeometry, attention_stats

    mask = torch.ones_like(ids)
    modules = attention_modules(model)
    decoder = decoder_of(model)  # the decoder stack, without the LM head
    with torch.no_grad():
        if case == "plain":
            model.set_attn_implementation("sdpa")
            out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            return {"last": out.last_hidden_state[:, -1].float()}
        if case == "harvest":
            recorders = {index: LayerRecorder(args.window, index in args.mapped_layers, block_size=args.block_size,
                                              dist_rows=args.max_dist_len or None)
                         for index in range(len(modules))}
            with recording(model, recorders):
                out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            results = [recorder.result() for recorder in recorders.values()]
            bad = sum(recorder.nonfinite_rows for recorder in recorders.values())
            return {"last": out.last_hidden_state[:, -1].float(), "stats": [r[0] for r in results],
                    "head_mean": {i: results[i][1] for i in args.mapped_layers}, "nonfinite_rows": bad}
        if case == "naive":
            model.set_attn_implementation("eager")
            out = decoder(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
            s = ids.shape[1]
            geometry = BlockGeometry.for_block(0, s, s, s, ids.device)
            stats, head_mean = [], {}
            for index, weights in enumerate(out.attentions):  # (1, H, S, S) each, all kept by the model
                probs = weights.float()
                stats.append(attention_stats(probs, _allowed(modules[index], s, ids.device), geometry, args.window))
                if index in args.mapped_layers:
                    head_mean[index] = probs.mean(1)
                del probs
            return {"last": out.last_hidden_state[:, -1].float(), "stats": stats, "head_mean": head_mean}
    raise ValueError(case)


def child_measure(args) -> None:
    import torch

    model = _load(args)
    meter = MemoryMeter(args.device)
    run_case(model, args.case, _ids(model, 32, args.device), args)  # kernels and thread pools set up
    ids = _ids(model, args.length, args.device)
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = run_case(model, args.case, ids, args)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        peak = meter.stop()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, (torch.OutOfMemoryError, MemoryError)):
            raise
        print(json.dumps({"oom": True, "error": str(err)[:200]}))
        return
    print(json.dumps({"wall_seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak, "method": meter.method,
                      "nonfinite_rows": result.get("nonfinite_rows", 0)}))


def child_check(args) -> None:
    """Harvest statistics (and head-mean block) vs those from ``output_attentions`` at one length."""
    model = _load(args)
    ids = _ids(model, args.length, args.device)
    harvest, naive = run_case(model, "harvest", ids, args), run_case(model, "naive", ids, args)
    worst = {}
    for mine, ref in zip(harvest["stats"], naive["stats"]):
        for name, value in ref.items():
            diff = float((mine[name] - value).abs().max())
            worst[name] = max(worst.get(name, 0.0), diff)
    for layer, mean in harvest["head_mean"].items():
        d = mean.shape[-1]  # the leading block: min(S, --max-dist-len)
        diff = float((mean - naive["head_mean"][layer][:, :d, :d]).abs().max())
        worst["head_mean"] = max(worst.get("head_mean", 0.0), diff)
    worst["output"] = float((harvest["last"] - naive["last"]).abs().max() / naive["last"].abs().max())
    print(json.dumps(worst))


# ----------------------------------------------------------------------------------------- parent
def _child(args, mode: str, case: str, length: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--case", case, "--length", str(length)]
    cmd += _forward_args(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.mmap_threshold > 0 and args.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        if proc.returncode in (-9, 137):
            return {"oom": True, "error": "killed (out of memory?)"}
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{mode} {case} S={length} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _forward_args(args) -> list[str]:
    out = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--window", str(args.window),
           "--block-size", str(args.block_size), "--max-dist-len", str(args.max_dist_len),
           "--threads", str(args.threads),
           "--mapped-layers", *map(str, args.mapped_layers)]
    return out


def _pipeline_block_size() -> int:
    """``harvest.block_size`` of the pipeline's schema (``uzr/config/harvest.py``): the benchmark measures what runs."""
    from uzr.config import HarvestSpec

    return HarvestSpec().block_size


def _naive_bytes(args, length: int) -> float:
    """Bytes of the weights output_attentions returns: layers x heads x S^2 in the model dtype."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import model_spec

    spec = model_spec(args.model)
    size = 4 if args.dtype == "float32" else 2
    return spec.num_layers * spec.num_heads * length * length * size


def _fmt_cell(cell: dict | None) -> tuple[str, str]:
    if cell is None:
        return "-", "-"
    if cell.get("oom"):
        return "OOM", "OOM"
    if cell.get("skipped"):
        return "not run", cell["skipped"]
    return f"{cell['seconds']:.2f}", f"{cell['peak_mb']:.0f}"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or a.get("oom") or b.get("oom") or a.get("skipped") or b.get("skipped"):
        return "-"
    return f"{a[key] / max(b[key], 1e-9):.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--model", default="teacher/gemma3_270m", help="config under conf/ (default: the teacher)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch default)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep; fastest time, largest peak kept")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time in the table: wall clock, or the process's CPU seconds (steadier when shared)")
    parser.add_argument("--window", type=int, default=8, help="locality window")
    parser.add_argument("--block-size", type=int, default=_pipeline_block_size(),
                        help="query rows per block (default: harvest.block_size of the schema, %(default)s)")
    parser.add_argument("--max-dist-len", type=int, default=512,
                        help="head-mean kept for the leading min(S, this) rows and keys, as harvest.max_dist_len "
                             "(0: all S x S)")
    parser.add_argument("--mapped-layers", type=int, nargs="+", default=[2, 9, 15],
                        help="teacher layers keeping a head-mean (default: those mapped to student 4, 15, 26)")
    parser.add_argument("--naive-max-len", type=int, default=4096, help="longest S the naive path is run at")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the CPU children (0: allocator default)")
    parser.add_argument("--check-len", type=int, default=256, help="S of the harvest-vs-naive statistics check")
    parser.add_argument("--no-check", action="store_true", help="skip the harvest-vs-naive statistics check")
    parser.add_argument("--child", choices=["measure", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "measure":
        return child_measure(args)
    if args.child == "check":
        return child_check(args)

    print(f"model {args.model} on {args.device} ({args.dtype}), threads {args.threads or 'default'}, "
          f"MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold or 'default'}, "
          f"cpus {os.cpu_count()}, rounds {args.rounds}, harvest block {args.block_size} rows, "
          f"head-mean for layers {args.mapped_layers}: dense leading "
          f"{'S x S' if not args.max_dist_len else f'min(S, {args.max_dist_len})^2'} block, statistics over all S",
          flush=True)
    if not args.no_check:
        check_len = min(args.check_len, args.naive_max_len)
        worst = _child(args, "check", "harvest", check_len)
        print(f"check at S={check_len}: max |harvest - naive| " +
              ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
    cells: dict[tuple[int, str], dict] = {}
    method = None
    for round_ in range(args.rounds):
        for length in args.lengths:
            for case in args.cases:
                if case == "naive" and length > args.naive_max_len:
                    need = _naive_bytes(args, length) / 2**30
                    cells[length, case] = {"skipped": f">{need:.0f} GiB"}
                    continue
                got = _child(args, "measure", case, length)
                method = got.get("method", method)
                shown = "OOM" if got.get("oom") else (f"{got['wall_seconds']:.2f} s wall, {got['cpu_seconds']:.2f} s cpu, "
                                                      f"{got['peak_mb']:.0f} MB")
                print(f"  round {round_ + 1} S={length} {case}: {shown}", flush=True)
                if not got.get("oom"):
                    got["seconds"] = got[f"{args.clock}_seconds"]
                old = cells.get((length, case))
                if old and not old.get("oom") and not got.get("oom"):
                    got = {**got, "seconds": min(old["seconds"], got["seconds"]),
                           "peak_mb": max(old["peak_mb"], got["peak_mb"])}
                cells[length, case] = got
    clock = "wall clock" if args.clock == "wall" else "CPU seconds (process_time)"
    print(f"\nmemory: peak above the loaded model ({method}); time: {clock} of one forward pass")
    header = (f"{'S':>6} | {'plain s':>8} {'MB':>7} | {'harvest s':>9} {'MB':>7} | {'naive s':>8} {'MB':>9} |"
              f" {'time b/a':>8} {'mem b/a':>7} | {'time c/b':>8} {'mem c/b':>7}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        a, b, c = (cells.get((length, case)) for case in CASES)
        (at, am), (bt, bm), (ct, cm) = _fmt_cell(a), _fmt_cell(b), _fmt_cell(c)
        print(f"{length:>6} | {at:>8} {am:>7} | {bt:>9} {bm:>7} | {ct:>8} {cm:>9} |"
              f" {_ratio(b, a, 'seconds'):>8} {_ratio(b, a, 'peak_mb'):>7} |"
              f" {_ratio(c, b, 'seconds'):>8} {_ratio(c, b, 'peak_mb'):>7}")
    bad = sum(cell.get("nonfinite_rows", 0) for cell in cells.values() if isinstance(cell, dict))
    if bad:
        print(f"warning: {bad} attention rows with non-finite scores")


if __name__ == "__main__":
    main()
