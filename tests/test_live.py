"""``python -m uzr.live`` on the smoke experiment, and the gated evaluation table on its artifacts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import ROOT, offline_env, share_models


def run_live(tmp_path, *args: str, timeout: int = 600, experiment: str = "smoke",
             stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "uzr.live", f"+experiment={experiment}", "logger=csv",
           f"paths.cache_dir={tmp_path / 'cache'}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          input=stdin)


@pytest.fixture(scope="module")
def live_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    proc = run_live(tmp, "--prompt", "What is the capital of France?", "--json", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, json.loads(proc.stdout)


def test_live_json_first_run_builds_artifacts(live_cache):
    _, result = live_cache
    assert 0.0 <= result["gate"] <= 1.0
    assert set(result["alpha"]) == {"L1", "L2"}  # one alpha per injected layer of the smoke experiment
    for value in result["alpha"].values():
        assert value == pytest.approx(result["alpha_base"] * result["gate"])  # constant schedule x gate
    assert set(result["answers"]) == {"student", "injected", "teacher"}
    assert all(isinstance(a, str) for a in result["answers"].values())
    assert result["gate_level"] == "token"
    assert result["confidence"] == ("CONFIDENT" if result["gate"] >= 0.5 else "CAUTIOUS" if result["gate"] >= 0.25
                                    else "WAFFLE")
    check = result["fact_check"]  # the capital of France is in the fact tables: every answer is judged
    assert check["fact_answer"] == "Paris" and set(check["verdicts"]) == {"student", "injected", "teacher"}
    assert all(isinstance(v["correct"], bool) for v in check["verdicts"].values())
    assert all(result["artifacts"][kind]["built"] for kind in ("harvest", "controller", "gate"))


def test_live_second_prompt_reuses_artifacts(live_cache):
    tmp, first = live_cache
    proc = run_live(tmp, "--prompt", "What is the capital of Mars?", "--json", "--max-new-tokens", "4",
                    "alpha.value=2.0", "++alpha.layer_weights={2: 0.5}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert not any(result["artifacts"][kind]["built"] for kind in ("harvest", "controller", "gate"))
    check = result["fact_check"]  # the prompt set asks it as a false premise: no answer is right
    assert check["kind"] == "unanswerable" and check["fact_answer"] is None
    assert not any(v["correct"] for v in check["verdicts"].values())

    assert result["artifacts"]["gate"]["key"] == first["artifacts"]["gate"]["key"]  # alpha is not in the gate key
    assert result["alpha"]["L1"] == pytest.approx(2.0 * result["gate"])
    assert result["alpha"]["L2"] == pytest.approx(1.0 * result["gate"])


def test_live_rejects_bad_config_before_loading(tmp_path):
    proc = run_live(tmp_path, "--prompt", "x", "--json", "gate.pool=max")
    assert proc.returncode == 2
    assert "gate.pool='max'" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_evaluate_gated_table_on_smoke(live_cache):
    from uzr.gate import evaluate_gated, gated_table
    from uzr.live import compose_config, ensure_artifacts

    tmp, _ = live_cache
    cfg = compose_config(["+experiment=smoke", f"paths.cache_dir={tmp / 'cache'}", "gate.eval_alphas=[1.0]"])
    run = ensure_artifacts(cfg, build=False)
    store, controllers, gate = (run.artifacts[n] for n in ("harvest", "controller", "gate"))
    result = evaluate_gated(cfg, store, controllers.controllers, gate, run.models, num_texts=2, num_prompts=6)
    table = result["table"]
    assert list(table) == ["none", "constant@0.5", "constant@1", "gated@0.5", "gated@1"]
    assert result["num_prompts"] == 6 and result["num_texts"] == 2
    for name, row in table.items():
        assert 0.0 <= row["qa_accuracy"] <= 1.0
        assert math.isfinite(row["bits_per_byte"]) and row["bits_per_byte"] > 0
        if name.startswith("gated"):
            assert 0.0 <= row["mean_gate_qa"] <= 1.0 and 0.0 <= row["mean_gate_text"] <= 1.0
    bpb = {name: row["bits_per_byte"] for name, row in table.items()}
    assert bpb["constant@1"] != bpb["none"] and bpb["gated@1"] != bpb["none"]
    assert 0 <= result["teacher"]["qa_accuracy"] <= 1 and result["teacher"]["bits_per_byte"] > 0
    assert set(result["gate_by_kind"]) == {"answerable", "unanswerable"}
    header, rows = gated_table(result)
    assert header[0] == "setting" and rows[-1][0] == "teacher" and len(rows) == 6


def test_live_with_prompt_level_gate(live_cache):
    """gate=prompt: the teacher answers the prompt set, labels are written, the store and controller are reused.
    The tiny random teacher never states a fact-table answer, so its labels leave correctness out."""
    tmp, _ = live_cache
    proc = run_live(tmp, "gate=prompt", "gate.max_new_tokens=6", "gate.max_epochs=5", "gate.check_answers=false", "--prompt",
                    "Who wrote Hamlet?", "--json", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["gate_level"] == "prompt" and 0.0 <= result["gate"] <= 1.0
    assert result["artifacts"]["gate"]["built"] and not result["artifacts"]["controller"]["built"]
    from pathlib import Path

    gate_dir = Path(result["artifacts"]["gate"]["path"])
    labels = [json.loads(line) for line in (gate_dir / "labels.jsonl").read_text().splitlines()]
    assert len(labels) >= 400 and {"CONFIDENT"} < {row["label"] for row in labels}
    report = json.loads((gate_dir / "gate.json").read_text())["report"]
    assert report["level"] == "prompt" and "verdict" in report
    answers = next(v for k, v in result["artifacts"].items() if k.startswith("teacher_answers/"))
    assert answers["built"]
    # labelled differently: a new gate from the same cached teacher answers
    proc = run_live(tmp, "gate=prompt", "gate.max_new_tokens=6", "gate.max_epochs=5", "gate.check_answers=false",
                    "gate.confident_quantile=0.4", "--prompt", "Who wrote Hamlet?", "--json", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert again["artifacts"]["gate"]["built"] and again["artifacts"]["gate"]["key"] != result["artifacts"]["gate"]["key"]
    assert again["artifacts"][f"teacher_answers/{answers['key']}"]["built"] is False


def test_a_prompt_gate_is_compared_with_the_runs_own_token_gate(live_cache):
    """The token gate beside a prompt gate is the artifact a gate=token run of the same settings has (the one the
    live_cache fixture built, so nothing is trained here), scored on the prompt gate's held-out labels."""
    from uzr.gate.comparison import KNOWN, NO_ANSWER, UNKNOWN
    from uzr.gate.stage import gate_comparison
    from uzr.live import compose_config, ensure_artifacts

    tmp, token_run = live_cache
    cfg = compose_config(["+experiment=smoke", f"paths.cache_dir={tmp / 'cache'}", "gate=prompt", "gate.max_new_tokens=6",
                          "gate.max_epochs=5", "gate.check_answers=false"])
    run = ensure_artifacts(cfg, build=False)  # test_live_with_prompt_level_gate built it
    result = gate_comparison(run, run.artifacts["gate"])
    token_gate = next(v for k, v in run.artifact_records().items() if k.startswith("gate/"))
    assert token_gate["path"] == token_run["artifacts"]["gate"]["path"] and token_gate["built"] is False
    assert result["n_heldout"] == 246 and set(result["mean_gate"]) <= {KNOWN, UNKNOWN, NO_ANSWER}
    assert sum(v["n"] for v in result["mean_gate"].values()) == 246
    assert set(result["demo"]) == {"What is the capital of France?", "What is the capital of Mars?"}
    for name in ("prompt_gate", "token_gate"):
        assert 0 <= result["auroc"][name] <= 1
    d = result["difference"]
    assert d["low"] <= d["estimate"] <= d["high"]
    assert abs(d["estimate"] - (result["auroc"]["prompt_gate"] - result["auroc"]["token_gate"])) < 1e-12


