"""Where the models look (``evaluate.qa_evidence_mass``): evidence spans to tokens, the answer query's mass on them
against the full attention rows, and the injected student's shift under emphasis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import resolved
from tests.test_emphasis import head_rows
from tests.test_pipeline import run_train
from uzr.config.inject import source_label
from uzr.evaluate.evidence import (
    EVIDENCE,
    REST,
    evidence_labels,
    evidence_shares,
    has_evidence,
    last_query_mass,
    outside,
)
from uzr.evaluate.injection import matched_heads
from uzr.injection.emphasis import emphasis_edits
from uzr.injection.injector import AlphaSpec, Injector
from uzr.qa.attention_bound import context_override_prompts, induction_prompts, kv_retrieval_prompts


def test_outside_cuts_the_holes_out_of_the_spans():
    assert outside([(0, 10)], [(3, 5)]) == [(0, 3), (5, 10)]
    assert outside([(0, 10)], [(0, 4), (8, 12)]) == [(4, 8)]
    assert outside([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]
    assert outside([(0, 10)], [(0, 10)]) == [] and outside([(0, 10)], []) == [(0, 10)]


def test_labels_split_the_passage_into_the_asked_line_and_the_rest(tiny_models):
    _, tok = tiny_models["llama"]
    (prompt,) = kv_retrieval_prompts(1, seed=0, facts=[8])
    ids, labels = evidence_labels(tok, prompt, "qa")
    evidence = tok.decode([t for t, g in zip(ids, labels) if g == EVIDENCE])
    rest = tok.decode([t for t, g in zip(ids, labels) if g == REST])
    assert prompt.answer in evidence and prompt.answer not in rest and "What is" not in rest + evidence
    assert (labels == REST).sum() > 5 * (labels == EVIDENCE).sum()  # 7 other lines
    assert has_evidence(prompt) and not has_evidence(context_override_prompts(1, seed=0)[0])
    assert tok.decode(ids).rstrip().endswith("What is " + prompt.question.split("What is ")[1] + "\nAnswer:")


def test_induction_is_measured_at_the_end_of_the_repeat_every_candidate_shares(tiny_models):
    _, tok = tiny_models["llama"]
    for prompt in induction_prompts(4, seed=0, words=[8, 16]):
        ids, labels = evidence_labels(tok, prompt, "qa")
        *repeat, _ = prompt.answer.split()
        assert tok.decode(ids).rstrip().endswith("Answer: " + " ".join(repeat))  # its query predicts the scored word
        evidence = tok.decode([t for t, g in zip(ids, labels) if g == EVIDENCE]).split()
        assert evidence[0] == repeat[-1] and len(evidence) == 2  # the word and what followed it the first time


def test_last_query_mass_is_the_last_row_of_the_attention_summed_over_each_span(tiny_models):
    model, tok = tiny_models["llama"]
    (prompt,) = kv_retrieval_prompts(1, seed=1, facts=[4])
    ids, labels = evidence_labels(tok, prompt, "qa")
    mass = last_query_mass(model, ids, labels, block_size=16)  # several blocks
    for layer in range(mass.shape[0]):
        rows = head_rows(model, torch.tensor([ids]), layer)[0, :, -1]  # (H, S)
        for group in (EVIDENCE, REST):
            want = rows[:, torch.from_numpy(labels == group)].sum(-1)
            np.testing.assert_allclose(mass[layer, :, group], want.numpy(), rtol=1e-5, atol=1e-6)


def test_emphasis_on_the_evidence_raises_the_injected_share(tiny_models):
    """At layer 0 (its input is the plain model's) emphasis x beta on the evidence keys gives each head the share
    beta*e / (beta*e + r) of its own masses e, r on the evidence and the rest."""
    model, tok = tiny_models["llama"]
    prompts = kv_retrieval_prompts(3, seed=2, facts=[4, 8, 16])
    beta = 50.0
    edits = emphasis_edits(lambda prior: Injector(prior, AlphaSpec(value=1.0), "bias", prompt_len=0), tok, "qa",
                           [0], beta, "bias", "evidence")
    plain = evidence_shares(model, tok, prompts, "qa")
    steered = evidence_shares(model, tok, prompts, "qa", edits)
    masses = [last_query_mass(model, *evidence_labels(tok, p, "qa"))[0] for p in prompts]  # (H, 2) each
    want = np.mean([beta * m[:, 0] / (beta * m[:, 0] + m[:, 1]) for m in masses], axis=0)
    np.testing.assert_allclose(steered["per_head"][0], want, atol=2e-4)
    assert steered["head_mean"][0] > plain["head_mean"][0] + 0.2 and steered["uniform"] == plain["uniform"]
    assert plain["n"] == 3 and 0 < plain["uniform"] < 0.5


def test_bad_evidence_items_fail_before_models_load():
    with pytest.raises(ValueError, match="evaluate.qa_evidence_items=0 is invalid"):
        resolved("+experiment=smoke", "evaluate.qa_evidence_items=0")


def test_teacher_head_oracle_is_checked_and_named_before_models_load():
    with pytest.raises(ValueError, match="inject.teacher_head=1 needs inject.source=teacher"):
        resolved("+experiment=smoke", "inject.teacher_head=1")
    with pytest.raises(ValueError, match=r"inject.teacher_head=9 is invalid; valid: a teacher head in \[0, 3\]"):
        resolved("+experiment=smoke", "inject.source=teacher", "inject.teacher_head=9")
    cfg = resolved("+experiment=smoke", "inject.source=teacher", "inject.teacher_head=2")
    assert source_label(cfg.inject) == "teacher(head=2)"
    assert matched_heads(cfg, None) == {layer: [2] * cfg.student.num_heads for layer in cfg.inject.layers}


def test_a_teacher_head_oracle_run_scores_qa_only(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[harvest,controller,evaluate]", "logger=csv",
                     "evaluate.facts_qa=false", "evaluate.figure=false", "evaluate.qa_domains=[kv_retrieval]",
                     "evaluate.qa_domain_items=6", "inject.source=teacher", "inject.teacher_head=1", "alpha.value=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluate"]
    assert ev["source"] == "teacher(head=1)" and ev["texts"].startswith("not scored")
    kv = ev["qa_domains"]["kv_retrieval"]
    assert kv["injected_minus_student"]["n"] == 6 and len(kv["correct"]["injected"]) == 6


def test_emphasis_on_other_layers_never_reads_the_stored_scores_of_another_layer_set(tmp_path):
    """Emphasis alone has no harvest or controller key to pin its layers: its stored injected scores are keyed by them."""
    common = ("+experiment=smoke", "stages=[evaluate]", "logger=csv", "evaluate.facts_qa=false",
              "evaluate.qa_domains=[kv_retrieval]", "evaluate.qa_domain_items=6", "inject.source=emphasis",
              "inject.emphasis_span=evidence", "inject.emphasis_beta=1000", "alpha.value=1")
    for i, layers in enumerate(("[0]", "[0,1,2]")):
        proc = run_train(tmp_path, *common, f"inject.layers={layers}", run_dir=f"run{i}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ev = json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["evaluate"]
        assert ev["qa_domains"]["kv_retrieval"]["injected_minus_student"]["n"] == 6
    memos = list((tmp_path / "cache" / "memo").iterdir())
    assert len([m for m in memos if m.is_dir()]) == 2  # one stored result per layer set, not one shared
