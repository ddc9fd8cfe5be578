"""Live demo: the gate value, its level, the alpha it applies and three answers side by side: the student's,
the student's with gated injection, and the teacher's own (for reference).

``python -m uzr.live +experiment=default`` opens an interactive prompt (rich output); ``--prompt
"What is the capital of France?"`` answers one prompt and exits; ``--json`` prints the same as JSON.
Other arguments are Hydra overrides, exactly as for ``uzr.train`` (``alpha.value=1.0``,
``gate=prompt``, ``paths.cache_dir=...``).

The config is composed like ``uzr.train`` (``conf/train.yaml`` + overrides) and validated before any
model loads. The harvest store, controller and gate come from the artifact cache; whichever is missing
is built by the stages themselves (:func:`uzr.runner.load_stages`) (the first call of a new configuration takes as long as
the stages do). The gate value of a prompt is the gate at its last token, from an uninjected student
pass; generation is greedy, up to the end of the first line of the answer, with alpha per injected
layer = ``alpha.value × alpha.layer_weights[l] × gate`` (schedule ``gated``; with
``alpha.entropy_local`` also × ``1 − normalised controller entropy`` per row, shown as its mean over
the prompt's rows). The gate's level is CONFIDENT / CAUTIOUS / WAFFLE by :func:`uzr.gate.confidence_level`;
where the prompt is one of the built-in ones (:mod:`uzr.qa.prompts`), each answer is also checked against the
fact tables (:func:`uzr.qa.answers.judge_known`). ``--no-teacher`` leaves the teacher out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from hydra import compose, initialize_config_dir  # noqa: E402  (after the environment, as every import below)
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from uzr.config import CONF_DIR, register_configs, resolve_config  # noqa: E402
from uzr.quiet import quiet_third_party  # noqa: E402

quiet_third_party()
# The imports inside the functions below bring torch and the models' code: they load once the config is valid, so a
# bad config or option fails in a second, before any of them.


def compose_config(overrides: list[str]):
    """Compose ``conf/train.yaml`` with Hydra overrides and validate it; returns ``RunConfig``."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="live"):
        cfg = compose("train", overrides=list(overrides))
    return resolve_config(cfg)


def ensure_artifacts(cfg, build: bool = True, loggers=None):
    """A :class:`~uzr.runner.RunContext` holding the harvest store, controller and gate of ``cfg`` from the
    cache, built where missing (``build``)."""
    from uzr.runner import ModelPool, RunContext, load_stages  # torch: once the config is valid (see the top)

    stages = ("harvest", "controller", "gate")
    with tempfile.TemporaryDirectory(prefix="uzr-live-") as tmp:
        run = RunContext(cfg, Path(tmp), ModelPool(cfg), loggers or [])
        load_stages(run, stages, build=stages if build else ())
    return run


class LiveSession:
    """Answers prompts with and without gated injection."""

    def __init__(self, cfg, run, max_new_tokens: int = 32, teacher: bool = True):
        # torch and the models' code: once the config is valid (see the top), as everywhere in this class
        import torch

        from uzr.controller.stage import ControllerStage
        from uzr.evaluate.injection import run_injection
        from uzr.gate.stage import GateStage

        self.cfg, self.run, self.max_new_tokens, self.with_teacher = cfg, run, max_new_tokens, teacher
        self.student, self.tok = run.models.get("student")
        self.controllers = run.upstream(ControllerStage).controllers
        self.gate = run.upstream(GateStage)
        self.layers = list(cfg.inject.layers)
        self.injection = run_injection(run)  # controllers and sinks (inject.sinks=keep), as in the evaluate stage
        self.torch = torch

    def alpha_spec(self):
        return self.cfg.alpha.variant("gated", self.cfg.alpha.value)

    def teacher_answer(self, prompt: str) -> dict | None:
        """The teacher's own greedy answer (formatted for its tokenizer), or None without the teacher."""
        if not self.with_teacher:
            return None
        # once the config is valid (see the top)
        from uzr.generation import generate_answers
        from uzr.qa.prompts import adds_special_tokens, format_prompt, resolve_format

        teacher, tok = self.run.models.get("teacher")
        style = resolve_format(tok, self.cfg.gate.prompt_format)
        return generate_answers(teacher, tok, [format_prompt(prompt, tok, style)], self.max_new_tokens, batch_size=1,
                                add_special_tokens=adds_special_tokens(style))[0]

    def answer(self, prompt: str) -> dict:
        # once the config is valid (see the top)
        from uzr.gate import confidence_level, sequence_parts
        from uzr.generation import generate_answers
        from uzr.injection.injector import alpha_rows
        from uzr.qa.answers import judge_known
        from uzr.qa.prompts import adds_special_tokens, format_prompt, resolve_format

        torch = self.torch
        spec = self.cfg.gate
        style = resolve_format(self.tok, spec.prompt_format)
        special = adds_special_tokens(style)
        text = format_prompt(prompt, self.tok, style)
        ids = list(self.tok(text, add_special_tokens=special)["input_ids"])
        parts = sequence_parts(self.student, self.controllers, [ids], self.layers)[0]
        gate = self.gate.prompt_value(parts)
        alpha = self.alpha_spec()
        # the alpha each layer gets: the schedule's own formula, at the prompt's mean controller entropy
        step, gate_t = torch.zeros(1), torch.tensor([[gate]])
        applied = {f"L{layer}": float(alpha_rows(alpha, layer, step, parts["ctrl_entropy"][:, i].mean().reshape(1, 1),
                                                 gate_t)) for i, layer in enumerate(self.layers)}
        plain = generate_answers(self.student, self.tok, [text], self.max_new_tokens, batch_size=1,
                                 add_special_tokens=special)[0]
        injector = self.injection.injector(prompt_len=None, alpha=alpha,
                                           gate=torch.tensor([[gate]], device=next(self.student.parameters()).device))
        injected = generate_answers(self.student, self.tok, [text], self.max_new_tokens, batch_size=1,
                                    injector=injector, add_special_tokens=special)[0]
        teacher = self.teacher_answer(prompt)
        answers = {"student": plain["answer"], "injected": injected["answer"],
                   "teacher": teacher["answer"] if teacher else None}
        return {
            "prompt": prompt, "formatted_prompt": text, "gate": gate, "gate_level": self.gate.level,
            "confidence": confidence_level(gate),
            "alpha": applied, "alpha_base": alpha.value, "schedule": "gated", "mode": self.cfg.inject.mode,
            "entropy_local": alpha.entropy_local, "sinks": self.cfg.inject.sinks,
            "answers": answers,
            "fact_check": judge_known(prompt, {k: v for k, v in answers.items() if v is not None}),
            "student_mean_entropy": {"student": plain["mean_entropy"], "injected": injected["mean_entropy"]},
            "student": self.cfg.student.name, "teacher": self.cfg.teacher.name,
            "artifacts": self.run.artifact_records(),
        }


