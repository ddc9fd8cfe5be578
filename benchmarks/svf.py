"""SVF experts: swap time (attach / remove) and decoding speed with an expert attached vs the plain student.

The packaged student (SmolLM2-135M-Instruct) with a random SVF expert on ``--matrices`` (default mlp) of every
layer (``z ~ 0.1 + N(0, 1)``, so every matrix changes). Swap: :class:`~uzr.adapters.svf.SVFEdit` ``attach``
(materialises ``W' = W + U diag(S f) Vh`` once per matrix) and ``remove`` (copies the originals back),
best of ``--rounds``. Decoding: greedy generation of ``--new-tokens`` tokens (forced with ``min_new_tokens``),
plain and with the expert attached alternating for ``--rounds`` rounds after a warm-up; tokens/s from the
best round of each, and their ratio (goal >= 0.95: the attached expert runs the plain model code on the
materialised weights). For contrast, the same with the training edit (:class:`~uzr.adapters.svf.SVFTrainable`,
forward hooks computing the low-rank delta every step).

Usage::

    .venv/bin/python benchmarks/svf.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "The history of the printing press begins in the fifteenth century, when"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="student/smollm2_135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--matrices", default="mlp", choices=["mlp", "attn", "mlp+attn"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import model_spec

    from uzr.adapters.svd import decompose, target_matrices
    from uzr.adapters.svf import SVFEdit, SVFExpert, SVFTrainable
    from uzr.config import resolve_cache_dir
    from uzr.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(dataclasses.replace(model_spec(args.model), dtype=args.dtype), device=args.device)
    model.eval()
    t0 = time.perf_counter()
    decomp = decompose(target_matrices(model, args.matrices), resolve_cache_dir()).to(args.device)
    print(f"decomposition ({len(decomp.names)} matrices, cached by model hash): {time.perf_counter() - t0:.2f} s")
    g = torch.Generator().manual_seed(0)
    expert = SVFExpert({n: 0.1 + torch.randn(s.shape, generator=g) for n, s in decomp.S.items()})
    edit = SVFEdit(decomp, expert.masks())
    prompt = tok(PROMPT, return_tensors="pt").to(args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)

    attach, remove = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        edit.attach(model)
        attach.append(time.perf_counter() - t)
        t = time.perf_counter()
        edit.remove()
        remove.append(time.perf_counter() - t)

    def generate(case: str, n: int):
        ctx = {"plain": None, "expert": edit, "hooks": SVFTrainable(decomp, {k: v for k, v in expert.z.items()})}[case]
        with torch.no_grad():
            if ctx is not None:
                ctx.attach(model)
            try:
                t = time.perf_counter()
                out = model.generate(**prompt, **{**kwargs, "max_new_tokens": n, "min_new_tokens": n})
                return time.perf_counter() - t, out
            finally:
                if ctx is not None:
                    ctx.remove()

    cases = ("plain", "expert", "hooks")
    for case in cases:
        generate(case, 4)
    best = dict.fromkeys(cases, float("inf"))
    for r in range(args.rounds):
        for case in cases:
            seconds, _ = generate(case, args.new_tokens)
            best[case] = min(best[case], seconds)
            print(f"  round {r + 1} {case:>6}: {args.new_tokens / seconds:7.1f} tokens/s", flush=True)
    rate = {k: args.new_tokens / v for k, v in best.items()}
    print(f"\n{args.model} on {args.device} ({args.dtype}), threads {torch.get_num_threads()}, "
          f"{args.matrices} matrices of every layer ({expert.num_parameters} z entries)")
    print(f"swap: attach {min(attach) * 1000:.0f} ms, remove {min(remove) * 1000:.0f} ms (best of {args.rounds})")
    print(f"{'plain tok/s':>12} | {'expert tok/s':>12} | {'ratio':>6} | {'hooks tok/s':>11} | ratio")
    print(f"{rate['plain']:>12.1f} | {rate['expert']:>12.1f} | {rate['expert'] / rate['plain']:>6.2f} | "
          f"{rate['hooks']:>11.1f} | {rate['hooks'] / rate['plain']:.2f}")


if __name__ == "__main__":
    main()
