"""The prompt-level gate: labels that mean "the teacher answers this confidently and correctly", and a gate that
learns them from the student's side."""

from __future__ import annotations

import json

import pytest
import torch

from uzr.gate import CAUTIOUS, CONFIDENT, WAFFLE, GateSpec, fit_gate, prompt_label, prompt_labels
from uzr.gate.stage import gate_payload, prompt_dataset
from uzr.qa.prompts import PromptSet

from .conftest import resolved
from .test_gate import random_controllers

EASY = ("roman", "number_word")  # the toy's CONFIDENT categories: their own question templates


def test_a_confident_wrong_answer_is_not_confident():
    assert prompt_label("Lyon.", 0.2, 1.0, 3.0, correct=False) == CAUTIOUS
    assert prompt_label("Paris.", 0.2, 1.0, 3.0, correct=True) == CONFIDENT
    assert prompt_label("Paris.", 0.2, 1.0, 3.0, correct=None) == CONFIDENT  # nothing checked: as before
    assert prompt_label("Paris.", 4.0, 1.0, 3.0, correct=True) == WAFFLE  # right but unsure
    answers = [("Paris.", 0.1), ("Lyon.", 0.1), ("Oslo.", 0.1), ("Lima.", 5.0)]
    labels, _ = prompt_labels(answers, [True] * 4, GateSpec(confident_entropy=1.0, waffle_entropy=3.0),
                              [True, False, None, True])
    assert labels == [CONFIDENT, CAUTIOUS, CONFIDENT, WAFFLE]


def test_check_answers_is_in_a_prompt_gate_key_only():
    token = [gate_payload(resolved("+experiment=smoke", f"gate.check_answers={c}"), "k") for c in ("true", "false")]
    assert token[0] == token[1] and "check_answers" not in token[0]["gate"]
    assert "prompt_labels_version" not in token[0]
    prompt = [gate_payload(resolved("+experiment=smoke", "gate=prompt", f"gate.check_answers={c}"), "k")
              for c in ("true", "false")]
    assert prompt[0] != prompt[1] and prompt[0]["prompt_labels_version"] >= 2


def toy_teacher(prompts):
    """Answers the EASY categories right and confidently, everything else confidently wrong or unsure."""
    by_question = {p.question: p for p in PromptSet().all}
    out = []
    for question in prompts:
        p = by_question[question]
        if p.category in EASY:
            out.append({"answer": f"It is {p.answer}.", "mean_entropy": 0.1})
        elif p.answerable and p.category == "capital":
            out.append({"answer": "Atlantis.", "mean_entropy": 0.1})  # confident, wrong
        else:
            out.append({"answer": "Paris.", "mean_entropy": 0.1 if p.answerable else 2.0})
    return out


@pytest.fixture(scope="module")
def toy_prompt_data(tiny_models, tmp_path_factory):
    """prompt_dataset on the tiny llama student with the toy teacher (the teacher model is never run)."""
    model, tok = tiny_models["llama"]
    layers = [1, 2]
    folder = tmp_path_factory.mktemp("prompt-gate")
    spec = GateSpec(label="prompt", prompt_format="qa", confident_entropy=1.0, waffle_entropy=3.0, hidden=32, dropout=0.0, max_epochs=40, batch_size=64, lr=3e-3)
    answers = toy_teacher([p.question for p in PromptSet().all])
    data = prompt_dataset(model, tok, answers, random_controllers(model, layers), layers, spec, folder)
    return data, folder, spec, layers


def test_prompt_labels_check_the_teachers_answers(toy_prompt_data):
    data, folder, _, _ = toy_prompt_data
    rows = [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]
    prompts = PromptSet().all
    assert len(rows) == len(prompts)
    by_category = {p.id: p.category for p in prompts}
    for row in rows:
        easy = by_category[row["id"]] in EASY
        assert row["correct"] == easy and (row["label"] == CONFIDENT) == easy, row
    capital = next(r for r in rows if r["question"] == "What is the capital of France?")
    assert capital["verdict"] == "answer absent" and capital["label"] == CAUTIOUS  # confident but wrong
    counts = data["label_info"]["label_counts"]
    n_easy = sum(p.category in EASY for p in prompts)
    assert sum(c[CONFIDENT] for c in counts.values()) == n_easy
    assert sum(data["label_info"]["teacher_right"].values()) == n_easy
    assert int(data["train"][1].sum() + data["heldout"][1].sum()) == n_easy


def test_a_gate_on_separable_prompt_labels_ranks_them(toy_prompt_data):
    data, _, spec, layers = toy_prompt_data
    gate = fit_gate(*data["train"], *data["heldout"], spec, level="prompt", layers=layers, seed=0)
    report = gate.report()
    assert report["gate"]["auroc"] > 0.97, report
    scores = gate.predict_proba(data["heldout"][0])
    y = data["heldout"][1]
    assert float(scores[y].mean()) > float(scores[~y].mean()) + 0.5
    assert torch.isfinite(scores).all()


def test_answering_shows_a_progress_bar_with_eta(tiny_models, capsys):
    from uzr.generation import generate_answers
    from uzr.qa.prompts import format_prompt

    model, tok = tiny_models["llama"]
    texts = [format_prompt("Who wrote Hamlet?"), format_prompt("What is 2 plus 2?"), format_prompt("Hi?")]
    generate_answers(model, tok, texts, max_new_tokens=2, batch_size=2, desc="teacher answers")
    err = capsys.readouterr().err
    assert "teacher answers" in err and "3/3" in err and "<" in err  # tqdm: elapsed<remaining
    generate_answers(model, tok, texts, max_new_tokens=2, batch_size=2)
    assert "teacher answers" not in capsys.readouterr().err  # no desc, no bar


def test_compare_gates_scores_both_gates_on_the_prompt_labels_and_groups_them_by_kind():
    from uzr.gate.comparison import KNOWN, NO_ANSWER, UNKNOWN, compare_gates

    rows = ([{"kind": "answerable", "correct": True, "label": CONFIDENT}] * 4
            + [{"kind": "answerable", "correct": False, "label": CAUTIOUS}] * 3
            + [{"kind": "unanswerable", "correct": False, "label": "WAFFLE"}] * 3)
    ranks = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.25, 0.15, 0.05]  # separates CONFIDENT from the rest
    inverted = [1 - v for v in ranks]
    result = compare_gates(rows, {"prompt_gate": [*ranks, 0.9, 0.1], "token_gate": [*inverted, 0.2, 0.7]},
                           demo=["France?", "Mars?"])
    assert result["auroc"] == {"prompt_gate": 1.0, "token_gate": 0.0}
    assert result["difference"]["estimate"] == 1.0 and result["difference"]["low"] == 1.0
    assert result["mean_gate"][KNOWN]["prompt_gate"] == pytest.approx(0.75) and result["mean_gate"][KNOWN]["n"] == 4
    assert result["mean_gate"][UNKNOWN]["token_gate"] == pytest.approx(0.8)
    assert result["mean_gate"][NO_ANSWER]["prompt_gate"] == pytest.approx(0.15)
    assert result["demo"] == {"France?": {"prompt_gate": 0.9, "token_gate": 0.2},
                              "Mars?": {"prompt_gate": 0.1, "token_gate": 0.7}}
    assert result["positives"] == 4 and result["n_heldout"] == 10
