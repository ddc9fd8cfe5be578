"""Reliability and safety (issue 6): bad input, corrupted artifacts, untrusted files, numerics,
determinism, no network, disk space.

The smoke experiment runs three times in subprocesses, with sockets blocked inside them too
(``blocked_train``): run A (seed 0) is the source of every corrupted copy; run B (seed 0, fresh cache)
must reproduce A exactly; run C (seed 1) resumes A's harvest from a ``.partial`` folder a crash left
behind, and must change the controller numbers but not the store.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException

from uzr.cache import (
    MANIFEST,
    ArtifactCache,
    CorruptArtifact,
    UnsafeWeightsFile,
    load_torch_weights,
    verify,
)

from .conftest import CONF, ROOT, composed, model_spec, offline_env, resolved

# ------------------------------------------------------------------------------------------ helpers



# The CLI, with sockets blocked inside the subprocess as in this process (pytest-socket): proves the
# whole pipeline runs offline, not only the in-process tests.
_BLOCKED_MAIN = (
    "import runpy, sys, pytest_socket; pytest_socket.disable_socket(allow_unix_socket=True); "
    "sys.argv = ['uzr.train'] + sys.argv[1:]; runpy.run_module('uzr.train', run_name='__main__', alter_sys=True)"
)


def blocked_train(tmp: Path, cache: Path, run_dir: str, *overrides: str, timeout: int = 600):
    cmd = [sys.executable, "-c", _BLOCKED_MAIN, "+experiment=smoke", "logger=csv", *overrides,
           f"paths.cache_dir={cache}", f"hydra.run.dir={tmp / run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(tmp, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def metrics_of(tmp: Path, run_dir: str) -> dict:
    return json.loads((tmp / run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def smoke_a(tmp_path_factory):
    """Run A: the smoke experiment, seed 0, its own cache."""
    tmp = tmp_path_factory.mktemp("reliability")
    proc = blocked_train(tmp, tmp / "cache_a", "run_a")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = metrics_of(tmp, "run_a")
    return {"tmp": tmp, "cache": tmp / "cache_a", "metrics": metrics,
            "harvest": Path(metrics["artifacts"]["harvest"]["path"]),
            "controller": Path(metrics["artifacts"]["controller"]["path"])}


def copy_cache(smoke: dict, dest: Path) -> tuple[Path, Path, Path]:
    """A private copy of run A's cache; returns (root, harvest folder, controller folder) in the copy."""
    root = dest / "cache"
    shutil.copytree(smoke["cache"], root)
    return (root, root / "harvest" / smoke["harvest"].name, root / "controller" / smoke["controller"].name)


