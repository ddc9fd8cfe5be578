"""Decoding speed with and without injection.

Greedy generation of ``--new-tokens`` tokens (default 128, forced with ``min_new_tokens`` so both runs
decode the same number) by the packaged student (SmolLM2-135M-Instruct, ``conf/student/smollm2_135m.yaml``)
with sdpa attention and no injection, versus the same model with an :class:`~uzr.injection.injector.Injector` on
``--layers`` (default 4 15 26, ``conf/inject/default.yaml``): randomly initialised bilinear controllers
(``build_controller(ControllerSpec(), hidden_size)``), alpha 0.5 constant, mode ``bias``. The injector
runs in every decoding step (query length 1): the controller's key features are cached per layer and
its log-prior over all cached keys is added to the scores.

``--source`` (issue 13's cost goal: oracle and per-head injection within 0.8x of plain): ``controller`` (head-mean,
the default), ``per_head`` (random per-head bilinear controllers, one distribution per student head), or
``teacher`` (the live oracle, :class:`uzr.injection.oracle.TeacherPrior`: the packaged Gemma 3 270M teacher follows the
growing text with its own KV cache and its aligned head-mean rows are injected; ``--teacher-layers`` maps the
injected layers, default proportional depth).

The two cases alternate for ``--rounds`` rounds in one process (after one warm-up generation each);
tokens/s is new tokens over the wall-clock time of ``generate`` (prefill of the short prompt included),
best round shown, and the ratio injected / plain is taken from the best rounds.

Usage::

    .venv/bin/python benchmarks/inject.py
    .venv/bin/python benchmarks/inject.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the uzr of this checkout, not whichever one the venv has installed
PROMPT = "The history of the printing press begins in the fifteenth century, when"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="student/smollm2_135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 15, 26])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--mode", default="bias", choices=["bias", "mix"])
    parser.add_argument("--source", default="controller", choices=["controller", "per_head", "teacher"])
    parser.add_argument("--teacher", default="teacher/gemma3_270m")
    parser.add_argument("--teacher-layers", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import model_spec

    from uzr.controller import ControllerSpec, build_controller
    from uzr.injection.injector import AlphaSpec, Injector
    from uzr.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = dataclasses.replace(model_spec(args.model), dtype=args.dtype)
    model, tok = load_model(spec, device=args.device)
    torch.manual_seed(0)
    heads = model.config.num_attention_heads if args.source == "per_head" else None
    controllers = {layer: build_controller(ControllerSpec(), model.config.hidden_size, heads).to(args.device).eval()
                   for layer in args.layers}
    teacher = None
    if args.source == "teacher":
        from uzr.injection.oracle import TeacherPrior

        teacher, teacher_tok = load_model(dataclasses.replace(model_spec(args.teacher), dtype=args.dtype),
                                          device=args.device)
        lt, ls = teacher.config.get_text_config().num_hidden_layers, model.config.num_hidden_layers
        mapping = args.teacher_layers or [round(layer * (lt - 1) / (ls - 1)) for layer in args.layers]
        teacher_layers = dict(zip(args.layers, mapping))
    stats = {}
    prompt = tok(PROMPT, return_tensors="pt").to(args.device)

    def generate(inject: bool, new_tokens: int):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id)
        if not inject:
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                return _timed(lambda: model.generate(**prompt, **kwargs), args.device)
        source = controllers if teacher is None else TeacherPrior(teacher, teacher_tok, tok, teacher_layers)
        injector = Injector(source, AlphaSpec(value=args.alpha), args.mode)
        with injector.attach(model), torch.no_grad():
            out = _timed(lambda: model.generate(**prompt, **kwargs), args.device)
        if teacher is not None:
            stats.update(teacher_tokens=source.teacher_tokens_run, restarts=source.restarts)
        return out

    for inject in (False, True):  # warm-up
        generate(inject, 4)
    best = {False: float("inf"), True: float("inf")}
    tokens = {}
    for round_ in range(args.rounds):
        for inject in (False, True):
            seconds, out = generate(inject, args.new_tokens)
            new = out.shape[1] - prompt["input_ids"].shape[1]
            tokens[inject] = out
            best[inject] = min(best[inject], seconds)
            print(f"  round {round_ + 1} {'injected' if inject else 'plain':>8}: {new / seconds:7.1f} tokens/s "
                  f"({seconds:.2f} s)", flush=True)
    rate = {k: args.new_tokens / v for k, v in best.items()}
    changed = int((tokens[False] != tokens[True]).sum())
    print(f"\n{args.model} on {args.device} ({args.dtype}), threads {torch.get_num_threads()}, "
          f"{args.new_tokens} new tokens, greedy; injection: layers {args.layers}, alpha {args.alpha}, "
          f"mode {args.mode}, source {args.source}"
          + (f" (teacher {args.teacher} layers {teacher_layers}; last run: {stats})" if teacher is not None
             else " (random bilinear controllers)"))
    print(f"{'plain tok/s':>12} | {'injected tok/s':>14} | {'ratio':>6} | tokens changed by injection")
    print(f"{rate[False]:>12.1f} | {rate[True]:>14.1f} | {rate[True] / rate[False]:>6.2f} | {changed}/{args.new_tokens}")


def _timed(fn, device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


if __name__ == "__main__":
    main()
