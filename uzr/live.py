"""Live demo: the gate value, the alpha it applies and the student's answer with and without injection.

``python -m uzr.live +experiment=default`` opens an interactive prompt (rich output); ``--prompt
"What is the capital of France?"`` answers one prompt and exits; ``--json`` prints the same as JSON.
Other arguments are Hydra overrides, exactly as for ``uzr.train`` (``alpha.value=1.0``,
``gate=prompt``, ``cache_dir=...``).

The config is composed like ``uzr.train`` (``conf/train.yaml`` + overrides) and validated before any
model loads. The harvest store, controller and gate come from the artifact cache; whichever is missing
is built by the pipeline's own stage functions (the first call of a new configuration takes as long as
the stages do). The gate value of a prompt is the gate at its last token, from an uninjected student
pass; generation is greedy, up to the end of the first line of the answer, with alpha per injected
layer = ``alpha.value × alpha.layer_weights[l] × gate`` (schedule ``gated``; with
``alpha.entropy_local`` also × ``1 − normalised controller entropy`` per row, shown as its mean over
the prompt's rows).
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

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]):
    """Compose ``conf/train.yaml`` with Hydra overrides and validate it; returns ``RunConfig``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from uzr.config import resolve_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="live"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.cwd} in cache_dir
    with open_dict(cfg):
        del cfg["hydra"]
    return resolve_config(cfg)


def ensure_artifacts(cfg, models, loggers=None, build: bool = True):
    """Harvest store, controller and gate of ``cfg`` from the cache, built where missing (``build``)."""
    from uzr.pipeline import load_artifacts

    with tempfile.TemporaryDirectory(prefix="uzr-live-") as tmp:
        stages = ("harvest", "controller", "gate")
        return load_artifacts(cfg, models, loggers or [], Path(tmp), stages, build=stages if build else ())


class LiveSession:
    """Answers prompts with and without gated injection."""

    def __init__(self, cfg, models, artifacts, max_new_tokens: int = 32):
        import torch

        self.cfg, self.models, self.art, self.max_new_tokens = cfg, models, artifacts, max_new_tokens
        self.student, self.tok = models.get("student")
        device = next(self.student.parameters()).device
        self.controllers = {int(k): v.to(device).eval() for k, v in artifacts.controllers.items()}
        self.layers = list(cfg.inject.layers)
        self.torch = torch

    def alpha_spec(self):
        from uzr.inject import AlphaSpec

        a = self.cfg.alpha
        return AlphaSpec("gated", a.value, entropy_local=a.entropy_local, layer_weights=dict(a.layer_weights))

    def answer(self, prompt: str) -> dict:
        from uzr.gate import generate_answers, sequence_parts
        from uzr.inject import Injector
        from uzr.prompts import adds_special_tokens, format_prompt, resolve_format

        torch = self.torch
        spec = self.cfg.gate
        style = resolve_format(self.tok, spec.prompt_format)
        special = adds_special_tokens(style)
        text = format_prompt(prompt, self.tok, style)
        ids = list(self.tok(text, add_special_tokens=special)["input_ids"])
        parts = sequence_parts(self.student, self.controllers, [ids], self.layers)[0]
        gate = self.art.gate.prompt_value(parts)
        alpha = self.alpha_spec()
        applied = {}
        for i, layer in enumerate(self.layers):
            value = alpha.value * alpha.layer_weights.get(layer, 1.0) * gate
            if alpha.entropy_local:
                value *= float((1 - parts["ctrl_entropy"][:, i]).mean())
            applied[f"L{layer}"] = value
        plain = generate_answers(self.student, self.tok, [text], self.max_new_tokens, batch_size=1,
                                 add_special_tokens=special)[0]
        injector = Injector(self.controllers, alpha, self.cfg.inject.mode, prompt_len=None)
        injector.gate = torch.tensor([[gate]], device=next(self.student.parameters()).device)
        injected = generate_answers(self.student, self.tok, [text], self.max_new_tokens, batch_size=1,
                                    injector=injector, add_special_tokens=special)[0]
        return {
            "prompt": prompt, "formatted_prompt": text, "gate": gate, "gate_level": self.art.gate.level,
            "alpha": applied, "alpha_base": alpha.value, "schedule": "gated", "mode": self.cfg.inject.mode,
            "entropy_local": alpha.entropy_local,
            "answers": {"student": plain["answer"], "injected": injected["answer"]},
            "student_mean_entropy": {"student": plain["mean_entropy"], "injected": injected["mean_entropy"]},
            "student": self.cfg.student.name, "teacher": self.cfg.teacher.name,
            "artifacts": self.art.info,
        }


def render(result: dict, console) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table

    table = Table(show_header=True, title=f"[bold]{result['prompt']}[/bold]")
    table.add_column("gate (P teacher confident)", justify="right")
    for layer in result["alpha"]:
        table.add_column(f"alpha {layer}", justify="right")
    gate = result["gate"]
    colour = "green" if gate >= 0.5 else "yellow" if gate >= 0.25 else "red"
    table.add_row(f"[{colour}]{gate:.3f}[/{colour}]", *(f"{v:.3f}" for v in result["alpha"].values()))
    console.print(table)
    console.print(Columns([
        Panel(result["answers"]["student"] or "[dim](empty)[/dim]", title=f"{result['student']} (no injection)",
              width=60),
        Panel(result["answers"]["injected"] or "[dim](empty)[/dim]",
              title=f"+ gated injection (alpha {result['alpha_base']:g} x gate, {result['mode']})", width=60),
    ]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uzr.live", description="Gate value, applied alpha and the student's answer with and "
        "without injection. Other arguments are Hydra overrides (e.g. +experiment=default alpha.value=1.0).")
    parser.add_argument("--prompt", help="answer this prompt and exit (otherwise: interactive)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of rich output")
    parser.add_argument("--max-new-tokens", type=int, default=32)
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

    from uzr.pipeline import ModelPool

    console = Console(stderr=args.json)
    models = ModelPool(cfg)
    # Stage output (Lightning, progress) goes to stderr so that --json leaves stdout clean.
    with contextlib.redirect_stdout(sys.stderr):
        artifacts = ensure_artifacts(cfg, models)
        session = LiveSession(cfg, models, artifacts, args.max_new_tokens)
    if args.prompt is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = session.answer(args.prompt)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            render(result, console)
        return 0
    console.print(f"[bold]uzr live[/bold]: {cfg.teacher.name} -> {cfg.student.name}, layers {list(cfg.inject.layers)}, "
                  f"{artifacts.gate.level}-level gate ({artifacts.gate.report().get('verdict', '')})")
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