def must_not_build(folder):
    raise AssertionError("an existing artifact was rebuilt instead of being verified")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Evil:
    """Pickles to ``os.system("touch <marker>")``: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """(marker, [torch.save zip with the payload, raw pickle of it]); the marker must never appear."""
    marker = tmp_path / "pwned"
    zipped, raw = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"weight": torch.ones(2), "payload": Evil(marker)}, zipped)
    raw.write_bytes(pickle.dumps({"weight": [1.0], "payload": Evil(marker)}))
    return marker, [zipped, raw]


def tiny_checkpoint(folder: Path, student: str = "tiny_llama", hidden: int = 48, layers=(1, 2)) -> Path:
    from uzr.controller import ControllerModule, ControllerSpec, save_controller

    module = ControllerModule(hidden, list(layers), ControllerSpec(key_dim=8, mlp_hidden=16))
    return save_controller(module, folder, {"student": student})


# ------------------------------------------------------------------------------------------ configs


def _config(*overrides):
    return lambda tmp_path: resolved("+experiment=smoke", *overrides)


def _group(*overrides):
    return lambda tmp_path: composed("+experiment=smoke", *overrides)


def _checkpoint_for(*overrides):
    """Load a checkpoint trained for the smoke config into a run configured with ``overrides``."""

    def attempt(tmp_path):
        from uzr.controller import load_controller

        ckpt = tiny_checkpoint(tmp_path / "ckpt")
        cfg = resolved("+experiment=smoke", *overrides)
        # exactly what the pipeline asks of a controller artifact
        load_controller(ckpt, expected={"student": cfg.student.name, "hidden_size": cfg.student.hidden_size,
                                        "layers": list(cfg.inject.layers)})

    return attempt


def _corpus_file(content: str):
    """A text_file corpus: the config validates; the harvest stops at the corpus, before any model."""

    def attempt(tmp_path):
        from uzr.harvest.stage import HarvestStage
        from uzr.runner import ModelPool, RunContext

        path = tmp_path / "corpus.txt"
        path.write_text(content)
        cfg = resolved("+experiment=smoke", "data=text_file", f"data.path={path}")
        HarvestStage().build(RunContext(cfg, tmp_path, ModelPool(cfg)), tmp_path / "store")

    return attempt


# The whole list: (id, attempt(tmp_path), exception types, message pattern).
INVALID = [
    ("unknown-student", _group("student=gpt5"), MissingConfigException,
     r"Could not find 'student/gpt5'.*tiny_llama"),
    ("unknown-alpha", _group("alpha=fast"), MissingConfigException, r"'alpha/fast'.*constant.*entropy_local"),
    ("unknown-data", _group("data=nope"), MissingConfigException, r"'data/nope'.*pydoc.*text_file"),
    ("layer-past-student-depth", _config("inject.layers=[1,3]"), ValueError,
     r"inject.layers=\[1, 3\]: \[3\] outside the student's layers 0..2"),
    ("layer-past-real-depth", lambda tmp_path: resolved("+experiment=default", "inject.layers=[30]"), ValueError,
     r"inject.layers=\[30\]: \[30\] outside the student's layers 0..29"),
    ("negative-layer", _config("inject.layers=[-1]"), ValueError, r"\[-1\] outside the student's layers 0..2"),
    ("harvest-layer-out-of-range", _config("harvest.layers=[0,5]"), ValueError,
     r"harvest.layers=\[0, 5\]: \[5\] outside the student's layers 0..2"),
    ("duplicate-layers", _config("inject.layers=[1,1]"), ValueError, r"inject.layers=\[1, 1\] contains duplicates"),
    ("negative-alpha", _config("alpha.value=-0.5"), ValueError, r"alpha.value=-0.5 must be a finite number >= 0"),
    ("nan-alpha", _config("alpha.value=nan"), ValueError, r"alpha.value=nan must be a finite number >= 0"),
    ("inf-alpha", _config("alpha.value=inf"), ValueError, r"alpha.value=inf must be a finite number >= 0"),
    ("negative-layer-weight", _config("++alpha.layer_weights={1: -1.0}"), ValueError,
     r"alpha.layer_weights\[1\]=-1.0 must be a finite number >= 0"),
    ("checkpoint-student", _checkpoint_for("student=tiny_qwen2"), ValueError,
     r"student='tiny_llama' in the checkpoint, student='tiny_qwen2' now"),
    ("checkpoint-hidden-size", _checkpoint_for("student.hidden_size=64"), ValueError,
     r"hidden_size=48 in the checkpoint, hidden_size=64 now"),
    ("checkpoint-layers", _checkpoint_for("inject.layers=[0,2]"), ValueError,
     r"layers=\[1, 2\] in the checkpoint, layers=\[0, 2\] now"),
    ("missing-corpus", _config("data=text_file", "data.path=/nonexistent/corpus.txt"), FileNotFoundError,
     r"corpus.path='/nonexistent/corpus.txt' does not exist"),
    ("whitespace-only-corpus", _corpus_file("\n   \n\t\n \u3000\n\n"), ValueError,
     r"corpus.txt.*no non-blank text \(6 empty or whitespace-only lines\)"),
    ("max-length-1", _config("harvest.max_length=1"), ValueError, r"harvest.max_length=1 must be >= 2"),
    ("max-length-0", _config("harvest.max_length=0"), ValueError, r"harvest.max_length=0 must be >= 2"),
]


@pytest.mark.parametrize("attempt, errors, message", [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_input_is_rejected_before_any_model_loads(attempt, errors, message, tmp_path, monkeypatch):
    """Every documented invalid value fails with the key, the bad value and what is valid; no model loads."""
    import uzr.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was rejected")

    monkeypatch.setattr(uzr.models, "load_model", no_loading)
    with pytest.raises(errors) as err:
        attempt(tmp_path)
    assert re.search(message, str(err.value), re.S), str(err.value)
    assert "a model was loaded" not in str(err.value)


# ----------------------------------------------------------------------------------------- artifacts
TARGETS = [("harvest", "shard-00000/data-00000-of-00001.arrow"), ("harvest", "layout.json"),
           ("controller", "controller.safetensors"), ("controller", "controller.json")]


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "flipped"])
@pytest.mark.parametrize("kind, name", TARGETS, ids=[t[1].split("/")[-1] for t in TARGETS])
def test_damaged_artifact_is_rejected_with_rebuild_advice(smoke_a, tmp_path, kind, name, damage):
    root, harvest, controller = copy_cache(smoke_a, tmp_path)
    folder = harvest if kind == "harvest" else controller
    verify(folder)  # the intact copy passes
    damage(folder / name)
    with pytest.raises(CorruptArtifact) as err:
        ArtifactCache(root).get_or_build(kind, folder.name, {}, must_not_build)
    assert name in str(err.value)
    assert f"Delete {folder} and run again to rebuild it" in str(err.value)


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "flipped"])
def test_damaged_controller_checkpoint_is_rejected_by_load_controller(smoke_a, tmp_path, damage):
    """Without the cache in front: the checkpoint's own sha256 / header checks catch the damage."""
    from uzr.controller import load_controller

    _, _, controller = copy_cache(smoke_a, tmp_path)
    load_controller(controller, expected={"student": "tiny_llama", "layers": [1, 2], "hidden_size": 48})
    damage(controller / "controller.safetensors")
    with pytest.raises(ValueError, match=rf"truncated, modified.*delete {re.escape(str(controller))} and run "
                                         r"again with 'controller' in stages"):
        load_controller(controller)


