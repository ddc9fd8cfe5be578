"""Facts QA: candidate scoring equals a full forward; accuracy follows the scores, injection reaches them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from uzr.facts_qa import candidate_logprobs, qa_accuracy, qa_prompts
from uzr.prompts import PromptSet, format_prompt


def test_candidate_logprobs_match_a_full_forward(tiny_models):
    model, tok = tiny_models["llama"]
    prompt = format_prompt("What is the capital of France?")
    candidates = ["Paris", "Rome", "Kuala Lumpur"]
    scores = candidate_logprobs(model, tok, prompt, candidates)
    for cand, score in zip(candidates, scores):
        full = tok(prompt + " " + cand)["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])  # char tokenizer: the prompt is a clean prefix
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        manual = sum(float(logp[j - 1, full[j]]) for j in range(n_prompt, len(full)))
        assert score == pytest.approx(manual, abs=1e-3)


def test_qa_prompts_are_heldout_answerable_and_limited():
    prompts = qa_prompts(0, 0.25)
    assert len(prompts) >= 60
    assert all(p.split == "heldout" and p.answerable and len(p.candidates) == 4 for p in prompts)
    assert {p.id for p in PromptSet(0, 0.25).train}.isdisjoint(p.id for p in prompts)
    assert [p.id for p in qa_prompts(0, 0.25, limit=5)] == [p.id for p in prompts[:5]]


def test_accuracy_is_one_when_the_answer_is_the_top_candidate_and_zero_when_it_is_the_bottom(tiny_models):
    model, tok = tiny_models["llama"]
    prompts = qa_prompts(0, 0.25, limit=8)
    top, bottom = [], []
    for p in prompts:
        scores = candidate_logprobs(model, tok, format_prompt(p.question), p.candidates)
        best = max(range(4), key=scores.__getitem__)
        worst = min(range(4), key=scores.__getitem__)
        top.append(dataclasses.replace(p, answer=p.candidates[best]))
        bottom.append(dataclasses.replace(p, answer=p.candidates[worst]))
    assert qa_accuracy(model, tok, top, "qa") == 1.0
    assert qa_accuracy(model, tok, bottom, "qa") == 0.0
    assert qa_accuracy(model, tok, [], "qa") is None


def test_injector_for_is_called_once_per_prompt_and_changes_scores(tiny_models):
    """A per-prompt injector reaches the scoring pass: a large alpha moves the candidate log-likelihoods."""
    from uzr.controller import ControllerSpec, build_controller
    from uzr.inject import AlphaSpec, Injector

    model, tok = tiny_models["llama"]
    torch.manual_seed(0)
    ctrl = {1: build_controller(ControllerSpec(key_dim=8), model.config.hidden_size).eval()}
    prompts = qa_prompts(0, 0.25, limit=3)
    calls = []

    def injector_for(p):
        calls.append(p.id)
        return Injector(ctrl, AlphaSpec("constant", 50.0), "bias", prompt_len=0)

    qa_accuracy(model, tok, prompts, "qa", injector_for)
    assert calls == [p.id for p in prompts]
    text = format_prompt(prompts[0].question)
    plain = candidate_logprobs(model, tok, text, prompts[0].candidates)
    injected = candidate_logprobs(model, tok, text, prompts[0].candidates, injector=injector_for(prompts[0]))
    assert max(abs(a - b) for a, b in zip(plain, injected)) > 1e-3
