"""Checkable QA domains of the evaluate stage (``evaluate.qa_domains``): items, candidates, config validation, and
an end-to-end run of the attention-bound domains on the tiny models."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import resolved
from tests.test_pipeline import run_train
from uzr.config.evaluate import EvaluateSpec
from uzr.evaluate.qa import causal_loop_prompts, domain_prompts
from uzr.qa.attention_bound import (
    RELATIONS,
    WORDS,
    context_override_prompts,
    induction_prompts,
    kv_retrieval_prompts,
)
from uzr.tasks.causal_loop import parse_assignments, score_answer


def test_causal_loop_items_have_one_right_and_three_one_variable_wrong_candidates():
    prompts = causal_loop_prompts(40, seed=3)
    assert {p.category for p in prompts} == {"level_1", "level_2", "level_3", "level_4"}
    for p in prompts:
        assert len(set(p.candidates)) == 4 and p.candidates[p.correct_index()] == p.answer
        assert [score_answer(c, p.answer)[0] for c in p.candidates].count(True) == 1
        want = parse_assignments(p.answer)
        modulus = re.search(r"modulo (\d+)", p.question)
        for c in p.candidates:
            got = parse_assignments(c)
            assert set(got) == set(want) and sum(got[k] != want[k] for k in want) == (c != p.answer)
            if modulus:
                assert all(0 <= v < int(modulus[1]) for v in got.values())
    assert causal_loop_prompts(40, seed=3) == prompts and causal_loop_prompts(40, seed=4) != prompts
    # the right answer's position is shuffled, not fixed
    assert len({p.correct_index() for p in prompts}) == 4


@pytest.mark.parametrize("override, match", [
    ("evaluate.qa_domains=[causal_loop,trivia]", r"evaluate.qa_domains=\['causal_loop', 'trivia'\] is invalid "
                                                 r"\(unknown: \['trivia'\]\); valid: distinct names from causal_loop"),
    ("evaluate.qa_domains=[causal_loop,causal_loop]", r"evaluate.qa_domains=.*valid: distinct names"),
    ("evaluate.qa_domain_items=-1", r"evaluate.qa_domain_items=-1 is invalid; valid: an integer >= 0"),
    ("evaluate.qa_domains=[kv_retrieval,trivia]", r"unknown: \['trivia'\]\); valid: distinct names from causal_loop, "
                                                 r"kv_retrieval, context_override, induction"),
    ("evaluate.qa_kv_facts=[8,3]", r"evaluate.qa_kv_facts=\[8, 3\] is invalid; valid: a non-empty list of integers in "
                                   r"\[4, 200\]"),
    ("evaluate.qa_kv_facts=[]", r"evaluate.qa_kv_facts=\[\] is invalid"),
    ("evaluate.qa_induction_words=[1000]", r"evaluate.qa_induction_words=\[1000\] is invalid; .* \[4, \d+\]"),
    ("evaluate.qa_domains=[context_override] evaluate.qa_domain_items=5000",
     r"evaluate.qa_domain_items=5000 is invalid; valid: an integer <= \d+, the distinct counterfactual items"),
])
def test_bad_qa_domain_config_fails_before_models_load(override, match):
    with pytest.raises(ValueError, match=match):
        resolved("+experiment=smoke", *override.split())


def test_qa_domains_default_to_none():
    assert resolved("+experiment=default").evaluate.qa_domains == []


def fact_lines(question: str) -> tuple[str, list[tuple[str, str]], str]:
    """A kv_retrieval question's passage, its (key, value) facts in order, and the question line."""
    passage, asked = question.split("\n\n")
    facts = [re.fullmatch(r"(\w+'s [a-z ]+) is (\d{4})\.", line).groups() for line in passage.split("\n")]
    return passage, facts, asked


def assert_marked_passage(p, passage: str) -> None:
    """The marked span is exactly the passage, and the question after it holds no passage text."""
    assert len(p.marked) == 1 and p.question[slice(*p.marked[0])] == passage and p.marked[0][0] == 0
    assert p.question[p.marked[0][1]:].startswith("\n\n") and "\n" not in p.question[p.marked[0][1] + 2:]