def test_truncated_store_shard_is_named_when_read_directly(smoke_a, tmp_path):
    from uzr.harvest.store import CorruptStore, HarvestStore

    _, harvest, _ = copy_cache(smoke_a, tmp_path)
    assert len(HarvestStore(harvest).dataset()) == 24
    truncate(harvest / "shard-00001" / "data-00000-of-00001.arrow")
    with pytest.raises(CorruptStore, match=rf"shard-00001 cannot be read.*Delete {re.escape(str(harvest))} and run"):
        HarvestStore(harvest).dataset()


def test_damaged_manifest_is_rejected(smoke_a, tmp_path):
    root, harvest, _ = copy_cache(smoke_a, tmp_path)
    truncate(harvest / MANIFEST)
    with pytest.raises(CorruptArtifact, match=rf"manifest.json is damaged.*Delete {re.escape(str(harvest))} and run"):
        ArtifactCache(root).get_or_build("harvest", harvest.name, {}, must_not_build)


def test_cli_stops_on_a_damaged_store_and_says_how_to_rebuild(smoke_a, tmp_path):
    root, harvest, _ = copy_cache(smoke_a, tmp_path)
    flip(harvest / "shard-00002" / "data-00000-of-00001.arrow")
    proc = blocked_train(tmp_path, root, "run")
    assert proc.returncode != 0
    assert "shard-00002/data-00000-of-00001.arrow" in proc.stderr and f"Delete {harvest} and run again" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_crashed_build_leaves_a_partial_folder_that_does_not_poison_the_next(tmp_path):
    cache = ArtifactCache(tmp_path)

    def crash(work: Path):
        (work / "part-0").write_text("finished before the crash")
        (work / ".tmp-part-1-4242").mkdir()  # a half-written piece (e.g. a shard being saved)
        (work / ".tmp-part-1-4242" / "data").write_text("half")
        (work / ".weights.bin.x1y2.tmp").write_bytes(b"half")  # an interrupted atomic file write
        (work / (MANIFEST + ".tmp")).write_text("{")  # killed while writing the manifest
        raise KeyboardInterrupt  # the job was killed

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("harvest", "k", {"a": 1}, crash)
    assert not cache.exists("harvest", "k") and cache.work_dir("harvest", "k").is_dir()

    seen = []

    def resume(work: Path):
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "part-1").write_text("finished now")

    folder, built = cache.get_or_build("harvest", "k", {"a": 1}, resume)
    assert built and "part-0" in seen[0]  # finished work is kept for the resumed build
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "part-0", "part-1"]
    assert sorted(verify(folder)["files"]) == ["part-0", "part-1"]
    assert not cache.work_dir("harvest", "k").exists()
    assert cache.get_or_build("harvest", "k", {"a": 1}, must_not_build) == (folder, False)


