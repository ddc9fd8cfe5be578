"""Emphasis steering (``inject.source=emphasis``): marked spans to tokens, the prior's exact effect on attention,
beta = 1 as an exact no-op, rows without marks left alone, and QA scoring through the shared-prefix path."""

from __future__ import annotations

import math

import pytest
import torch

from uzr.attention import HeadRows, LayerRecorder, recording
from uzr.config.inject import InjectSpec, source_label
from uzr.hooks import injected
from uzr.injection.emphasis import emphasis_edits, emphasis_prior, marked_positions
from uzr.injection.injector import AlphaSpec, Injector
from uzr.injection.priors import EmphasisPrior
from uzr.qa.attention_bound import kv_retrieval_prompts
from uzr.qa.facts import qa_scores
from uzr.qa.prompts import Prompt

PASSAGE = "In this atlas, the capital of France is Lyon."


def passage_prompt(pid: str = "p0", marked: bool = True, passage: str = PASSAGE) -> Prompt:
    question = f"{passage} According to the atlas, what is the capital of France?"
    return Prompt(pid, question, "answerable", "context", "Lyon", ["Paris", "Lyon", "Nice", "Lille"], "heldout",
                  marked=[(0, len(passage))] if marked else [])


def ids_of(tok, prompt: Prompt) -> torch.Tensor:
    return torch.tensor([tok(f"Question: {prompt.question}\nAnswer:")["input_ids"]])


def head_rows(model, ids, layer, injector=None) -> torch.Tensor:
    """(1, H, S, S) attention probabilities of every head at ``layer`` (the blocked recorder pass)."""
    with torch.no_grad(), injected(model, injector), \
            recording(model, {layer: LayerRecorder(block_size=64, reducers=[HeadRows()])}) as rec:
        model(input_ids=ids)
    return rec[layer].take()["heads"]


def test_marked_spans_map_to_the_passage_tokens(tiny_models):
    model, tok = tiny_models["llama"]
    prompt = passage_prompt()
    marks = marked_positions(tok, prompt, "qa")
    enc = tok(f"Question: {prompt.question}\nAnswer:", return_offsets_mapping=True)
    assert marks.shape == (len(enc["input_ids"]),)
    start = len("Question: ")
    inside = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if s < start + len(PASSAGE) and e > start and e > s]
    assert marks.nonzero()[0].tolist() == inside  # exactly the tokens overlapping the passage
    assert marks.sum() > 5 and not marks[-3:].any()  # the question after it is not marked
    assert not marked_positions(tok, passage_prompt(marked=False), "qa").any()


@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_beta_one_is_exactly_a_no_op(tiny_models, mode):
    model, tok = tiny_models["llama"]
    prompt = passage_prompt()
    ids = ids_of(tok, prompt)
    prior = emphasis_prior([0, 1], [marked_positions(tok, prompt, "qa")], beta=1.0, form="bias")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with injected(model, Injector(prior, AlphaSpec(value=1.0), mode, prompt_len=0)):
            assert torch.equal(model(input_ids=ids).logits, plain)
    # and through QA scoring, both paths: bit-identical scores
    edits = emphasis_edits(lambda p: Injector(p, AlphaSpec(value=1.0), mode, prompt_len=0), tok, "qa", [0, 1], 1.0,
                           "bias")
    assert qa_scores(model, tok, [prompt], "qa", edits) == qa_scores(model, tok, [prompt], "qa")


def test_evidence_marks_only_the_tokens_of_the_span_that_holds_the_answer(tiny_models):
    """``inject.emphasis_span=evidence``: the asked line's tokens, a strict subset of the passage's marks, and named
    apart from the passage's emphasis in results and cache keys."""
    _, tok = tiny_models["llama"]
    (prompt,) = kv_retrieval_prompts(1, seed=0, facts=[8])
    passage, evidence = marked_positions(tok, prompt, "qa"), marked_positions(tok, prompt, "qa", "evidence")
    assert evidence.any() and not (evidence & ~passage).any() and evidence.sum() < passage.sum() / 4
    enc = tok(f"Question: {prompt.question}\nAnswer:")
    text = tok.decode([t for t, m in zip(enc["input_ids"], evidence) if m])
    assert prompt.answer in text and "\n" not in text.strip()
    assert source_label(InjectSpec(source="emphasis", emphasis_beta=10)) == "emphasis(beta=10,form=bias)"
    assert source_label(InjectSpec(source="emphasis", emphasis_beta=10, emphasis_span="evidence")) == \
        "emphasis(beta=10,form=bias,span=evidence)"


