"""End to end: Hydra runs of the smoke experiment (tiny models) and of the packaged real pair."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, offline_env, share_models


def run_train(tmp_path, *overrides: str, timeout: int = 600, run_dir: str = "run",
              models=None) -> subprocess.CompletedProcess:
    """``python -m uzr.train`` with its own artifact cache under ``tmp_path``; ``models``: the session's converted
    packaged models (fixture ``converted_models``), so a run of the real pair does not convert them again."""
    if models is not None:
        share_models(tmp_path / "cache", models)
    cmd = [sys.executable, "-m", "uzr.train", *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / run_dir}"]
    env = offline_env(tmp_path, UZR_CACHE=str(tmp_path / "cache"))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    proc = run_train(tmp, "+experiment=smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_smoke_writes_metrics_config_figure_and_logs(smoke_run):
    tmp, proc = smoke_run
    run = tmp / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "config.yaml").exists()
    assert (run / "figures" / "heatmaps_L1.png").stat().st_size > 10_000
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert (run / "csv" / "metrics.csv").exists()
    assert metrics["artifacts"]["harvest"]["built"] and metrics["artifacts"]["controller"]["built"]
    ev = metrics["evaluate"]
    for name in ("student", "injected", "teacher"):
        assert 0 < ev["bits_per_byte"][name] < 20
    assert set(ev["habit_distance"]) == {"L1", "L2"}
    assert "bits per byte" in proc.stdout and "held-out KL" in proc.stdout
    assert "facts QA accuracy" in proc.stdout and "gated injection" in proc.stdout


def test_smoke_gate_stage_table_agrees_with_the_evaluate_stage(smoke_run):
    """The gate stage is trained and reported; its none / constant@alpha rows are the same measurements
    as the evaluate stage's student / injected columns (same texts, prompts and alpha)."""
    tmp, _ = smoke_run
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["artifacts"]["gate"]["built"]
    heldout = metrics["gate"]["heldout"]
    assert 0.0 <= heldout["gate"]["auroc"] <= 1.0 and "majority" in heldout and "student_entropy" in heldout
    assert heldout["verdict"].startswith("gate ")
    assert heldout["labels"]["source"] == "teacher_next_entropy"  # not the attention-entropy statistic
    from uzr.harvest.store import HarvestStore

    row = HarvestStore(metrics["artifacts"]["harvest"]["path"]).rows("train")[0]
    s = len(row["input_ids"])
    assert row["teacher_next_entropy"].shape == (s,) and row["teacher_entropy"].shape[-1] == s
    assert row["teacher_entropy"].ndim == 3
    gated = metrics["gate"]["evaluation"]
    table, ev = gated["table"], metrics["evaluate"]
    assert list(table) == ["none", "constant@0.5", "constant@1", "gated@0.5", "gated@1"]
    assert table["none"]["bits_per_byte"] == pytest.approx(ev["bits_per_byte"]["student"], rel=1e-6)
    assert table["constant@0.5"]["bits_per_byte"] == pytest.approx(ev["bits_per_byte"]["injected"], rel=1e-6)
    qa = ev["facts_qa"]
    assert qa["num_prompts"] == gated["num_prompts"] > 50
    assert (table["none"]["qa_accuracy"], table["constant@0.5"]["qa_accuracy"]) == (qa["student"], qa["injected"])
    assert gated["teacher"]["qa_accuracy"] == qa["teacher"]
    # every comparison carries its paired interval, computed on the same items as the numbers beside it
    paired = ev["bits_per_byte"]["injected_minus_student"]
    assert paired["n"] == ev["num_texts"] and paired["low"] <= paired["estimate"] <= paired["high"]
    assert paired["estimate"] == pytest.approx(ev["bits_per_byte"]["injected"] - ev["bits_per_byte"]["student"], abs=1e-9)
    assert qa["injected_minus_student"]["estimate"] == pytest.approx(qa["injected"] - qa["student"], abs=1e-9)
    vs = table["gated@1"]["vs_constant@1"]["bits_per_byte"]
    assert vs["estimate"] == pytest.approx(table["gated@1"]["bits_per_byte"] - table["constant@1"]["bits_per_byte"],
                                           abs=1e-9)
    assert vs["verdict"] in ("better", "no difference", "worse")
    # a gate in (0, 1) scales alpha down: gated bits per byte lie between none and constant at that alpha
    lo, hi = sorted([table["none"]["bits_per_byte"], table["constant@1"]["bits_per_byte"]])
    assert 0 < table["gated@1"]["mean_gate_text"] < 1
    assert lo - 1e-3 <= table["gated@1"]["bits_per_byte"] <= hi + 1e-3


