"""A killed harvest resumes from its last complete shard; a 2-process harvest equals a 1-process one;
killed controller and gate training resume from their last checkpoint."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from uzr.harvest.store import HarvestStore

from .conftest import ROOT, offline_env

SMOKE = ["+experiment=smoke", "data.num_texts=24", "harvest.shard_size=2", "logger=csv"]


def command(tmp_path, *overrides):
    return [sys.executable, "-m", "uzr.train", *SMOKE, *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}"]




def finished_store(tmp_path) -> HarvestStore:
    folders = [p for p in glob.glob(str(tmp_path / "cache" / "harvest" / "*")) if not p.endswith((".lock", ".partial"))]
    assert len(folders) == 1, folders
    return HarvestStore(folders[0])


def assert_same_store(a: HarvestStore, b: HarvestStore):
    da, db = a.dataset().with_format(None), b.dataset().with_format(None)
    assert len(da) == len(db) and sorted(da.column_names) == sorted(db.column_names)
    order_a, order_b = np.argsort(da["text"]), np.argsort(db["text"])
    assert [da["text"][i] for i in order_a] == [db["text"][i] for i in order_b]
    assert len(set(da["text"])) == len(da), "a text was written twice"
    for column in da.column_names:
        va, vb = da[column], db[column]
        for i, j in zip(order_a, order_b):
            assert np.array_equal(np.asarray(va[i]), np.asarray(vb[j])), column


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(tmp, "stages=[harvest]"), cwd=ROOT, env=offline_env(tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return finished_store(tmp)


def test_killed_harvest_resumes_and_equals_uninterrupted(tmp_path, reference):
    cmd = command(tmp_path, "stages=[harvest]")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=offline_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(glob.glob(str(tmp_path / "cache/harvest/*.partial/shard-*"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = glob.glob(str(tmp_path / "cache/harvest/*.partial/shard-*"))
    assert 3 <= len(partial) < 12, "the kill must land mid-harvest"
    resumed = subprocess.run(cmd, cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "harvest resumes" in resumed.stdout + resumed.stderr
    manifest = json.loads((finished_store(tmp_path).folder / "manifest.json").read_text())
    assert manifest["resumed_shards"] >= 3
    assert_same_store(finished_store(tmp_path), reference)


def test_two_process_harvest_equals_single_process(tmp_path, reference):
    proc = subprocess.run(command(tmp_path, "stages=[harvest]", "harvest.devices=2", "harvest.strategy=ddp_spawn"),
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_store(finished_store(tmp_path), reference)


def kill_after_checkpoint(cmd, tmp_path, kind: str) -> None:
    """Start ``cmd`` and kill it (the whole process group) a second after ``kind`` wrote its first checkpoint."""
    checkpoint = str(tmp_path / f"cache/{kind}/*.partial/checkpoints/last.ckpt")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=offline_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and not glob.glob(checkpoint):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert glob.glob(checkpoint), f"no {kind} checkpoint before the kill"


def test_killed_controller_and_gate_training_resume_from_their_last_checkpoint(tmp_path):
    """Controller training killed mid-way resumes from its last Lightning checkpoint; then, on the same cache (the
    harvest and controller are reused), gate training killed mid-way does too."""
    for kind, overrides in [
        ("controller", ["controller.max_epochs=60", "stages=[harvest,controller]"]),
        ("gate", ["controller.max_epochs=60", "gate.max_epochs=400", "stages=[harvest,controller,gate]",
                  "gate.eval_alphas=[1.0]", "evaluate.qa_prompts=4", "evaluate.num_texts=1"]),
    ]:
        cmd = command(tmp_path, *overrides)
        kill_after_checkpoint(cmd, tmp_path, kind)
        resumed = subprocess.run(cmd, cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{kind} training resumes" in resumed.stdout + resumed.stderr
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["artifacts"][kind]["built"]
        final = glob.glob(str(tmp_path / f"cache/{kind}/*/manifest.json"))
        assert len(final) == 1 and json.loads(Path(final[0]).read_text())["resumed"] is True
        assert not glob.glob(str(tmp_path / f"cache/{kind}/*/checkpoints")), "checkpoints left in the artifact"
    assert not metrics["artifacts"]["controller"]["built"]  # the gate run reused the resumed controller
