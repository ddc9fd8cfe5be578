"""The toy stage: counts the parameters of the student's leading ``toy.layers`` decoder layers (cached), keeps the
count of each layer as a sub-artifact (``run.artifact``), and reports them, with the layers of the controller the
runner planned for it when ``toy.inject=true``."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from uzr.config.keys import key_of
from uzr.controller.stage import ControllerStage

LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_parameters(model, layers: int) -> dict[int, int]:
    """Parameters of each of the model's leading ``layers`` decoder layers."""
    counts = Counter()
    for name, p in model.named_parameters():
        if (m := LAYER.search(name)) and int(m.group(1)) < layers:
            counts[int(m.group(1))] += p.numel()
    return dict(sorted(counts.items()))


class ToyStage:
    def key_payload(self, cfg, upstream) -> dict:
        return {"toy": key_of(cfg.toy, "toy"), "student": cfg.student.name, "upstream": dict(upstream)}

    def build(self, run, folder: Path) -> dict:
        model, _ = run.models.get("student")
        count = sum(layer_parameters(model, run.cfg.toy.layers).values())
        (folder / "toy.json").write_text(json.dumps({"layer_parameters": count}))
        return {}

    def load(self, run, folder: Path) -> dict:
        return json.loads((folder / "toy.json").read_text())

    def report(self, run, artifact: dict) -> dict:
        cfg = run.cfg

        def build(folder: Path) -> None:
            counts = layer_parameters(run.models.get("student")[0], cfg.toy.layers)
            (folder / "per_layer.json").write_text(json.dumps(list(counts.values())))

        folder, _ = run.artifact("toy_per_layer", {"student": cfg.student.name, "layers": cfg.toy.layers}, build,
                                 version=1)
        per_layer = json.loads((folder / "per_layer.json").read_text())
        controllers = run.upstream(ControllerStage).controllers if cfg.toy.inject else None
        return {**artifact, "per_layer": per_layer,
                "controller_layers": sorted(controllers) if controllers is not None else None}