def test_large_beta_multiplies_the_marked_keys_weight_by_beta(tiny_models):
    """Bias mode at alpha 1 on layer 0 (its input is the plain model's): every head's row is its own row with the
    marked keys' probabilities times beta, renormalised; the marked mass grows toward 1."""
    model, tok = tiny_models["llama"]
    prompt = passage_prompt()
    ids = ids_of(tok, prompt)
    marks = torch.from_numpy(marked_positions(tok, prompt, "qa"))
    beta = 100.0
    plain = head_rows(model, ids, 0)  # (1, H, S, S)
    prior = emphasis_prior([0], [marks.numpy()], beta, "bias")
    steered = head_rows(model, ids, 0, Injector(prior, AlphaSpec(value=1.0), "bias", prompt_len=0))
    expected = plain * torch.where(marks, beta, 1.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-4)
    after = slice(int(marks.nonzero().max()) + 1, None)  # query rows that see the whole passage
    plain_mass = plain[..., after, :][..., marks].sum(-1).mean()
    steered_mass = steered[..., after, :][..., marks].sum(-1).mean()
    assert steered_mass > plain_mass + 0.2 and steered_mass > 0.9


def test_pasta_form_equals_bias_form_on_the_prompt_and_spares_the_answer_keys(tiny_models):
    """Within the prompt both forms scale marked vs unmarked keys by beta; on keys past the prompt (the answer) pasta
    leaves them with the marked keys (not scaled down), bias with the unmarked ones."""
    model, tok = tiny_models["llama"]
    prompt = passage_prompt()
    marks = marked_positions(tok, prompt, "qa")
    ids = ids_of(tok, prompt)
    answer = torch.tensor([tok(" Lyon and more", add_special_tokens=False)["input_ids"]])
    full = torch.cat([ids, answer], 1)
    n = ids.shape[1]

    def rows(form: str) -> torch.Tensor:
        prior = emphasis_prior([0], [marks], 50.0, form)
        return head_rows(model, full, 0, Injector(prior, AlphaSpec(value=1.0), "bias", prompt_len=0))

    bias, pasta = rows("bias"), rows("pasta")
    torch.testing.assert_close(bias[..., :n, :], pasta[..., :n, :], atol=1e-5, rtol=1e-4)  # prompt queries
    answer_mass = {form: r[..., n:, n:].sum(-1).mean() for form, r in (("bias", bias), ("pasta", pasta))}
    assert answer_mass["pasta"] > 2 * answer_mass["bias"]


def test_rows_without_marks_are_left_exactly_alone(tiny_models):
    """In mix mode a flat prior would blend in the values' mean: a row with no marked span gets alpha 0 instead."""
    model, tok = tiny_models["llama"]
    marked, unmarked = passage_prompt("a"), passage_prompt("b", marked=False)
    ids = torch.cat([ids_of(tok, marked), ids_of(tok, unmarked)])
    prior = emphasis_prior([0, 1], [marked_positions(tok, p, "qa") for p in (marked, unmarked)], 100.0, "bias")
    assert prior.row_weights.tolist() == [1.0, 0.0]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with injected(model, Injector(prior, AlphaSpec(value=1.0), "mix", prompt_len=0)):
            steered = model(input_ids=ids).logits
    assert torch.equal(steered[1], plain[1])
    assert (steered[0] - plain[0]).abs().max() > 1e-3


def test_for_rows_selects_each_rows_marks():
    marks = torch.tensor([[True, False, False], [False, True, True]])
    prior = EmphasisPrior([0], marks, torch.tensor([3, 3]), 10.0)
    picked = prior.for_rows(torch.tensor([1, 1, 0]))
    assert picked.marks.tolist() == [[False, True, True], [False, True, True], [True, False, False]]
    assert picked.log_scores[0].tolist() == pytest.approx([0.0, math.log(10), math.log(10)])
    assert prior.alike(1) is False and picked.alike(3) is False and picked.for_rows(torch.tensor([0, 1])).alike(3)


def test_qa_scores_share_prefixes_under_emphasis(tiny_models):
    """The shared-prefix path (each prompt's tokens once, rows continued through for_rows) scores what full padded
    sequences score, and large beta changes the scores."""
    model, tok = tiny_models["llama"]
    prompts = [passage_prompt("a"), passage_prompt("b", passage="In this atlas, the capital of France is Nice."),
               passage_prompt("c", marked=False)]
    edits = emphasis_edits(lambda p: Injector(p, AlphaSpec(value=1.0), "bias", prompt_len=0), tok, "qa", [0, 1],
                           1000.0, "bias")
    shared = qa_scores(model, tok, prompts, "qa", edits, share_prefix=True)
    full = qa_scores(model, tok, prompts, "qa", edits, share_prefix=False)
    plain = qa_scores(model, tok, prompts, "qa")
    for a, b in zip(shared, full):
        assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(shared[0], plain[0])) > 1e-3
    assert shared[2] == pytest.approx(plain[2], abs=1e-5)  # no marked span: no emphasis