def _row(n: int, split: str = "train") -> dict:
    return {"input_ids": np.arange(n, dtype=np.int32), "hidden_L0": np.ones((n, 2), np.float16), "split": split}


def test_store_ignores_and_replaces_an_incomplete_shard_folder(tmp_path):
    from uzr.harvest.store import HarvestStore

    store = HarvestStore(tmp_path)
    store.write_shard(0, [_row(3), _row(4)])
    broken = store.shard_dir(1)
    broken.mkdir()
    (broken / "data-00000-of-00001.arrow").write_bytes(b"ARROW1 half")  # no state.json: never finished
    (tmp_path / ".tmp-shard-00002-999").mkdir()
    assert store.done_shards() == [0]  # so a resumed harvest redoes shard 1
    store.write_shard(1, [_row(5, "heldout")])
    assert store.done_shards() == [0, 1]
    assert [len(r) for r in store.dataset()["input_ids"]] == [3, 4, 5]


def test_concurrent_jobs_build_an_artifact_once(tmp_path):
    """Two processes asking for the same artifact at once: one builds, the other waits and reuses it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from uzr.cache import ArtifactCache

        def build(work):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write(sys.argv[1] + "\\n")
            time.sleep(1.0)
            (work / "data").write_text("content")

        folder, built = ArtifactCache({str(tmp_path / "cache")!r}).get_or_build("harvest", "k", {{}}, build)
        print(built, (folder / "data").read_text())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outputs == ["False content", "True content"]
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    verify(tmp_path / "cache" / "harvest" / "k")


# ------------------------------------------------------------------------------------ untrusted files


def test_pickle_payload_as_controller_weights_is_refused_and_never_runs(tmp_path):
    from uzr.controller import load_controller

    marker, payloads = evil_files(tmp_path)
    for payload in payloads:
        ckpt = tiny_checkpoint(tmp_path / f"ckpt-{payload.suffix[1:]}")
        shutil.copy(payload, ckpt / "controller.safetensors")
        # The attacker also rewrote the recorded hash, so only the file format can give it away.
        meta = json.loads((ckpt / "controller.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(payload.read_bytes()).hexdigest()
        (ckpt / "controller.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=r"refusing to load .*controller.safetensors: it is a "
                                             r"(pickle|torch.save zip archive), not a safetensors file.*never "
                                             r"unpickles"):
            load_controller(ckpt)
        assert not marker.exists(), "the pickled payload ran"


def test_load_torch_weights_refuses_pickled_code_and_reads_plain_tensors(tmp_path):
    marker, payloads = evil_files(tmp_path)
    for payload in payloads:
        with pytest.raises(UnsafeWeightsFile, match=r"refusing to load .*pickled objects.*could run code.*weights_only=True"):
            load_torch_weights(payload)
        assert not marker.exists(), "the pickled payload ran"
    torch.save({"w": torch.arange(3.0)}, tmp_path / "plain.pt")
    assert torch.equal(load_torch_weights(tmp_path / "plain.pt")["w"], torch.arange(3.0))


def test_lightning_resume_checkpoint_path_refuses_pickled_code(tmp_path):
    """The controller stage resumes from ``last.ckpt`` with ``weights_only=True``: a planted one cannot run code."""
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    marker, payloads = evil_files(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        pl_load(payloads[0], weights_only=True)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_codebase_never_unpickles_untrusted_files():
    """Every ``torch.load`` passes ``weights_only=True``; no pickle/joblib/dill loads; resumes are weights-only."""
    problems = []
    for path in sorted((ROOT / "uzr").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call, name in _calls(tree):
            kwargs = {kw.arg: kw.value for kw in call.keywords}
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            weights_only = kwargs.get("weights_only")
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            if name.endswith("torch.load") and not safe:
                problems.append(f"{where} without weights_only=True")
            if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in ("pickle", "dill",
                                                                                               "joblib", "cloudpickle"):
                problems.append(f"{where} unpickles")
            if "ckpt_path" in kwargs and not safe:
                problems.append(f"{where} resumes from a checkpoint without weights_only=True")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                problems.append(f"{where} weights_only=False")
    assert not problems, problems


def test_trust_remote_code_is_off_unless_the_model_config_sets_it(monkeypatch, tmp_path):
    import transformers
    from omegaconf import OmegaConf

    import uzr.models
    from uzr.models import ModelSpec, load_model

    assert ModelSpec(name="m", source="hub", num_layers=1, num_heads=1, num_kv_heads=1, hidden_size=8).trust_remote_code is False
    for entry in sorted((CONF / "teacher").glob("*.yaml")) + sorted((CONF / "student").glob("*.yaml")):
        assert OmegaConf.load(entry).get("trust_remote_code", False) is False, entry

    calls = []

    class FakeModel:
        config = None

        def to(self, *args, **kwargs):
            return self

        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    class FakeTokenizer:
        pad_token = "<pad>"

    def fake_model(path, **kwargs):
        calls.append(("model", path, kwargs))
        return FakeModel()

    def fake_tokenizer(path, **kwargs):
        calls.append(("tokenizer", path, kwargs))
        return FakeTokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(uzr.models.loading, "_check_declared", lambda *args: None)
    hub = dict(name="m", source="hub", hub_id=str(tmp_path), num_layers=1, num_heads=1, num_kv_heads=1, hidden_size=8)
    for setting, expected in ((None, False), (False, False), (True, True)):
        calls.clear()
        spec = ModelSpec(**hub) if setting is None else ModelSpec(**hub, trust_remote_code=setting)
        load_model(spec)  # a local folder: the offline check passes without the hub
        assert [c[0] for c in calls] == ["model", "tokenizer"]
        assert all(c[2]["trust_remote_code"] is expected for c in calls), calls


# ----------------------------------------------------------------------------------------- numerics
TEXT = "Café déjà vu — 東京は日本の首都です. مرحبا بالعالم, שלום עולם 🙂👍🏽 and some plain text here."


@pytest.fixture(scope="module")
def tiny_student():
    from uzr.models import load_model

    return load_model(model_spec("student/tiny_llama"))


def _teacher(dtype: str, boost: float | None = None):
    from uzr.attention import attention_modules
    from uzr.models import load_model

    teacher, tok = load_model(dataclasses.replace(model_spec("teacher/tiny_gemma3"), dtype=dtype))
    if boost is not None:  # huge query/key norms: scores far beyond float16's range (65504)
        with torch.no_grad():
            for module in attention_modules(teacher):
                module.q_norm.weight.fill_(boost)
                module.k_norm.weight.fill_(boost)
    return teacher, tok


def _harvest(teacher, t_tok, student, s_tok, text: str = TEXT) -> dict:
    from uzr.harvest.harvester import Harvester

    harvester = Harvester(teacher, t_tok, student, s_tok, [1, 2], [2, 3], window=8, block_size=16, max_length=48)
    try:
        return harvester(text)
    finally:
        harvester.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_teacher_gives_float32_statistics_close_to_float32(dtype, tiny_student):
    from uzr.harvest.harvester import RecordedModel, row_is_finite

    student, s_tok = tiny_student
    reference = _harvest(*_teacher("float32"), student, s_tok)
    teacher, t_tok = _teacher(dtype)
    assert next(teacher.parameters()).dtype == getattr(torch, dtype)
    recorded = RecordedModel(teacher, window=8, block_size=16, keep_head_mean=[2])
    try:
        out = recorded.forward(torch.tensor([t_tok(TEXT)["input_ids"]]))
    finally:
        recorded.detach()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out["stats"].values())
    assert out["head_mean"][2].dtype == torch.float32
    row = _harvest(teacher, t_tok, student, s_tok)
    assert row_is_finite(row)
    tol = 0.01 if dtype == "float16" else 0.05
    for key in ("teacher_next_entropy", "teacher_next_maxprob", "teacher_entropy", "teacher_norm_entropy", "teacher_locality", "teacher_dist_L1"):
        diff = np.abs(row[key].astype(np.float32) - reference[key].astype(np.float32)).max()
        assert diff < tol, (key, diff)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_scores_beyond_float16_range_do_not_poison_the_store(dtype, tiny_student, monkeypatch):
    import uzr.attention.function
    from uzr.harvest.harvester import row_is_finite

    overflow = []
    original = uzr.attention.function._blocked_eager

    def spy(module, query, key, *args, **kwargs):
        n_rep = query.shape[1] // key.shape[1]
        naive = query @ key.repeat_interleave(n_rep, 1).transpose(-1, -2)  # scores in the model's dtype
        overflow.append(not bool(torch.isfinite(naive.half()).all()))
        return original(module, query, key, *args, **kwargs)

    monkeypatch.setattr(uzr.attention.function, "_blocked_eager", spy)
    student, s_tok = tiny_student
    row = _harvest(*_teacher(dtype, boost=300.0), student, s_tok)
    assert any(overflow), "the test must push scores past float16's range"
    assert row_is_finite(row)
    rows = row["teacher_dist_L1"].astype(np.float32).sum(-1)
    assert np.allclose(rows, 1, atol=0.02), rows  # real distributions, not zeroed rows


@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_nonfinite_injected_student_is_reported_with_layer_and_alpha(mode, tiny_student):
    from uzr.controller import ControllerSpec, build_controller
    from uzr.evaluate import student_pass
    from uzr.injection.injector import AlphaSpec, Injector

    student, tok = tiny_student
    controller = build_controller(ControllerSpec(key_dim=8, mlp_hidden=16), 48)
    with torch.no_grad():
        for p in controller.parameters():
            p.fill_(math.nan)
    ids = torch.tensor([tok("a short text for the injected student")["input_ids"]])
    assert torch.isfinite(student_pass(student, ids, [1], 8).nll).all()  # the plain student is fine
    for recorded in ([1], [0, 2]):  # the evaluation records the injected layer; the figure may not
        injector = Injector({1: controller}, AlphaSpec(value=0.75), mode, prompt_len=0)
        with pytest.raises(FloatingPointError) as err:
            student_pass(student, ids, recorded, 8, injector)
        message = str(err.value)
        assert "injection at layers [1]" in message and "alpha=0.75" in message and f"mode={mode}" in message
        assert "layer 1" in message or "layer(s) [1]" in message, message


# -------------------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def smoke_b(smoke_a):
    """Run B: same config and seed as A, fresh cache."""
    tmp = smoke_a["tmp"]
    proc = blocked_train(tmp, tmp / "cache_b", "run_b")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return metrics_of(tmp, "run_b")


def test_same_seed_gives_identical_metrics_and_artifacts(smoke_a, smoke_b):
    a, b = smoke_a["metrics"], smoke_b
    assert a["evaluate"] == b["evaluate"]
    assert a["controller"] == b["controller"]
    for kind in ("harvest", "controller"):
        assert a["artifacts"][kind]["key"] == b["artifacts"][kind]["key"] and b["artifacts"][kind]["built"]
        files_a = json.loads((Path(a["artifacts"][kind]["path"]) / MANIFEST).read_text())["files"]
        files_b = json.loads((Path(b["artifacts"][kind]["path"]) / MANIFEST).read_text())["files"]
        assert files_a == files_b  # byte-identical store and weights


@pytest.fixture(scope="module")
def smoke_c(smoke_a):
    """Run C: seed 1, on a copy of A's cache whose store was left half-built by a crash."""
    tmp = smoke_a["tmp"]
    root = tmp / "cache_c"
    shutil.copytree(smoke_a["cache"], root)
    final = root / "harvest" / smoke_a["harvest"].name
    partial = final.with_name(final.name + ".partial")
    os.replace(final, partial)
    (partial / MANIFEST).unlink()
    shutil.rmtree(partial / "shard-00001")
    junk = partial / ".tmp-shard-00001-99999"  # the shard being written when the job died
    junk.mkdir()
    (junk / "data-00000-of-00001.arrow").write_bytes(b"half a shard")
    (partial / "shard-00002" / "state.json").unlink()  # an incomplete shard folder
    truncate(partial / "shard-00002" / "data-00000-of-00001.arrow")
    proc = blocked_train(tmp, root, "run_c", "seed=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"metrics": metrics_of(tmp, "run_c"), "partial": partial, "final": final}


def test_partial_store_from_a_crash_resumes_to_the_same_store(smoke_a, smoke_c):
    m = smoke_c["metrics"]
    assert m["artifacts"]["harvest"]["built"] and m["artifacts"]["harvest"]["key"] == smoke_a["harvest"].name
    assert not smoke_c["partial"].exists()
    manifest = verify(smoke_c["final"])
    assert manifest.get("resumed_shards", 1) == 1  # shard 0 was kept; 1 and 2 were harvested again
    files = manifest["files"]
    assert not any(".tmp" in name for name in files)
    assert files == json.loads((smoke_a["harvest"] / MANIFEST).read_text())["files"]


def test_different_seed_changes_controller_and_injected_numbers(smoke_a, smoke_c):
    a, c = smoke_a["metrics"], smoke_c["metrics"]
    assert a["artifacts"]["controller"]["key"] != c["artifacts"]["controller"]["key"]
    assert a["controller"]["heldout_kl"]["controller"] != c["controller"]["heldout_kl"]["controller"]
    assert a["evaluate"]["bits_per_byte"]["injected"] != c["evaluate"]["bits_per_byte"]["injected"]
    # same store, same student: what does not depend on the seed stays put
    assert a["evaluate"]["bits_per_byte"]["student"] == c["evaluate"]["bits_per_byte"]["student"]
    assert a["controller"]["heldout_kl"]["uniform"] == c["controller"]["heldout_kl"]["uniform"]


# --------------------------------------------------------------------------------------- no network


def test_network_is_blocked_in_the_test_suite():
    from pytest_socket import SocketBlockedError

    with pytest.raises(SocketBlockedError):
        socket.create_connection(("1.1.1.1", 80), timeout=1)
    with pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # suite-wide (pyproject addopts), not a per-test marker
    assert "--disable-socket" in (ROOT / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------- resources


def test_store_estimate_bounds_the_real_smoke_store(smoke_a):
    from uzr.harvest.store import HarvestStore
    from uzr.resources import estimate_store_bytes

    store = HarvestStore(smoke_a["harvest"])
    layout = store.layout
    lengths = [len(ids) for ids in store.dataset()["input_ids"]]
    estimate = estimate_store_bytes(len(lengths), 48, layout.hidden_size, len(layout.layers),
                                    layout.teacher_num_layers, layout.teacher_num_heads,
                                    layout.student_num_layers, layout.student_num_heads)
    actual = sum(p.stat().st_size for p in smoke_a["harvest"].rglob("*") if p.is_file())
    assert max(lengths) == 48
    assert actual <= estimate <= 1.5 * actual, (actual, estimate)


def test_disk_check_stops_before_starting_with_the_estimate(monkeypatch, tmp_path):
    import uzr.resources
    from uzr.resources import InsufficientDiskSpace, check_free_disk, estimate_store_bytes

    needed = estimate_store_bytes(1000, 256, 896, 3, 28, 28, 24, 14)
    assert needed > 2**30  # the Qwen reference pair, 1000 texts of 256 tokens: gigabytes
    usage = shutil.disk_usage(tmp_path)
    seen = []

    def fake_usage(path):
        seen.append(Path(path))
        return usage._replace(free=needed // 2)

    monkeypatch.setattr(uzr.resources.shutil, "disk_usage", fake_usage)
    target = tmp_path / "cache" / "harvest" / "abc.partial"  # not created yet
    with pytest.raises(InsufficientDiskSpace) as err:
        check_free_disk(target, needed)
    message = str(err.value)
    assert f"({needed} bytes, estimated)" in message and f"({needed // 2} bytes) is free in {tmp_path}" in message
    assert seen == [tmp_path] and not target.exists()
    monkeypatch.setattr(uzr.resources.shutil, "disk_usage", lambda path: usage._replace(free=needed + 1))
    assert check_free_disk(target, needed) == needed + 1