def test_gate_table_and_live_demo_keep_sinks_like_the_evaluate_stage(live_cache, monkeypatch):
    """``inject.sinks=keep`` reaches the gate table's injected rows and the live demo's injector: the gate table's
    constant row is the evaluate stage's injected student (computed apart, no shared memo), and keep and replace
    are stored under different keys, so neither reads the other's scores."""
    import uzr.generation
    from uzr.evaluate.stage import EvaluateStage
    from uzr.gate import evaluate_gated
    from uzr.injection.sinks import run_sinks
    from uzr.live import LiveSession, compose_config, ensure_artifacts
    from uzr.qa.facts import plain_qa_scores

    tmp, _ = live_cache
    # the tiny random student attends almost uniformly (mean share ratios 1.000-1.008 on the smoke store), so a
    # ratio just above 1 is what detects sink tokens on it
    base = ["+experiment=smoke", f"paths.cache_dir={tmp / 'cache'}", "gate.eval_alphas=[0.5]", "inject.sink_ratio=1.005",
            "evaluate.num_texts=1", "evaluate.qa_prompts=2", "evaluate.figure=false"]
    keep_cfg, replace_cfg = compose_config([*base, "inject.sinks=keep"]), compose_config(base)
    run = ensure_artifacts(keep_cfg, build=False)
    store, controllers, gate = run.artifacts["harvest"], run.artifacts["controller"].controllers, run.artifacts["gate"]
    sinks = run_sinks(keep_cfg, store, run.memo)
    assert any(s.first or s.token_ids for s in sinks.values()) and run_sinks(replace_cfg, store, run.memo) is None

    evaluated = EvaluateStage().report(run, None)  # keeps its injected scores in the cache (run.stored)
    assert evaluated["sinks"]["mode"] == "keep"
    constant = f"constant@{keep_cfg.alpha.value:g}"
    def plain_qa(role):  # the uninjected scores (cached per model), not what is compared here
        return plain_qa_scores(run, role)

    alone = evaluate_gated(keep_cfg, store, controllers, gate, run.models, plain_qa=plain_qa)["table"]  # no memo
    assert alone[constant]["bits_per_byte"] == evaluated["bits_per_byte"]["injected"]
    assert alone[constant]["qa_accuracy"] == evaluated["facts_qa"]["injected"]
    assert alone["none"]["bits_per_byte"] == evaluated["bits_per_byte"]["student"]

    # replace through the same stored cache: it would read keep's scores if the keys left the sinks out
    replaced = evaluate_gated(replace_cfg, store, controllers, gate, run.models, plain_qa=plain_qa,
                              stored=run.stored)["table"]
    gated = f"gated@{keep_cfg.alpha.value:g}"
    for name in (constant, gated):
        assert replaced[name]["bits_per_byte"] != alone[name]["bits_per_byte"]
    assert replaced["none"]["bits_per_byte"] == alone["none"]["bits_per_byte"]

    # the live demo injects with the same sinks
    seen = []
    original = uzr.generation.generate_answers

    def spy(*args, injector=None, **kwargs):
        seen.append(injector)
        return original(*args, injector=injector, **kwargs)

    monkeypatch.setattr(uzr.generation, "generate_answers", spy)
    result = LiveSession(keep_cfg, run, max_new_tokens=2).answer("Who wrote Hamlet?")
    assert result["sinks"] == "keep"
    assert seen[0] is None and seen[1].sinks == {layer: s for layer, s in sinks.items() if s.first or s.token_ids}


