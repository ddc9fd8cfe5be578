"""Hydra multirun sweeps: artifact reuse, concurrent jobs, sweep folders, W&B runs, the ablation grid.

The sweeps run the CLI in a subprocess on the smoke experiment (tiny random models); one 3-value alpha
sweep is shared by several tests (module-scoped fixture) to keep the suite short.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, offline_env

SMOKE_ALPHAS = (0, 0.5, 1)


def env_for(tmp: Path) -> dict:
    # The cache goes through $UZR_CACHE (cache_dir's default), so it is no job override.
    return offline_env(tmp, UZR_CACHE=str(tmp / "cache"))


def multirun(tmp: Path, *overrides: str, sweep: str | None = "sweep", cwd: Path = ROOT,
             timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "uzr.train", "-m", *overrides]
    if sweep is not None:
        cmd.append(f"hydra.sweep.dir={tmp / sweep}")
    return subprocess.run(cmd, cwd=cwd, env=env_for(tmp), capture_output=True, text=True, timeout=timeout)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p.parent for p in sweep.rglob("metrics.json")), key=lambda p: int(p.name.split("-")[0]))


def artifacts(cache: Path, kind: str) -> list[Path]:
    """Completed artifact folders of one kind (not the lock files, nor an unfinished ``.partial``)."""
    return sorted(p for p in (cache / kind).iterdir() if p.is_dir() and not p.name.endswith(".partial"))


def wandb_run_record(run_dir: Path):
    """The run record (name, group, config) of an offline W&B run, read from its ``run-*.wandb`` log."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    block, pos, pending = 32768, 7, b""  # file header: ":W&B", magic (2), version (1)
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {run_dir}")