def render(result: dict, console) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table

    table = Table(show_header=True, title=f"[bold]{result['prompt']}[/bold]")
    table.add_column("gate (P teacher confident)", justify="right")
    table.add_column("level")
    for layer in result["alpha"]:
        table.add_column(f"alpha {layer}", justify="right")
    colour = {"CONFIDENT": "green", "CAUTIOUS": "yellow"}.get(result["confidence"], "red")
    table.add_row(f"[{colour}]{result['gate']:.3f}[/{colour}]", f"[{colour}]{result['confidence']}[/{colour}]",
                  *(f"{v:.3f}" for v in result["alpha"].values()))
    console.print(table)
    titles = {"student": f"{result['student']} (no injection)",
              "injected": f"+ injection ({result['alpha_base']:g} x gate, {result['mode']})",
              "teacher": f"{result['teacher']} (teacher, reference)"}
    checks = (result.get("fact_check") or {}).get("verdicts", {})
    panels = []
    for role, title in titles.items():
        text = result["answers"].get(role)
        if text is None:
            continue
        # the verdict first: a long title is cut at the panel's width
        mark = {True: "[green]right[/green] · ", False: "[red]wrong[/red] · "}.get(checks.get(role, {}).get("correct"), "")
        panels.append(Panel(text or "[dim](empty)[/dim]", title=mark + title, width=50))
    console.print(Columns(panels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uzr.live", description="Gate value, applied alpha and the student's answer with and "
        "without injection. Other arguments are Hydra overrides (e.g. +experiment=default alpha.value=1.0).")
    parser.add_argument("--prompt", help="answer this prompt and exit (otherwise: interactive)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of rich output")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-teacher", action="store_true", help="leave the teacher's reference answer out")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--")]
    if bad:
        parser.error(f"unknown option(s) {bad}")
    try:
        cfg = compose_config(overrides)  # fails before any model loads
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from rich.console import Console

    console = Console(stderr=args.json)
    # Stage output (Lightning, progress) goes to stderr so that --json leaves stdout clean.
    with contextlib.redirect_stdout(sys.stderr):
        session = LiveSession(cfg, ensure_artifacts(cfg), args.max_new_tokens, teacher=not args.no_teacher)
    if args.prompt is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = session.answer(args.prompt)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            render(result, console)
        return 0
    console.print(f"[bold]uzr live[/bold]: {cfg.teacher.name} -> {cfg.student.name}, layers {list(cfg.inject.layers)}, "
                  f"{session.gate.level}-level gate ({session.gate.report().get('verdict', '')})")
    console.print("Type a prompt (empty line or Ctrl-D to quit).")
    while True:
        try:
            prompt = console.input("[bold cyan]> [/bold cyan]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not prompt or prompt in ("quit", "exit"):
            break
        result = session.answer(prompt)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            render(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