def test_smoke_controller_beats_uniform_on_heldout(smoke_run):
    """Training on the smoke store lowers held-out KL below the uniform baseline."""
    tmp, _ = smoke_run
    kl = json.loads((tmp / "run" / "metrics.json").read_text())["controller"]["heldout_kl"]
    assert kl["controller"] < kl["uniform"] - 0.005, kl
    assert all(v is not None and v >= 0 for v in kl.values()), kl


def test_second_run_reuses_store_and_controller(smoke_run):
    tmp, _ = smoke_run
    stored = sorted(p.name for p in (tmp / "cache" / "memo").iterdir())
    assert len(stored) >= 4  # the injected QA scores of the gate table's constant and gated rows
    proc = run_train(tmp, "+experiment=smoke", "alpha.value=1.0", run_dir="run2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp / "run2" / "metrics.json").read_text())
    first = json.loads((tmp / "run" / "metrics.json").read_text())
    assert not any(metrics["artifacts"][kind]["built"] for kind in ("harvest", "controller", "gate"))
    # the same artifacts, so every injected QA row (the evaluate stage's alpha 1 is the table's constant@1) is reused
    assert sorted(p.name for p in (tmp / "cache" / "memo").iterdir()) == stored
    assert metrics["artifacts"]["harvest"]["key"] == first["artifacts"]["harvest"]["key"]
    # same student and texts: the uninjected baseline is identical, the injected number moves with alpha
    assert metrics["evaluate"]["bits_per_byte"]["student"] == first["evaluate"]["bits_per_byte"]["student"]
    assert metrics["evaluate"]["bits_per_byte"]["injected"] != first["evaluate"]["bits_per_byte"]["injected"]


@pytest.mark.parametrize("source", ["teacher", "shuffled", "uniform"])
def test_smoke_injects_each_source_on_the_same_texts(smoke_run, source):
    """inject.source swaps what is injected, on the cached store and controller; uniform in bias mode is exactly
    the student (softmax ignores a constant per row); shuffled is reported on text only, the teacher oracle also
    on facts QA (live)."""
    tmp, _ = smoke_run
    # the uniform run also scores the causal-loop QA domain (a no-op injection must leave every candidate's score)
    domains = ["evaluate.qa_domains=[causal_loop]", "evaluate.qa_domain_items=6"] if source == "uniform" else []
    if source == "teacher":  # the live oracle re-runs the teacher on every candidate: a few prompts show it
        domains.append("evaluate.qa_prompts=12")
    proc = run_train(tmp, "+experiment=smoke", f"inject.source={source}", "stages=[harvest,controller,evaluate]",
                     "alpha.value=1.0", *domains, run_dir=f"run-{source}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp / f"run-{source}" / "metrics.json").read_text())["evaluate"]
    first = json.loads((tmp / "run" / "metrics.json").read_text())["evaluate"]
    assert ev["source"] == source and ev["bits_per_byte"]["student"] == first["bits_per_byte"]["student"]
    if source == "uniform":
        assert ev["bits_per_byte"]["injected"] == ev["bits_per_byte"]["student"]
        assert ev["bits_per_byte"]["injected_minus_student"]["verdict"] == "no difference"
        loop = ev["qa_domains"]["causal_loop"]
        assert loop["num_prompts"] == 6 and loop["injected"] == loop["student"] and loop["teacher"] is not None
        assert loop["injected_minus_student"]["n"] == 6 and loop["injected_minus_student"]["verdict"] == "no difference"
        assert sum(c["n"] for c in loop["by_category"].values()) == 6
        assert "causal_loop QA accuracy" in proc.stdout
    else:
        assert ev["bits_per_byte"]["injected"] != ev["bits_per_byte"]["student"]
        if source == "shuffled":  # another text's rows: prompts have none
            assert ev["facts_qa"]["injected"] is None and "stored rows" in ev["facts_qa"]["injected_note"]
        else:  # the live oracle: the teacher reads each candidate's text itself
            assert 0 <= ev["facts_qa"]["injected"] <= 1 and "injected_minus_student" in ev["facts_qa"]
    assert f"injection ({source})" in proc.stdout


def test_smoke_auto_heads_profile_once_and_inject_the_top_heads(smoke_run):
    """inject.heads=auto: each head of the injected layers profiled alone on facts QA's train prompts (a cached
    sub-artifact, read again by the next run), the top k injected, the effect map reported and drawn."""
    tmp, _ = smoke_run
    overrides = ["+experiment=smoke", "stages=[harvest,controller,evaluate]", "inject.heads=auto",
                 "inject.top_k_heads=2", "inject.profile_items=4", "evaluate.qa_prompts=8"]
    proc = run_train(tmp, *overrides, run_dir="run-auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp / "run-auto" / "metrics.json").read_text())
    ev, first = metrics["evaluate"], json.loads((tmp / "run" / "metrics.json").read_text())["evaluate"]
    profile = ev["head_profile"]
    assert profile["num_prompts"] == 4 and len(profile["heads"]) == 2 * 4  # layers [1, 2] x 4 heads
    assert ev["heads"] == sorted(profile["selected"]) and len(ev["heads"]) == 2
    best = max(profile["loglik_delta"])
    assert profile["loglik_delta"][profile["heads"].index(profile["selected"][0])] == best
    assert ev["bits_per_byte"]["injected"] != first["bits_per_byte"]["injected"]  # 2 heads are not every head
    assert (tmp / "run-auto" / "figures" / "head_profile.png").exists()
    built = [k for k, v in metrics["artifacts"].items() if k.startswith("head_profile/")]
    assert len(built) == 1 and metrics["artifacts"][built[0]]["built"]
    again = run_train(tmp, *overrides, run_dir="run-auto2")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp / "run-auto2" / "metrics.json").read_text())
    assert not second["artifacts"][built[0]]["built"] and second["evaluate"]["heads"] == ev["heads"]


def test_emphasis_evaluates_qa_without_harvest_or_controller(tmp_path):
    """inject.source=emphasis steers the student's own attention: the evaluate stage alone runs on an empty cache
    (no harvest, no controller built), scores QA only, and the built-in prompts (no marked span) stay exactly as
    they are."""
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[evaluate]", "inject.source=emphasis",
                     "inject.heads=[[1,0],[2,3]]", "evaluate.qa_prompts=8", "evaluate.qa_domains=[causal_loop]",
                     "evaluate.qa_domain_items=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not any(k.startswith(("harvest", "controller")) for k in metrics["artifacts"])
    assert not (tmp_path / "cache" / "harvest").exists() and not (tmp_path / "cache" / "controller").exists()
    ev = metrics["evaluate"]
    assert ev["source"] == "emphasis(beta=100,form=bias)" and ev["heads"] == [[1, 0], [2, 3]]
    assert "bits_per_byte" not in ev and "no span" in ev["texts"]
    for qa in (ev["facts_qa"], ev["qa_domains"]["causal_loop"]):
        assert qa["correct"]["injected"] == qa["correct"]["student"] and qa["teacher"] is not None
    assert "injection (emphasis(beta=100,form=bias)): facts QA accuracy" in proc.stdout


def test_oracle_row_equals_a_run_that_injects_the_teacher(tmp_path):
    """evaluate.oracle scores the teacher oracle beside the controller, through the same setting a run with
    inject.source=teacher evaluates: the same bits per byte (held-out texts and an extra domain), habit distances and
    facts-QA answers, in the default's setting (per-head targets, sinks kept). The second run recomputes everything
    (no stored scores) and, its source being the oracle already, scores no second oracle."""
    common = ["+experiment=smoke", "stages=[harvest,controller,evaluate]", "controller.target=per_head",
              "inject.sinks=keep", "alpha.value=1.0", "evaluate.domains=[licenses]", "evaluate.qa_prompts=12",
              "evaluate.oracle=true", "evaluate.oracle_qa=true", "logger=csv", "evaluate.figure=false"]
    with_oracle = run_train(tmp_path, *common, run_dir="controller")
    assert with_oracle.returncode == 0, with_oracle.stdout[-3000:] + with_oracle.stderr[-3000:]
    shutil.rmtree(tmp_path / "cache" / "memo")  # the teacher run must measure, not read the first run's scores
    teacher = run_train(tmp_path, *common, "inject.source=teacher", run_dir="teacher")
    assert teacher.returncode == 0, teacher.stdout[-3000:] + teacher.stderr[-3000:]
    ev = json.loads((tmp_path / "controller" / "metrics.json").read_text())["evaluate"]
    oracle = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["evaluate"]
    assert ev["source"] == "controller" and "inject.source=teacher" in ev["oracle"]
    assert ev["head_matching"] == oracle["head_matching"] == "attention"  # which matching chose the per-head targets
    assert oracle["source"] == "teacher" and "oracle" not in oracle and "oracle" not in oracle["bits_per_byte"]
    for name in ("pydoc", "licenses"):
        mine, theirs = ev["domains"][name], oracle["domains"][name]
        assert mine["bits_per_byte"]["oracle"] == pytest.approx(theirs["bits_per_byte"]["injected"], rel=1e-6)
        assert mine["per_text"]["nll_oracle"] == pytest.approx(theirs["per_text"]["nll_injected"], rel=1e-6)
        assert mine["bits_per_byte"]["student"] == pytest.approx(theirs["bits_per_byte"]["student"], rel=1e-6)
        assert mine["bits_per_byte"]["oracle"] != mine["bits_per_byte"]["injected"]  # two settings, not one twice
        bpb = mine["bits_per_byte"]
        for difference, (a, b) in {"oracle_minus_student": ("oracle", "student"),
                                   "injected_minus_oracle": ("injected", "oracle")}.items():
            paired = bpb[difference]
            assert paired["estimate"] == pytest.approx(bpb[a] - bpb[b], abs=1e-9)
            assert paired["low"] <= paired["estimate"] <= paired["high"] and paired["n"] == mine["num_texts"]
    for layer, gaps in ev["habit_distance"].items():
        assert gaps["oracle"] == pytest.approx(oracle["habit_distance"][layer]["injected"], rel=1e-6)
    qa, qa_teacher = ev["facts_qa"], oracle["facts_qa"]
    assert qa["num_prompts"] == 12 and qa["correct"]["oracle"] == qa_teacher["correct"]["injected"]
    assert qa["oracle"] == qa_teacher["injected"] and "oracle_minus_student" in qa and "injected_minus_oracle" in qa
    header = next(line for line in with_oracle.stdout.splitlines() if "metric" in line and "reference" in line)
    assert 0 < header.index("injected") < header.index("oracle")  # the oracle column beside the injected one
    assert "oracle (the teacher's attention, injected alike): bits per byte" in with_oracle.stdout
    assert "oracle (the teacher's attention" not in teacher.stdout


def test_bad_heads_fail_before_loading(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "inject.heads=[[1,9]]")
    assert proc.returncode != 0
    assert "inject.heads: [[1, 9]] outside the injected heads; valid: layers [1, 2] (inject.layers), heads 0..3" in \
        proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing built, nothing loaded


def test_missing_artifact_with_stage_switched_off_is_named(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[controller,evaluate]")
    assert proc.returncode != 0
    assert "no harvest artifact" in proc.stderr and "stages=[...]" in proc.stderr
    assert "Traceback" in proc.stderr  # a failure of the run, not of its config, keeps its traceback


def test_bad_layer_fails_before_loading(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "inject.layers=[7]")
    assert proc.returncode != 0
    assert "inject.layers=[7]: [7] outside the student's layers 0..2" in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing built, nothing loaded


@pytest.mark.real
def test_real_packaged_pair_end_to_end(tmp_path, converted_models):
    """Gemma 3 270M -> SmolLM2-135M on a few short texts completes and writes metrics.json."""
    proc = run_train(
        tmp_path, "+experiment=default", "data.num_texts=6", "harvest.max_length=32", "inject.layers=[15]",
        "controller.max_epochs=1", "evaluate.num_texts=2", "evaluate.qa_prompts=4", "gate.eval_alphas=[1.0]",
        "gate.max_epochs=2", "evaluate.domains=[]", "logger=csv", timeout=900, models=converted_models,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    bpb = metrics["evaluate"]["bits_per_byte"]
    assert 0.3 < bpb["teacher"] < 3 and 0.3 < bpb["student"] < 3, bpb
    assert 0.3 < bpb["oracle"] < 3 and "oracle_minus_student" in bpb  # the default's ceiling row
    assert metrics["controller"]["heldout_kl"]["student_self"] > 0


def test_same_tokenizer_pair_reports_next_token_kl_and_identity_alignment(tmp_path):
    """tiny_gemma3 and tiny_qwen2 share the bpe tokenizer: identity alignment, next-token KL available."""
    proc = run_train(tmp_path, "+experiment=smoke", "student=tiny_qwen2", "controller.max_epochs=1", "logger=csv",
                     "evaluate.figure=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    kl = metrics["evaluate"]["next_token_kl"]
    assert kl["student"] > 0 and kl["injected"] > 0 and kl["student"] != kl["injected"]
    from uzr.harvest.store import HarvestStore

    rows = HarvestStore(metrics["artifacts"]["harvest"]["path"]).rows()
    assert all(float(rows[i]["align_dropped_mass"]) == 0.0 for i in range(len(rows)))
