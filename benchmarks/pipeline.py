"""Each stage of the pipeline beside the plain work it has to do: harvest, facts QA, text evaluation.

In one process, on the models of an experiment (``--experiment smoke``: the tiny random pair, seconds;
``--experiment default``: the packaged Gemma 3 270M -> SmolLM2-135M pair), this measures wall time and
throughput of:

- **harvest**: :class:`~uzr.harvest.harvester.Harvester` over ``--texts`` corpus texts (tokens/s, teacher +
  student tokens) vs a plain forward of the same sequences: teacher and student decoder stacks (sdpa, no
  recorder) plus the teacher's LM head over every position (the harvest needs its next-token statistics);
- **facts QA** (prompts/s), for teacher, student and injected student: the previous scoring (one prompt per
  pass: its 4 candidates as a right-padded batch of full sequences) vs :func:`uzr.qa.facts.qa_scores`
  (``--qa-batch`` prompts per pass; plain models share prefixes through the KV cache), both vs a plain
  batched forward of the same candidate sequences (decoder only, ``4 * --qa-batch`` rows per pass);
  the maximum score difference between old and new and the number of flipped decisions are printed;
- **evaluation** (texts/s): :func:`uzr.evaluate.texts.score_settings` over the harvested texts for
  ``none``, ``constant@0.5`` and ``constant@1`` vs a plain student forward of the same texts per setting.

The controller is freshly initialised (seeded): its predictions are meaningless but cost what a trained
one costs. Cases are interleaved over ``--rounds`` and the fastest time is kept, so a load that drifts
during the run hits both sides of a ratio alike. Quote the machine and its load (printed) with the figures.

Usage::

    .venv/bin/python benchmarks/pipeline.py                                # smoke pair, seconds
    .venv/bin/python benchmarks/pipeline.py --experiment default --threads 1 --texts 8 --prompts 32
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from uzr.config import register_configs, resolve_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return resolve_config(hydra_compose("train", overrides=[f"+experiment={experiment}", *overrides]))


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def fastest(times: dict, clock: str, name: str, fn, *args):
    """Run ``fn(*args)`` once, keep the fastest time under ``name``; returns its result."""
    start = CLOCK[clock]()
    out = fn(*args)
    elapsed = CLOCK[clock]() - start
    times[name] = min(times.get(name, float("inf")), elapsed)
    print(f"  {name}: {elapsed:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="smoke", help="smoke (tiny random pair) or default (packaged pair)")
    parser.add_argument("--texts", type=int, default=8, help="corpus texts to harvest and evaluate")
    parser.add_argument("--prompts", type=int, default=0, help="held-out QA prompts (0 = all)")
    parser.add_argument("--qa-batch", type=int, default=None, help="prompts per pass (default: evaluate.qa_batch_size)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="cpu: CPU seconds of the process (with --threads 1, robust to other jobs on the machine)")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default: paths.cache_dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. harvest.max_length=64")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from uzr.attention import decoder_of
    from uzr.controller import ControllerSpec, build_controller
    from uzr.corpus import load_run_corpus
    from uzr.evaluate.texts import PLAIN, injection_setting, score_settings
    from uzr.harvest.harvester import Harvester
    from uzr.harvest.stage import harvest_layers
    from uzr.injection.setup import Injection
    from uzr.masks import pad_sequences
    from uzr.models import load_model
    from uzr.next_token import lm_head_logits
    from uzr.qa.facts import candidate_rows, qa_prompts, qa_scores, score_candidates
    from uzr.qa.prompts import adds_special_tokens, answer_prefix, format_prompt, resolve_format

    overrides = list(args.overrides) + ([f"paths.cache_dir={args.cache_dir}"] if args.cache_dir else [])
    cfg = compose(args.experiment, overrides)
    teacher, teacher_tok = load_model(cfg.teacher, cache_dir=cfg.cache_dir, role="teacher")
    student, student_tok = load_model(cfg.student, cache_dir=cfg.cache_dir, role="student")
    qa_batch = args.qa_batch or cfg.evaluate.qa_batch_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}")
    print(f"pair: {cfg.teacher.name} -> {cfg.student.name}; {args.texts} texts (max {cfg.harvest.max_length} "
          f"tokens), QA batch {qa_batch} prompts, {args.rounds} rounds (fastest kept), {args.clock} clock")

    texts = list(load_run_corpus(cfg.data, lambda: student_tok, cfg.harvest.max_length).train["text"])[:args.texts]
    layers, mapping = harvest_layers(cfg)
    torch.manual_seed(0)
    spec = ControllerSpec(**{k: getattr(cfg.controller, k) for k in ("arch", "key_dim", "mlp_hidden")
                             if hasattr(cfg.controller, k)})
    ctrls = {layer: build_controller(spec, student.config.hidden_size).eval() for layer in cfg.inject.layers}
    injection = Injection(ctrls, cfg.alpha.variant("constant", 0.5), cfg.inject.mode)  # random controllers, no sinks

    def harvest():
        h = cfg.harvest
        harvester = Harvester(teacher, teacher_tok, student, student_tok, layers, mapping, h.locality_window,
                              h.block_size, h.max_length, h.max_dist_len)
        try:
            return [harvester(t) for t in texts]
        finally:
            harvester.close()

    rows = harvest()  # also sets the models to the uzr attention function, as in a run
    s_ids = [torch.as_tensor(r["input_ids"], dtype=torch.long)[None] for r in rows]
    t_ids = [teacher_tok(t, return_tensors="pt", truncation=True, max_length=4 * cfg.harvest.max_length)["input_ids"]
             for t in texts]
    t_ids = [ids[:, :int(r["teacher_len"])] for ids, r in zip(t_ids, rows)]
    tokens = sum(x.shape[1] for x in s_ids) + sum(x.shape[1] for x in t_ids)

    @torch.no_grad()
    def plain_forward():
        for t, s in zip(t_ids, s_ids):
            final = decoder_of(teacher)(input_ids=t).last_hidden_state[0]
            for start in range(0, final.shape[0], 128):
                lm_head_logits(teacher, final[start:start + 128])
            decoder_of(student)(input_ids=s)

    # --- facts QA inputs
    prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, args.prompts)

    def rows_of(tok):
        style = resolve_format(tok, cfg.gate.prompt_format)
        return [candidate_rows(tok, format_prompt(p.question, tok, style), p.candidates, answer_prefix(style),
                               adds_special_tokens(style)) for p in prompts]

    groups = {"teacher": rows_of(teacher_tok), "student": rows_of(student_tok)}
    models = {"teacher": (teacher, teacher_tok), "student": (student, student_tok)}

    def make_injector(rows=None):
        return injection.injector(prompt_len=0)

    def old_qa(role, edit=False):  # the previous scoring: one prompt per pass, full right-padded sequences
        model, tok = models[role]
        return [score_candidates(model, [g], tok.pad_token_id or 0, make_injector() if edit else None,
                                 share_prefix=False)[0] for g in groups[role]]

    def new_qa(role, edit=False):
        model, tok = models[role]
        return qa_scores(model, tok, prompts, cfg.gate.prompt_format, make_injector if edit else None, qa_batch)

    @torch.no_grad()
    def plain_qa_forward(role):
        model, tok = models[role]
        flat = [r.ids for g in groups[role] for r in g]
        for start in range(0, len(flat), 4 * qa_batch):
            ids, mask = pad_sequences(flat[start:start + 4 * qa_batch], tok.pad_token_id or 0)
            decoder_of(model)(input_ids=ids, attention_mask=mask.long())

    # --- evaluation on the harvested texts
    settings = [PLAIN, injection_setting("constant@0.5", injection),
                injection_setting("constant@1", injection, alpha=cfg.alpha.variant("constant", 1.0))]

    def evaluate():
        return score_settings(student, student_tok, rows, settings, list(cfg.inject.layers),
                              cfg.harvest.locality_window, cfg.harvest.max_length, desc="evaluate")

    @torch.no_grad()
    def plain_eval_forward():
        for _ in settings:
            for s in s_ids:
                decoder_of(student)(input_ids=s)

    times: dict[str, float] = {}
    results = {}
    for _ in range(args.rounds):
        fastest(times, args.clock, "harvest", harvest)
        fastest(times, args.clock, "harvest plain", plain_forward)
        for role, edit in (("student", False), ("teacher", False), ("student", True)):
            name = f"{role}{' injected' if edit else ''}"
            results[f"old {name}"] = fastest(times, args.clock, f"qa old {name}", old_qa, role, edit)
            results[f"new {name}"] = fastest(times, args.clock, f"qa new {name}", new_qa, role, edit)
        for role in ("student", "teacher"):
            fastest(times, args.clock, f"qa plain {role}", plain_qa_forward, role)
        fastest(times, args.clock, "evaluate", evaluate)
        fastest(times, args.clock, "evaluate plain", plain_eval_forward)

    n = len(prompts)
    print(f"\n{'stage':<26}{args.clock + ' s':>9}{'throughput':>20}{'plain s':>9}{'stage/plain':>12}")
    print(f"{'harvest':<26}{times['harvest']:>9.2f}{tokens / times['harvest']:>14.0f} tok/s"
          f"{times['harvest plain']:>9.2f}{times['harvest'] / times['harvest plain']:>12.2f}")
    for name in ("student", "teacher", "student injected"):
        plain = times[f"qa plain {name.split()[0]}"]
        for kind in ("old", "new"):
            t = times[f"qa {kind} {name}"]
            print(f"{'facts QA ' + kind + ' ' + name:<26}{t:>9.2f}{n / t:>11.1f} prompt/s{plain:>9.2f}{t / plain:>12.2f}")
    print(f"{'evaluate (3 settings)':<26}{times['evaluate']:>9.2f}{len(rows) / times['evaluate']:>12.2f} text/s"
          f"{times['evaluate plain']:>9.2f}{times['evaluate'] / times['evaluate plain']:>12.2f}")
    print("\nfacts QA, new vs old scoring (same prompts):")
    for name in ("student", "teacher", "student injected"):
        old, new = results[f"old {name}"], results[f"new {name}"]
        diff = max(abs(a - b) for x, y in zip(old, new) for a, b in zip(x, y))
        flips = sum(max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__)
                    for x, y in zip(old, new))
        speed = times[f"qa old {name}"] / times[f"qa new {name}"]
        print(f"  {name:<18} speed-up x{speed:.1f}; max |score difference| {diff:.2e} nats; {flips} of {n} decisions flipped")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
