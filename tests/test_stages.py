"""The stage registry, the runner and the torch-free schema: what a new system plugs into."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uzr.stages import REGISTRY, StageInfo, groups_read, plan

from .conftest import CONF, ROOT, resolved


def test_config_imports_no_torch():
    code = "import uzr.config, uzr.stages, sys; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_stages_cli_lists_every_stage_with_needs_and_groups():
    out = subprocess.run([sys.executable, "-m", "uzr.stages"], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and line.split()[0] in REGISTRY}
    assert set(lines) == {"harvest", "controller", "gate", "evaluate", "dominance", "svf", "svf_baselines", "svf_eval",
                          "adapt", "lru_mla", "lru_mla_pretrained"}
    assert lines["controller"].split()[1] == "harvest" and "inject?" in lines["harvest"]
    for name, info in REGISTRY.items():
        assert all(group in lines[name] for group in info.reads)


def test_plan_adds_needed_stages_in_dependency_order():
    assert [s.name for s in plan(["evaluate"])] == ["harvest", "controller", "evaluate"]
    assert [s.name for s in plan(["evaluate", "gate"])] == ["harvest", "controller", "gate", "evaluate"]
    assert [s.name for s in plan(["harvest"])] == ["harvest"]
    required, optional = groups_read(["harvest"])
    assert "controller" not in required and "alpha" not in required and optional == {"inject"}
    with pytest.raises(ValueError, match=r"unknown \['train'\]; valid stages: harvest, controller, gate, evaluate"):
        plan(["train"])


def test_cycles_are_named(monkeypatch):
    monkeypatch.setitem(REGISTRY, "a", StageInfo("a", ("b",), (), 1, "x:y"))
    monkeypatch.setitem(REGISTRY, "b", StageInfo("b", ("a",), (), 1, "x:y"))
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        plan(["a"])


TINY = ["teacher=tiny_gemma3", "student=tiny_llama"]  # no experiment: smoke sets inject and controller keys
# no injection groups at all
NO_INJECTION = [*TINY, "stages=[harvest]", "~inject", "~alpha", "~controller",
                "~gate", "harvest.layers=[1]", "harvest.max_length=48", "data.num_texts=6", "data.max_chars=400"]


def test_a_run_without_injection_is_a_valid_config():
    cfg = resolved(*NO_INJECTION)
    assert cfg.inject is None and cfg.controller is None and cfg.harvest.layers == [1]


def test_only_the_groups_a_stage_reads_are_validated():
    # the controller group is not read by a harvest-only run: its bad value does not matter there ...
    assert resolved("+experiment=smoke", "stages=[harvest]", "controller.lr=-1").controller.lr == -1
    # ... and fails as soon as a selected stage reads it
    with pytest.raises(ValueError, match=r"controller.lr=-1.0 is invalid"):
        resolved("+experiment=smoke", "stages=[controller]", "controller.lr=-1")
    with pytest.raises(ValueError, match=r"read the 'controller' config group.*options: bilinear, lru, seed_mlp"):
        resolved(*TINY, "inject.layers=[1,2]", "stages=[controller]", "~controller")
    with pytest.raises(ValueError, match=r"set harvest.layers=\[...\] or select an inject group"):
        resolved(*TINY, "stages=[harvest]", "~inject")


def test_locality_window_has_one_source():
    cfg = resolved("+experiment=smoke", "harvest.locality_window=5")
    assert cfg.controller.locality_window == 5  # the controller's loss follows the harvest
    with pytest.raises(ValueError, match=r"controller.locality_window=4 differs from harvest.locality_window=8"):
        resolved("+experiment=smoke", "controller.locality_window=4")


SCHEMA = {"alpha": "AlphaSpec", "controller": "ControllerSpec", "gate": "GateSpec", "inject": "InjectSpec",
          "trainer": "TrainerSpec", "logger": "LoggerSpec", "data": "CorpusSpec", "paths": "PathsSpec",
          "dominance": "DominanceSpec"}
NAMING_KEYS = {"arch", "schedule", "label", "source", "name", "accelerator", "wandb"}  # name the option itself


@pytest.mark.parametrize("group", sorted(SCHEMA))
def test_yaml_holds_only_what_differs_from_the_schema(group):
    import uzr.config as config

    schema = getattr(config, SCHEMA[group])
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(schema)}
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        restated = [k for k, v in values.items() if k in defaults and k not in NAMING_KEYS and v == defaults[k]]
        assert not restated, f"{path.relative_to(ROOT)} restates schema defaults {restated}"


def test_a_new_stage_is_a_module_and_a_registry_line(tmp_path, monkeypatch):
    """A toy stage registered with one line is keyed, built once, reused and reported by the runner."""
    from uzr.runner import ModelPool, RunContext, artifact_keys, load_stages

    monkeypatch.setitem(REGISTRY, "toy", StageInfo("toy", (), ("data",), 1, f"{__name__}:ToyStage"))
    cfg = resolved("+experiment=smoke", "stages=[toy]", f"paths.cache_dir={tmp_path}")
    run = RunContext(cfg, tmp_path / "run", ModelPool(cfg))
    load_stages(run, ["toy"])
    assert run.info["toy"]["built"] and run.artifacts["toy"] == {"num_texts": cfg.data.num_texts}
    assert run.info["toy"]["key"] == artifact_keys(cfg, ["toy"])["toy"]
    again = RunContext(cfg, tmp_path / "run2", ModelPool(cfg))
    load_stages(again, ["toy"])
    assert not again.info["toy"]["built"] and again.artifacts["toy"] == run.artifacts["toy"]
    other = resolved("+experiment=smoke", "stages=[toy]", "data.num_texts=7", f"paths.cache_dir={tmp_path}")
    assert artifact_keys(other, ["toy"]) != artifact_keys(cfg, ["toy"])  # the key follows the groups it reads


class ToyStage:
    def key_payload(self, cfg, upstream):
        return {"data": dataclasses.asdict(cfg.data)}

    def build(self, run, folder: Path) -> dict:
        (folder / "toy.json").write_text(json.dumps({"num_texts": run.cfg.data.num_texts}))
        return {}

    def load(self, run, folder: Path):
        return json.loads((folder / "toy.json").read_text())

    def report(self, run, artifact):
        return artifact


def test_harvest_only_run_without_injection_groups(tmp_path):
    """python -m uzr.train with no inject/alpha/controller/gate groups harvests and writes metrics.json."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "uzr.train", *NO_INJECTION, "logger=csv", f"paths.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"name", "artifacts", "timing"} and metrics["artifacts"]["harvest"]["built"]
    assert set(metrics["timing"]) == {"harvest"} and metrics["timing"]["harvest"]["cpu_s"] > 0  # the stage's build
    assert (Path(metrics["artifacts"]["harvest"]["path"]) / "layout.json").exists()


