"""The gate stage's generated-answer evaluation (uzr.gate.answers): student, constant and gated injection at
alpha.value, greedy answers judged against the fact tables, on the smoke pair."""

from __future__ import annotations

import json

import pytest

from uzr.gate.answers import CONSTANT, GATED, STUDENT, changed_examples
from uzr.qa.facts import qa_prompts

from .test_pipeline import run_train


@pytest.fixture(scope="module")
def answers_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("answers")
    proc = run_train(tmp, "+experiment=smoke", "stages=[harvest,controller,gate]", "gate.generated_answers=4",
                     "gate.answer_tokens=6", "logger=csv")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_section_structure_and_counts_add_up(answers_run):
    tmp, proc = answers_run
    section = json.loads((tmp / "run" / "metrics.json").read_text())["gate"]["generated_answers"]
    assert section["n"] == 4 and section["answer_tokens"] == 6 and section["alpha"] == 0.5
    assert set(section["right"]) == {STUDENT, CONSTANT, GATED}
    assert all(0 <= r <= 4 for r in section["right"].values())
    for name in (CONSTANT, GATED):
        c = section["vs_student"][name]
        assert c["n"] == 4 and c["right_before"] == section["right"][STUDENT] and c["right_after"] == section["right"][name]
        assert c["wrecked"] <= c["right_before"] and c["rescued"] <= c["n"] - c["right_before"]
        assert c["right_after"] - c["right_before"] == c["rescued"] - c["wrecked"]
        d = c["difference"]
        assert d["estimate"] == pytest.approx((c["right_after"] - c["right_before"]) / 4)
        assert d["low"] <= d["estimate"] <= d["high"] and d["verdict"] in ("better", "worse", "no difference")
        assert len(c["examples"]["wrecked"]) == min(c["wrecked"], 5)
        assert len(c["examples"]["rescued"]) == min(c["rescued"], 5)
    assert "generated answers: 4 held-out answerable prompts" in proc.stdout


def test_off_by_default_leaves_no_section(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[harvest,controller,gate]", "logger=csv")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "generated_answers" not in json.loads((tmp_path / "run" / "metrics.json").read_text())["gate"]
    assert "generated answers" not in proc.stdout


def test_changed_examples_pick_wrecked_and_rescued_in_prompt_order():
    prompts = qa_prompts(0, 0.25, 8)
    before, after = [f"b{i}" for i in range(8)], [f"a{i}" for i in range(8)]
    right_before = [True, True, False, False, True, False, True, True]
    right_after = [True, False, True, False, False, False, True, True]
    out = changed_examples(prompts, before, after, right_before, right_after)
    assert [e["before"] for e in out["wrecked"]] == ["b1", "b4"]
    assert [e["after"] for e in out["rescued"]] == ["a2"]
    assert out["rescued"][0]["question"] == prompts[2].question and out["rescued"][0]["fact_answer"] == prompts[2].answer


def section(student, constant, ids=("a", "b", "c", "d", "e", "f")):
    return {"n": len(ids), "ids": list(ids), "correct": {STUDENT: student, CONSTANT: constant, GATED: constant}}


def test_compare_runs_pairs_two_controllers_on_the_same_prompts_and_student():
    from uzr.gate.answers import compare_runs

    student = [True, True, True, True, False, False]
    pydoc = section(student, [False, False, True, True, True, False])  # wrecks 2, rescues 1
    chat = section(student, [True, True, True, True, True, False])  # wrecks none, rescues 1
    out = compare_runs(pydoc, chat)
    assert out["wrecked"] == {"a": 2, "b": 0} and out["rescued"] == {"a": 1, "b": 1}
    assert out["right"] == {"a": 3, "b": 5}
    assert out["wrecked_rate"]["estimate"] == pytest.approx(-2 / 6)
    assert out["accuracy"]["estimate"] == pytest.approx(2 / 6)
    assert out["wrecked_rate"]["verdict"] in ("better", "no difference")  # fewer wrecked is better
    with pytest.raises(ValueError, match="different prompts"):
        compare_runs(pydoc, section(student, student, ids="uvwxyz"))
    with pytest.raises(ValueError, match="uninjected students answered differently"):
        compare_runs(pydoc, section([not s for s in student], student))
    with pytest.raises(ValueError, match="per-prompt verdicts"):
        compare_runs({"n": 6}, chat)


def test_the_section_keeps_per_prompt_verdicts_for_pairing_runs(answers_run):
    tmp, _ = answers_run
    section_ = json.loads((tmp / "run" / "metrics.json").read_text())["gate"]["generated_answers"]
    assert section_["ids"] == [p.id for p in qa_prompts(0, 0.25, 4)]
    assert {k: sum(v) for k, v in section_["correct"].items()} == section_["right"]


def test_the_command_line_pairs_two_run_folders(tmp_path, capsys):
    from uzr.gate.answers import main

    student = [True, True, False, False, True, True]
    for name, constant in (("a", [False, True, False, False, True, True]), ("b", student)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"gate": {"generated_answers": section(student, constant)}}))
    main([str(tmp_path / "a"), str(tmp_path / "b")])
    out = json.loads(capsys.readouterr().out)
    assert out["wrecked"] == {"a": 1, "b": 0} and out["setting"] == CONSTANT
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text(json.dumps({"gate": {}}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "c")])
    assert "has no gate.generated_answers" in capsys.readouterr().err
