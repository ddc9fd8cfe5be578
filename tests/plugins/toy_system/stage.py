"""The toy stage: counts the parameters of the student's leading ``toy.layers`` decoder layers (cached) and reports
them, with the layers of the controller the runner planned for it when ``toy.inject=true``."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path


class ToyStage:
    def key_payload(self, cfg, upstream) -> dict:
        return {"toy": dataclasses.asdict(cfg.toy), "student": cfg.student.name, "upstream": dict(upstream)}

    def build(self, run, folder: Path) -> dict:
        model, _ = run.models.get("student")
        layer = re.compile(r"\.layers\.(\d+)\.")
        count = sum(p.numel() for name, p in model.named_parameters()
                    if (m := layer.search(name)) and int(m.group(1)) < run.cfg.toy.layers)
        (folder / "toy.json").write_text(json.dumps({"layer_parameters": count}))
        return {}

    def load(self, run, folder: Path) -> dict:
        return json.loads((folder / "toy.json").read_text())

    def report(self, run, artifact: dict) -> dict:
        controller = run.artifacts.get("controller")
        # TODO(sub-artifact): once RunContext.artifact(kind, payload, build) exists (branch `artifacts`), store one
        # sub-artifact here (e.g. the per-layer counts keyed by layer) and assert in tests/test_systems.py that a
        # second run reuses it.
        return {**artifact, "controller_layers": sorted(controller.controllers) if controller is not None else None}