def test_a_need_that_depends_on_settings_is_planned_and_built_only_then():
    from uzr.stages import builders

    injected = resolved("+experiment=dominance_text")  # dominance.models includes "injected"
    assert [s.name for s in plan(injected.stages, injected)] == ["harvest", "controller", "dominance"]
    assert builders(injected.stages, injected) == {"harvest", "controller", "dominance"}  # built when missing
    plain = resolved("+experiment=dominance_text", "dominance.models=[teacher,student]")
    assert [s.name for s in plan(plain.stages, plain)] == ["dominance"]
    svf = resolved("+experiment=svf_compare")  # svf.injection=true: the injection row needs the controller
    assert [s.name for s in plan(svf.stages, svf)] == ["svf", "svf_baselines", "harvest", "controller", "svf_eval"]
    assert builders(["controller", "evaluate"], svf) == {"controller", "evaluate"}  # a fixed need must be cached


def test_a_fixed_need_that_settings_do_without_is_left_out_of_the_plan():
    """The evaluate stage needs the controller (and the harvest behind it) unless emphasis steers alone."""
    def planned(*overrides):
        cfg = resolved("+experiment=smoke", "stages=[evaluate]", *overrides)
        return [s.name for s in plan(cfg.stages, cfg)]

    assert planned() == ["harvest", "controller", "evaluate"]
    assert planned("inject.source=emphasis") == ["evaluate"]
    assert planned("inject.source=emphasis", "inject.heads=auto") == ["evaluate"]  # profiled with emphasis
    assert planned("inject.source=emphasis", "inject.sinks=keep") == ["harvest", "controller", "evaluate"]
    assert planned("inject.source=emphasis", "inject.heads=auto", "inject.profile_source=controller") == [
        "harvest", "controller", "evaluate"]