def test_kv_retrieval_asks_one_key_with_distractors_from_the_same_passage():
    prompts = kv_retrieval_prompts(36, seed=1, facts=[4, 9, 30])
    for p in prompts:
        passage, facts, asked = fact_lines(p.question)
        values = dict(facts)
        key = re.fullmatch(r"What is (\w+'s [a-z ]+)\?", asked)[1]
        assert len(values) == len(facts) and len(set(values.values())) == len(facts)  # distinct keys and values
        assert p.answer == values[key] and p.candidates[p.correct_index()] == p.answer
        assert len(set(p.candidates)) == 4 and set(p.candidates) <= set(values.values())  # distractors: other keys'
        assert p.tags["length"] == f"{len(facts)} facts" and p.split == "heldout" and p.category == "kv_retrieval"
        third = ["start", "middle", "end"].index(p.tags["position"])
        index = [k for k, _ in facts].index(key)
        assert third * len(facts) // 3 <= index < (third + 1) * len(facts) // 3
        assert_marked_passage(p, passage)
        (a, b), = p.evidence  # the evidence is the asked line, nothing more
        assert p.question[a:b] == f"{key} is {p.answer}." == passage.split("\n")[index]
    cells = {(p.tags["length"], p.tags["position"]) for p in prompts}
    assert len(cells) == 9  # every length at every position
    assert len({p.correct_index() for p in prompts}) == 4
    assert kv_retrieval_prompts(36, seed=1, facts=[4, 9, 30]) == prompts
    assert kv_retrieval_prompts(36, seed=2, facts=[4, 9, 30]) != prompts
    train = kv_retrieval_prompts(36, seed=1, facts=[4, 9, 30], split="train")
    assert {p.split for p in train} == {"train"} and not {p.question for p in train} & {p.question for p in prompts}


def test_context_override_follows_the_passage_against_the_memorised_answer():
    prompts = context_override_prompts(40, seed=0)
    frames = {relation: re.escape(frame).replace(r"\{subject\}", "(?P<subject>.+)").replace(r"\{value\}", "(?P<value>.+)")
              for relation, (frame, _, _) in RELATIONS.items()}
    for p in prompts:
        passage, question = p.question.split("\n\n")
        stated = re.fullmatch(frames[p.tags["relation"]], passage)
        _, asked, table = RELATIONS[p.tags["relation"]]
        memorised = table[stated["subject"]]
        assert question == asked.format(subject=stated["subject"])
        assert p.answer == stated["value"] != memorised and memorised in p.candidates
        assert len(set(p.candidates)) == 4 and set(p.candidates) <= set(table.values())
        assert_marked_passage(p, passage)
        assert p.evidence == p.marked  # a one-sentence passage is its own evidence
    assert [p.tags["relation"] for p in prompts[:4]] == list(RELATIONS) and len({p.question for p in prompts}) == 40
    assert context_override_prompts(40, seed=0) == prompts and context_override_prompts(40, seed=1) != prompts
    # no subject of a held-out item is asked in the train items
    subject = {p.id: p.question.split("\n\n")[1] for p in prompts}
    train = context_override_prompts(200, seed=0, split="train")
    assert not set(subject.values()) & {p.question.split("\n\n")[1] for p in train}


def test_induction_candidates_share_the_repeat_and_differ_in_the_next_word():
    prompts = induction_prompts(30, seed=0, words=[5, 40])
    for p in prompts:
        passage, question = p.question.split("\n\n")
        sequence = passage.removeprefix("Words: ").split()
        assert len(set(sequence)) == len(sequence) and set(sequence) <= set(WORDS)
        assert question == "Repeat these words in order."
        *repeat, last = p.answer.split()
        assert sequence[:len(repeat)] == repeat and last == sequence[len(repeat)] and len(repeat) >= 1
        assert len(set(p.candidates)) == 4 and p.candidates[p.correct_index()] == p.answer
        for candidate in p.candidates:  # the same repeated words, then another word of the list
            *words, next_word = candidate.split()
            assert words == repeat and next_word in sequence
        assert p.tags == {"length": f"{len(sequence)} words"}
        assert_marked_passage(p, passage)
        (a, b), = p.evidence  # the last repeated word and the word that followed it in the list
        assert p.question[a:b] == f"{repeat[-1]} {last}"
    assert len({len(p.answer.split()) for p in prompts}) > 5  # the repeat stops at varying words
    assert induction_prompts(30, seed=0, words=[5, 40]) == prompts and induction_prompts(30, seed=3, words=[5, 40]) != prompts


def test_each_domain_has_its_default_item_count_and_a_smaller_knob():
    ev = EvaluateSpec()
    counts = {name: len(domain_prompts(name, ev)) for name in ("causal_loop", "kv_retrieval", "context_override",
                                                              "induction")}
    assert counts == {"causal_loop": 64, "kv_retrieval": 200, "context_override": 200, "induction": 200}
    assert len(domain_prompts("induction", EvaluateSpec(qa_domain_items=7))) == 7
    with pytest.raises(ValueError, match="held-out items only"):
        domain_prompts("causal_loop", ev, split="train")
    with pytest.raises(ValueError, match="unknown domain 'trivia'; valid: causal_loop, kv_retrieval, context_override"):
        domain_prompts("trivia", ev)