@pytest.fixture(scope="module")
def alpha_sweep(tmp_path_factory):
    """`-m +experiment=smoke alpha.value=0,0.5,1` with a fresh cache: (tmp, sweep dir, job dirs)."""
    tmp = tmp_path_factory.mktemp("alpha_sweep")
    proc = multirun(tmp, "+experiment=smoke", "alpha.value=" + ",".join(map(str, SMOKE_ALPHAS)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_dirs(tmp / "sweep")
    assert len(jobs) == len(SMOKE_ALPHAS), [str(j) for j in jobs]
    return tmp, tmp / "sweep", jobs


def load_metrics(jobs: list[Path]) -> list[dict]:
    return [json.loads((job / "metrics.json").read_text()) for job in jobs]


def test_alpha_sweep_builds_one_store_and_one_controller(alpha_sweep):
    from uzr.cache import verify

    tmp, _, jobs = alpha_sweep
    metrics = load_metrics(jobs)
    for kind in ("harvest", "controller"):
        records = [m["artifacts"][kind] for m in metrics]
        assert sum(r["built"] for r in records) == 1, (kind, records)
        assert records[0]["built"], "the first job builds, the later ones reuse"
        assert len({r["key"] for r in records}) == 1, records
        folders = artifacts(tmp / "cache", kind)
        assert [f.name for f in folders] == [records[0]["key"]], folders
        verify(folders[0])
    assert not list((tmp / "cache").rglob("*.partial"))


def test_alpha_zero_is_the_uninjected_student_exactly(alpha_sweep):
    _, _, jobs = alpha_sweep
    for job, alpha in zip(jobs, SMOKE_ALPHAS):  # jobs are in sweep order
        assert job.name.endswith(f"alpha.value={alpha}")
    bpb = {alpha: m["evaluate"]["bits_per_byte"] for alpha, m in zip(SMOKE_ALPHAS, load_metrics(jobs))}
    assert bpb[0]["injected"] == bpb[0]["student"]
    assert bpb[1]["injected"] != bpb[1]["student"]
    # the no-injection baseline and the teacher are the same texts in every job
    assert len({b["student"] for b in bpb.values()}) == 1 and len({b["teacher"] for b in bpb.values()}) == 1


def test_one_wandb_run_per_job_grouped_by_sweep_and_named_by_overrides(alpha_sweep):
    _, sweep, jobs = alpha_sweep
    ids = set()
    for job, alpha in zip(jobs, SMOKE_ALPHAS):
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        run = wandb_run_record(runs[0])
        ids.add(run.run_id)
        assert run.run_group == sweep.name
        assert run.display_name == f"smoke:alpha.value={alpha}"
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["alpha.value"] == alpha and config["inject.layers"] == "[1,2]", config
        assert "alpha" not in config, "the config is flattened to dotted keys"
        info = json.loads((job / "job.json").read_text())
        assert info["wandb_group"] == sweep.name and info["machine"]["cpu_count"] >= 1
        # the environment is traceable: the versions the job ran with, in job.json and in W&B
        for package in ("torch", "transformers", "lightning", "hydra-core", "datasets"):
            assert info["versions"][package] == importlib.metadata.version(package), package
            assert config[f"versions.{package}"] == info["versions"][package]
    assert len(ids) == len(jobs)


def test_report_on_the_alpha_sweep(alpha_sweep, tmp_path):
    import csv

    _, sweep, jobs = alpha_sweep
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "uzr.report", str(sweep), "--out", str(out)], cwd=ROOT,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(jobs)
    for row, m in zip(sorted(rows, key=lambda r: float(r["alpha.value"])), load_metrics(jobs)):
        bpb = m["evaluate"]["bits_per_byte"]
        assert float(row["bpb_injected"]) == bpb["injected"] and float(row["bpb_student"]) == bpb["student"]
        assert float(row["heldout_kl_controller"]) == m["controller"]["heldout_kl"]["controller"]
    for name in ("results.md", "curves.png", "grid.png", "heatmaps.png", "REPORT.md", "COMMAND.md"):
        assert (out / name).stat().st_size > 0, name
    command = (out / "COMMAND.md").read_text()
    assert "python -m uzr.train -m +experiment=smoke alpha.value=0,0.5,1" in command
    assert "cpu_count" not in command and "CPUs" in command
    assert "alpha=0 reproduces the uninjected student exactly" in (out / "REPORT.md").read_text()


def test_concurrent_jobs_build_a_missing_artifact_once(tmp_path):
    """Two joblib workers need the same missing store and controller: one builds, the other waits."""
    from uzr.cache import verify

    # a larger corpus than the smoke default keeps the build running while the second worker starts
    proc = multirun(tmp_path, "+experiment=smoke", "alpha.value=0,1", "data.num_texts=64",
                    "stages=[harvest,controller]", "logger=csv", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_dirs(tmp_path / "sweep")
    assert len(jobs) == 2
    infos = [json.loads((job / "job.json").read_text()) for job in jobs]
    spans = sorted((i["started_unix"], i["started_unix"] + i["wall_s"]) for i in infos)
    assert spans[1][0] < spans[0][1], f"the two jobs did not run at the same time: {spans}"
    metrics = load_metrics(jobs)
    for kind in ("harvest", "controller"):
        records = [m["artifacts"][kind] for m in metrics]
        assert sum(r["built"] for r in records) == 1, (kind, records)
        assert len({r["key"] for r in records}) == 1
        folders = artifacts(tmp_path / "cache", kind)
        assert len(folders) == 1, folders
        manifest = verify(folders[0])
        assert manifest["files"], "an empty artifact"
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_two_sweeps_started_together_get_different_folders(tmp_path):
    """The default sweep folder carries microseconds: two sweeps in the same second never share one."""
    # inject.layers=[7] fails inside the job before any model loads; Hydra has made the sweep folder by then
    cmd = [sys.executable, "-m", "uzr.train", "-m", "+experiment=smoke", "inject.layers=[7]"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all("outside the student's layers" in e for e in errors), errors[0][-2000:]
    sweeps = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").rglob("multirun.yaml"))
    assert len(sweeps) == 2, sweeps
    for sweep in sweeps:
        assert re.fullmatch(r"\d{2}-\d{2}-\d{2}-\d{6}", sweep.name), sweep


def compose_jobs(experiment: str, *extra: str):
    """The configs of every job of an experiment's own sweep grid, composed the way the basic sweeper does."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from uzr.config import register_configs, resolve_config

    register_configs()  # the schema node train.yaml names; other tests may not have registered it in this process
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = [f"+experiment={experiment}", "paths.cache_dir=/nonexistent", *extra]
        cfg = compose("train", overrides=base, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
        return cfg, [(job, resolve_config(compose("train", overrides=base + job))) for job in batch]


def test_ablation_grid_composes_and_shares_one_store():
    from uzr.runner import artifact_keys

    cfg, jobs = compose_jobs("alpha_layer_ablation")
    assert len(jobs) == 12
    assert {(r.alpha.value, tuple(r.inject.layers)) for _, r in jobs} == {
        (a, layers) for a in (0, 0.25, 0.5, 1) for layers in ((8,), (15,), (8, 15, 22))}
    teacher, student = jobs[0][1].teacher.name, jobs[0][1].student.name
    assert (teacher, student) == ("gemma3_270m", "smollm2_135m")
    keys = [artifact_keys(r, ["controller"]) for _, r in jobs]
    harvest = {k["harvest"] for k in keys}
    assert len(harvest) == 1, "every job of the grid must share one harvest store"
    controllers = {k["controller"] for k in keys}
    assert len(controllers) == 3, "one controller per layer set, shared across alpha"
    assert "alpha_layer_ablation" in cfg.hydra.sweep.dir


# Stand-ins for the launcher plugins' schemas (structured, so a key they do not have fails to merge).
@dataclass
class SlurmStandIn:  # the fields of hydra-submitit-launcher 1.2's SlurmQueueConf that may be set
    _target_: str = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 60
    cpus_per_task: Any = None
    gpus_per_node: Any = None
    tasks_per_node: int = 1
    mem_gb: Any = None
    nodes: int = 1
    name: str = "${hydra.job.name}"
    partition: Any = None
    array_parallelism: int = 256
    max_num_timeout: int = 0
    signal_delay_s: int = 120
    additional_parameters: dict = field(default_factory=dict)

@dataclass
class RayConf:
    init: dict = field(default_factory=lambda: {"address": None})
    remote: dict = field(default_factory=dict)

@dataclass
class RayStandIn:  # hydra-ray-launcher's RayLauncherConf
    _target_: str = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    ray: RayConf = field(default_factory=RayConf)


def test_launcher_configs_compose_on_the_plugins_schemas():
    """submitit/ray configs extend the plugins' own entries; stand-ins for those check every key we set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="hydra/launcher", name="submitit_slurm", node=SlurmStandIn, provider="test")
    store.store(group="hydra/launcher", name="ray", node=RayStandIn, provider="test")
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            slurm = compose("train", overrides=["+experiment=smoke", "hydra/launcher=submitit_slurm_gpu"],
                            return_hydra_config=True).hydra.launcher
            ray = compose("train", overrides=["+experiment=smoke", "hydra/launcher=ray_gpu"],
                          return_hydra_config=True).hydra.launcher
    finally:
        for name in ("submitit_slurm.yaml", "ray.yaml"):
            store.repo["hydra"]["launcher"].pop(name, None)
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1
    assert ray._target_.endswith("RayLauncher") and ray.ray.remote.num_gpus == 1
    assert 0 < ray.ray.init.object_store_memory <= 8 * 2**30
    # nothing in uzr imports the optional launchers
    for path in (ROOT / "uzr").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(ray|submitit|hydra_plugins)\b", path.read_text(), re.M), path
