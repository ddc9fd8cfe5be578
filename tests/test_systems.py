"""A fifth system plugs in through the public registration points only: a package and a ``uzr.systems`` entry
point (tests/plugins/toy_system). Its config group is in the schema and validated, its stage is listed, planned
with the controller only when its option asks for it, and runs end to end through ``python -m uzr.train``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, offline_env

PLUGINS = Path(__file__).resolve().parent / "plugins"
TOY = ["+experiment=smoke", "stages=[toy]", "+toy=default", "logger=csv"]


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a subprocess in which the toy system is installed: its package on the path and its
    entry point in a distribution's metadata, as ``pip install`` of a package declaring it would leave them."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "toy_uzr_system-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-uzr-system\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[uzr.systems]\ntoy = toy_system\n")
    return offline_env(site, PYTHONPATH=f"{PLUGINS}:{site}")


def python(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(env: dict[str, str], tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return python(env, "-m", "uzr.train", *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
                  f"hydra.run.dir={tmp_path / 'run'}")


def test_the_framework_never_names_the_toy_system():
    named = [str(p.relative_to(ROOT)) for p in (ROOT / "uzr").rglob("*.py") if "toy_system" in p.read_text()]
    assert not named


def test_toy_stage_is_listed_and_its_config_group_is_in_the_schema(toy_env):
    out = python(toy_env, "-m", "uzr.stages").stdout
    row = next(line for line in out.splitlines() if line.startswith("toy "))
    assert row.split()[1:4] == ["+cfg", "toy,", "student"]  # no fixed need; the controller by the config
    assert "toy_system.stage:ToyStage; needs_when toy_system:toy_needs" in out
    code = ("import dataclasses, uzr.config as c, sys; print([f.name for f in dataclasses.fields(c.RunConfig)]); "
            "assert 'torch' not in sys.modules")
    fields = python(toy_env, "-c", code)
    assert fields.returncode == 0, fields.stderr
    assert "'adapt', 'toy', 'harvest'" in fields.stdout  # a selectable group, before the groups every run has


def test_the_controller_is_planned_and_built_only_when_the_toy_option_asks(toy_env):
    code = ("import json; from tests.conftest import resolved; from uzr.stages import builders, plan\n"
            "out = {}\n"
            "for flag in ('false', 'true'):\n"
            "    cfg = resolved('+experiment=smoke', 'stages=[toy]', '+toy=default', f'toy.inject={flag}')\n"
            "    out[flag] = [[s.name for s in plan(cfg.stages, cfg)], sorted(builders(cfg.stages, cfg))]\n"
            "print(json.dumps(out))")
    proc = python(toy_env, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = json.loads(proc.stdout.splitlines()[-1])
    assert plans["false"] == [["toy"], ["toy"]]
    assert plans["true"] == [["harvest", "controller", "toy"], ["controller", "harvest", "toy"]]


@pytest.mark.parametrize("overrides, message", [
    (["toy.layers=0"], "error: toy.layers=0 is invalid; valid: an integer in [1, 3]"),
    (["toy.layers=abc"], "error: Error merging override toy.layers=abc: Value 'abc' of type 'str' could not be "
                         "converted to Integer (key: toy.layers)"),
    (["~toy"], "error: stages ['toy'] read the 'toy' config group, which this config lacks; add toy=<option> "
               "(options: default) or drop those stages"),
    (["~controller", "toy.inject=true"], "read the 'controller' config group, which this config lacks; add "
     "controller=<option> (options: bilinear, lru, seed_mlp) or drop those stages (toy.inject=true reports the "
     "controller's layers)"),
], ids=["range", "type", "missing", "conditional"])
def test_a_bad_toy_config_fails_on_one_line(toy_env, tmp_path, overrides, message):
    # no experiment where a group is dropped: smoke's own keys would bring it back
    base = ["teacher=tiny_gemma3", "student=tiny_llama", "inject.layers=[1,2]", *TOY[1:]] if "~" in overrides[0] else TOY
    proc = train(toy_env, tmp_path, *base, *overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing built, nothing loaded


def test_toy_system_runs_end_to_end_with_and_without_the_controller(toy_env, tmp_path):
    plain = train(toy_env, tmp_path / "plain", *TOY)
    assert plain.returncode == 0, plain.stderr[-3000:]
    metrics = json.loads((tmp_path / "plain" / "run" / "metrics.json").read_text())
    sub = [name for name in metrics["artifacts"] if name.startswith("toy_per_layer/")]
    assert set(metrics["artifacts"]) == {"toy", *sub} and len(sub) == 1
    assert all(info["built"] for info in metrics["artifacts"].values())
    # tiny_llama's layer 0 (hidden 48, 4 heads of 12, 2 KV heads): q, o 48 x 48; k, v 48 x 24; MLP 3 x 48 x 96;
    # two norms of 48
    layer = 2 * 48 * 48 + 2 * 48 * 24 + 3 * 48 * 96 + 2 * 48
    assert metrics["toy"] == {"layer_parameters": layer, "per_layer": [layer], "controller_layers": None}

    again = train(toy_env, tmp_path / "plain", *TOY)  # the same cache: the stage and its sub-artifact are reused
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((tmp_path / "plain" / "run" / "metrics.json").read_text())
    assert set(reused["artifacts"]) == set(metrics["artifacts"]) and reused["toy"] == metrics["toy"]
    assert not any(info["built"] for info in reused["artifacts"].values())

    injected = train(toy_env, tmp_path / "injected", *TOY, "toy.inject=true")
    assert injected.returncode == 0, injected.stderr[-3000:]
    metrics = json.loads((tmp_path / "injected" / "run" / "metrics.json").read_text())
    assert [name.split("/")[0] for name in metrics["artifacts"]] == ["harvest", "controller", "toy", "toy_per_layer"]
    assert all(info["built"] for info in metrics["artifacts"].values())  # a conditional need builds when missing
    assert metrics["toy"]["controller_layers"] == [1, 2]  # smoke's inject.layers