def test_a_missing_file_domain_fails_before_models_load(tmp_path):
    note = tmp_path / "note.txt"
    with pytest.raises(FileNotFoundError, match=r"evaluate.domains: 'file:.*note.txt': corpus.path=.* does not exist.*"
                                                r"give an existing UTF-8 text file \(or a glob\) after file:"):
        resolved("+experiment=smoke", f"evaluate.domains=[file:{note}]")
    with pytest.raises(ValueError, match=r"'notes' is not a data option; valid: .*, or file:PATH for your own text"):
        resolved("+experiment=smoke", "evaluate.domains=[notes]")
    note.write_text("A note of my own.\n")
    assert resolved("+experiment=smoke", f"evaluate.domains=[korean,file:{note}]").evaluate.domains[1] == f"file:{note}"
    proc = run_train(tmp_path, "+experiment=smoke", f"evaluate.domains=[file:{tmp_path / 'missing.txt'}]")
    assert proc.returncode == 2 and proc.stderr.startswith("error: evaluate.domains: 'file:")
    assert not (tmp_path / "cache").exists()  # nothing built, nothing loaded


def test_smoke_run_reports_the_attention_bound_domains_per_tag_and_a_file_domain(tmp_path):
    import pydoc_data.topics

    note = tmp_path / "note.txt"  # a text file of the user's own: eight paragraphs, four held-out texts
    note.write_text("\n\n".join(pydoc_data.topics.topics[k][:600] for k in sorted(pydoc_data.topics.topics)[:8]))
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[harvest,controller,evaluate]", "logger=csv",
                     "evaluate.facts_qa=false", "evaluate.figure=false", f"evaluate.domains=[file:{note}]",
                     "evaluate.qa_domains=[kv_retrieval,context_override,induction]", "evaluate.qa_domain_items=12",
                     "evaluate.qa_kv_facts=[4,16]", "evaluate.qa_induction_words=[8,32]",
                     "evaluate.qa_evidence_mass=true", "evaluate.qa_evidence_items=5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluate"]
    assert ev["domains"][f"file:{note}"]["num_texts"] == 4
    want = {"kv_retrieval": {"length": ["4 facts", "16 facts"], "position": ["start", "middle", "end"]},
            "context_override": {"relation": list(RELATIONS)}, "induction": {"length": ["8 words", "32 words"]}}
    for name, tags in want.items():
        dq = ev["qa_domains"][name]
        assert dq["num_prompts"] == 12 and dq["items"]["seed"] == 0
        assert dq["teacher_minus_student"]["n"] == 12 and dq["injected_minus_student"]["n"] == 12
        assert {tag: list(buckets) for tag, buckets in dq["by_tag"].items()} == tags
        for buckets in dq["by_tag"].values():
            assert sum(b["n"] for b in buckets.values()) == 12
            for role in ("teacher", "student", "injected"):  # the buckets' accuracies add up to the whole's
                assert sum(b[role] * b["n"] for b in buckets.values()) / 12 == pytest.approx(dq[role])
            for b in buckets.values():
                assert b["injected_minus_student"]["estimate"] == pytest.approx(b["injected"] - b["student"])
                assert b["teacher_minus_student"]["estimate"] == pytest.approx(b["teacher"] - b["student"])
        assert f"{name} QA accuracy, 12 items" in proc.stdout and f"{name} QA, teacher - student" in proc.stdout
    for name in ("kv_retrieval", "induction"):  # where each model looks: every layer, the injected student too
        mass = ev["qa_domains"][name]["evidence_mass"]
        assert set(mass) == {"teacher", "student", "injected"} and mass["student"]["n"] == 5
        assert all(0 <= v <= 1 for m in mass.values() for v in m["head_mean"]) and 0 < mass["student"]["uniform"] < 1
        printed = " ".join(proc.stdout.split())  # the summary wraps lines
        assert f"{name}: share of the answer query's passage attention on the span holding the answer" in printed
    assert "teacher" not in ev["qa_domains"]["context_override"]["evidence_mass"]  # its evidence is the passage
    assert ev["qa_domains"]["kv_retrieval"]["items"]["facts"] == [4, 16]
    assert "kv_retrieval: 16 facts (6 items)" in proc.stdout and "context_override: si_unit (3 items)" in proc.stdout