DEMO_PROMPTS = ["What is the capital of France?", "What is the capital of Mars?", "Who wrote Hamlet?",
                "What is the boiling point of happiness?"]


@pytest.mark.real
def test_demo_on_the_packaged_pair_shows_the_gate_its_level_and_three_answers(tmp_path, converted_models):
    """The README's demo prompts on Gemma 3 270M -> SmolLM2-135M, one interactive session (--json: one line per
    prompt): the structure of what a user sees, not its numbers (the artifacts are cut down to build fast)."""
    share_models(tmp_path / "cache", converted_models)
    proc = run_live(tmp_path, "data.num_texts=6", "harvest.max_length=32", "inject.layers=[15]",
                    "controller.max_epochs=1", "gate.max_epochs=2", "--json", "--max-new-tokens", "12",
                    experiment="default", stdin="\n".join(DEMO_PROMPTS) + "\n", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in results] == DEMO_PROMPTS
    for r in results:
        assert 0.0 <= r["gate"] <= 1.0 and r["confidence"] in ("CONFIDENT", "CAUTIOUS", "WAFFLE")
        assert set(r["answers"]) == {"student", "injected", "teacher"}
        assert all(isinstance(a, str) for a in r["answers"].values())
        assert r["alpha"]["L15"] == pytest.approx(r["alpha_base"] * r["gate"])
        assert (r["student"], r["teacher"]) == ("smollm2_135m", "gemma3_270m")
    france, mars, hamlet, happiness = (r["fact_check"] for r in results)
    assert france["fact_answer"] == "Paris" and hamlet["fact_answer"] == "William Shakespeare"
    assert mars["kind"] == "unanswerable" and not any(v["correct"] for v in mars["verdicts"].values())
    assert happiness is None  # not in the fact tables: nothing to check it against
    assert set(france["verdicts"]) == {"student", "injected", "teacher"}


def test_render_shows_the_level_and_three_answers_marked_against_the_fact_tables():
    import io

    from rich.console import Console

    from uzr.live import render

    result = {"prompt": "What is the capital of France?", "gate": 0.31, "confidence": "CAUTIOUS",
              "alpha": {"L15": 0.155}, "alpha_base": 0.5, "mode": "bias", "student": "s", "teacher": "t",
              "answers": {"student": "Paris.", "injected": "La femme", "teacher": "The capital is Paris."},
              "fact_check": {"fact_answer": "Paris", "kind": "answerable",
                             "verdicts": {"student": {"correct": True}, "injected": {"correct": False},
                                          "teacher": {"correct": True}}}}
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render(result, console)
    shown = console.file.getvalue()
    assert "CAUTIOUS" in shown and "0.310" in shown and "0.155" in shown
    assert "La femme" in shown and "The capital is Paris." in shown and "(teacher, reference)" in shown
    assert shown.count("right") == 2 and shown.count("wrong") == 1
    render({**result, "answers": {**result["answers"], "teacher": None}, "fact_check": None}, console)
