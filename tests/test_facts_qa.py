"""Facts QA: candidate scoring equals a full forward; accuracy follows the scores, injection reaches them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from uzr.attention import decoder_of
from uzr.hooks import injected
from uzr.injection.injector import AlphaSpec, Injector
from uzr.next_token import lm_head_logits, next_token_kl, next_token_stats, target_logprobs
from uzr.qa.facts import _plain_states, candidate_logprobs, candidate_rows, qa_accuracy, qa_prompts, qa_scores
from uzr.qa.prompts import PromptSet, adds_special_tokens, answer_prefix, format_prompt, resolve_format


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
    assert len(prompts) == 203  # prompts version 2 (93 in version 1): one prompt is at most 0.005 of the set
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


def test_edit_for_is_called_once_per_batch_with_each_rows_prompt_and_changes_scores(tiny_models):
    """The edit reaches the scoring pass: one call per batch, given the prompt of every row; a large alpha
    moves the candidate log-likelihoods."""
    model, tok = tiny_models["llama"]
    ctrl = controllers_for(model)
    prompts = qa_prompts(0, 0.25, limit=5)
    calls = []

    def edit_for(rows):
        calls.append([p.id for p in rows])
        return Injector(ctrl, AlphaSpec("constant", 50.0), "bias", prompt_len=0)

    qa_accuracy(model, tok, prompts, "qa", edit_for, batch_size=2)
    assert len(calls) == 3 and sorted(i for c in calls for i in c) == sorted(p.id for p in prompts for _ in range(4))
    assert all(c[k] == c[4 * (k // 4)] for c in calls for k in range(len(c)))  # a prompt's 4 rows are adjacent
    text = format_prompt(prompts[0].question)
    plain = candidate_logprobs(model, tok, text, prompts[0].candidates)
    injected = candidate_logprobs(model, tok, text, prompts[0].candidates, injector=edit_for(prompts[:1] * 4))
    assert max(abs(a - b) for a, b in zip(plain, injected)) > 1e-3


# --- batched and prefix-shared scoring against the old one-sequence-per-candidate scoring

def controllers_for(model, layers=(1,)) -> dict:
    from uzr.controller import ControllerSpec, build_controller

    torch.manual_seed(0)
    return {layer: build_controller(ControllerSpec(key_dim=8), model.config.hidden_size).eval() for layer in layers}


def one_by_one(model, tok, prompts, style, edit_for=None) -> list[list[float]]:
    """The old scoring: every candidate alone, a batch of one unpadded sequence, its own edit."""
    out = []
    for p in prompts:
        rows = candidate_rows(tok, format_prompt(p.question, tok, style), p.candidates, answer_prefix(style),
                              adds_special_tokens(style))
        scores = []
        for row in rows:
            ids = torch.tensor([row.ids])
            with torch.no_grad(), injected(model, edit_for([p]) if edit_for else None):
                final = decoder_of(model)(input_ids=ids).last_hidden_state[0]  # (S, D)
            logp = torch.log_softmax(lm_head_logits(model, final), -1)
            scores.append(float(sum(logp[j - 1, row.ids[j]] for j in row.scored)))
        out.append(scores)
    return out


def assert_close(a: list[list[float]], b: list[list[float]], tol: float = 1e-4) -> None:
    worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert worst <= tol, worst


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_batched_prefix_shared_scores_equal_one_sequence_per_candidate(tiny_models, family):
    """Shared prefixes through the KV cache (prompts left-padded after the shared part, candidates
    right-padded) and plain right-padded batches give the old scores; prompts of different lengths
    share batches, so padding is exercised on both sides (Gemma 3: sliding window of 8 tokens)."""
    model, tok = tiny_models[family]
    prompts = qa_prompts(0, 0.25, limit=11)
    lengths = {len(format_prompt(p.question)) for p in prompts}
    assert len(lengths) > 3  # different lengths in one batch: padding happens
    reference = one_by_one(model, tok, prompts, "qa")
    for share in (True, False):
        assert_close(qa_scores(model, tok, prompts, "qa", batch_size=4, share_prefix=share), reference)
    assert_close(qa_scores(model, tok, prompts, "qa", batch_size=len(prompts)), reference)


@pytest.mark.parametrize("family", ["llama"])
def test_a_candidate_that_is_a_token_prefix_of_another_scores_as_one_by_one(tiny_models, family):
    """Roman numerals ("L", "LI", "LX", "LXX"): the shorter candidate's tokens all belong to the longer ones', so its
    last token is shared too, yet its row has no state there (the last token is only a target). It crashed the
    shared path before prompts version 2 brought such candidates."""
    model, tok = tiny_models[family]
    prompts = [p for p in PromptSet(0, 0.25).heldout if p.category == "roman"]
    nested = [p for p in prompts if any(a != b and b.startswith(a) for a in p.candidates for b in p.candidates)][:3]
    assert len(nested) == 3
    for order in (nested, [dataclasses.replace(p, candidates=p.candidates[::-1]) for p in nested]):
        assert_close(qa_scores(model, tok, order, "qa", batch_size=4), one_by_one(model, tok, order, "qa"))


def test_shared_prefix_covers_the_common_text_and_each_state_is_computed_once(tiny_models):
    """The path under test really shares: each prompt's tokens run once (its last state predicts every
    candidate's first token), and a tail runs only the candidate tokens that predict another one."""
    model, tok = tiny_models["llama"]
    groups = [candidate_rows(tok, format_prompt(p.question), p.candidates) for p in qa_prompts(0, 0.25, limit=4)]
    states = _plain_states(model, groups, tok.pad_token_id or 0)
    rows = [r for g in groups for r in g]
    for i, r in enumerate(rows):
        first = r.scored[0]
        assert states.heads[i][1] == first - 1  # the prompt pass's state predicts the first answer token
        tail = states.tails.get(i)
        assert (tail is None) == (len(r.ids) - 1 == first)  # a one-token answer needs no tail pass
        if tail is not None:
            assert tail[1] == first and tail[0].shape[0] == len(r.ids) - 1 - first


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("mode", ["bias", "mix"])
def test_injected_scores_are_the_same_batched_as_one_by_one(tiny_models, family, mode):
    """A gated injector over a batch of many prompts (each row holding its own prompt's gate value) gives
    each candidate the score it gets alone with that gate value."""
    model, tok = tiny_models[family]
    ctrl = controllers_for(model, (0, 1))
    prompts = qa_prompts(0, 0.25, limit=7)
    gate = {p.id: 0.2 + 0.1 * k for k, p in enumerate(prompts)}

    def edit_for(rows):
        return Injector(ctrl, AlphaSpec("gated", 3.0), mode, prompt_len=0,
                        gate=torch.tensor([[gate[p.id]] for p in rows]))

    reference = one_by_one(model, tok, prompts, "qa", edit_for)
    for share in (None, True):  # full sequences (auto on a tiny model), prompt tokens once per prompt
        assert_close(qa_scores(model, tok, prompts, "qa", edit_for, batch_size=3, share_prefix=share), reference)
    plain = one_by_one(model, tok, prompts, "qa")
    assert max(abs(x - y) for a, b in zip(plain, reference) for x, y in zip(a, b)) > 1e-3  # injection matters


@pytest.mark.parametrize("family", ["llama"])
def test_injected_prompt_tokens_run_once_and_score_as_full_sequences(tiny_models, family, monkeypatch):
    """Under an injector with one gate value for all rows, the common prefix runs once, each prompt's tokens once
    and then each candidate's tail on its prompt's rows of the KV cache and key features: the scores equal full
    right-padded sequences and one sequence per candidate."""
    import uzr.qa.facts as facts_qa

    model, tok = tiny_models[family]
    ctrl = controllers_for(model, (0, 1))
    prompts = qa_prompts(0, 0.25, limit=9)
    passes = []
    shared_states = facts_qa._edited_shared_states
    monkeypatch.setattr(facts_qa, "_edited_shared_states", lambda *a: passes.append(1) or shared_states(*a))

    def edit_for(rows):
        return Injector(ctrl, AlphaSpec("constant", 3.0), "bias", prompt_len=0)

    reference = one_by_one(model, tok, prompts, "qa", edit_for)
    assert_close(qa_scores(model, tok, prompts, "qa", edit_for, batch_size=4), reference)
    assert not passes  # a tiny model: auto keeps full sequences (fewer calls)
    assert_close(qa_scores(model, tok, prompts, "qa", edit_for, batch_size=4, share_prefix=True), reference)
    assert len(passes) == 3  # the shared path ran for every batch
    assert_close(qa_scores(model, tok, prompts, "qa", edit_for, batch_size=4, share_prefix=False), reference)
    assert len(passes) == 3

    from uzr.injection.sinks import SinkSet  # sinks kept: the continued rows carry their token ids

    sink_id = candidate_rows(tok, format_prompt(prompts[0].question), prompts[0].candidates)[0].ids[3]
    sinks = {layer: SinkSet(first=True, token_ids=(sink_id,)) for layer in ctrl}

    def keep_for(rows):
        return Injector(ctrl, AlphaSpec("constant", 3.0), "mix", prompt_len=0, sinks=sinks)

    assert_close(qa_scores(model, tok, prompts, "qa", keep_for, batch_size=4, share_prefix=True),
                 one_by_one(model, tok, prompts, "qa", keep_for))
    assert len(passes) == 6


def test_edits_that_cannot_continue_rows_run_full_sequences(tiny_models):
    """A prompt whose rows carry different gate values, a gate per position, stored rows fixed to a batch and a
    sliding window that could bind all keep the full-sequence path."""
    from uzr.injection.priors import RowsPrior
    from uzr.qa.facts import _shares_prefix

    model, tok = tiny_models["llama"]
    ctrl = controllers_for(model)
    groups = [candidate_rows(tok, format_prompt(p.question), p.candidates) for p in qa_prompts(0, 0.25, limit=2)]
    per_prompt = torch.tensor([[0.3]] * 4 + [[0.7]] * 4)
    assert _shares_prefix(model, Injector(ctrl, AlphaSpec("gated", 1.0), prompt_len=0, gate=per_prompt), groups)
    per_row = per_prompt.clone()
    per_row[1] = 0.5
    assert not _shares_prefix(model, Injector(ctrl, AlphaSpec("gated", 1.0), prompt_len=0, gate=per_row), groups)
    per_position = torch.full((8, 40), 0.3)
    assert not _shares_prefix(model, Injector(ctrl, AlphaSpec("gated", 1.0), prompt_len=0, gate=per_position),
                              groups)
    rows = RowsPrior({1: torch.zeros(8, 1, 40, 40)}, "teacher")
    assert not _shares_prefix(model, Injector(rows, AlphaSpec("constant", 1.0), prompt_len=0), groups)
    gemma, _ = tiny_models["gemma3"]  # sliding window of 8 tokens, shorter than the sequences
    assert not _shares_prefix(gemma, Injector(controllers_for(gemma), AlphaSpec("constant", 1.0), prompt_len=0),
                              groups)


def test_chat_format_scores_match_on_a_tokenizer_with_a_chat_template(tiny_models):
    """Chat prompts (the default pair's format) share the template's system turn across prompts."""
    model, tok = tiny_models["llama"]
    if not getattr(tok, "chat_template", None):
        pytest.skip("tiny tokenizer has no chat template")
    prompts = qa_prompts(0, 0.25, limit=6)
    assert_close(qa_scores(model, tok, prompts, "chat", batch_size=3), one_by_one(model, tok, prompts, "chat"))


def test_plain_scores_are_cached_per_model_and_prompt_set(tiny_models, tmp_path):
    from tests.conftest import model_spec, resolved
    from uzr.qa.facts import cached_plain_scores
    from uzr.runner import RunContext

    model, tok = tiny_models["llama"]
    spec = model_spec("student/tiny_llama")
    run = RunContext(resolved("+experiment=smoke", f"paths.cache_dir={tmp_path}"), tmp_path / "run")
    prompts = qa_prompts(0, 0.25, limit=5)
    loads = []

    def load():
        loads.append(1)
        return model, tok

    first = cached_plain_scores(run, spec, load, prompts, "qa", 4)
    again = cached_plain_scores(run, spec, load, prompts, "qa", 4)
    assert loads == [1] and again == first
    assert_close(first, one_by_one(model, tok, prompts, "qa"))
    cached_plain_scores(run, spec, load, prompts[:4], "qa", 4)  # another prompt set: scored anew
    assert loads == [1, 1]
    # each prompt set built once, by this run, under the key it had before run.artifact made it (pinned)
    assert {name: record["built"] for name, record in run.sub_artifacts.items()} == {
        "facts_qa/fb9f4ffb08fe64f5": True, "facts_qa/73de141ac9213344": True}


def test_next_token_stats_in_blocks_equal_the_whole_softmax(tiny_models):
    model, _ = tiny_models["gemma3"]  # final logit soft-capping
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, model.config.hidden_size)
    targets = torch.randint(0, model.config.vocab_size, (2, 7))
    logp = torch.log_softmax(lm_head_logits(model, hidden), -1)
    stats = next_token_stats(model, hidden, targets, chunk=3)  # blocks cross the batch boundary
    torch.testing.assert_close(stats["entropy"], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["maxprob"], logp.exp().amax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["nll"], -logp.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target_logprobs(model, hidden.reshape(14, -1), targets.reshape(-1), chunk=4),
                               -stats["nll"].reshape(-1), atol=1e-5, rtol=1e-5)
    student = torch.randn(2, 7, model.config.hidden_size)
    s = torch.log_softmax(lm_head_logits(model, student), -1)
    kl = float((logp.exp() * (logp - s)).sum(-1).mean())
    assert next_token_kl(model, hidden, model, student, chunk=5) == pytest.approx(kl, rel=1e-5)


@pytest.mark.real
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_packaged_pair_chat_prompts_score_the_same_shared_and_one_by_one(packaged_pair, role):
    """The default pair's chat format shares the template's system turn across prompts: the cached-prefix
    scores equal the old per-candidate scores on the real models (converted once per test session)."""
    model, tok = packaged_pair[role]
    prompts = qa_prompts(0, 0.25, limit=6)
    style = resolve_format(tok, "auto")
    assert_close(qa_scores(model, tok, prompts, "auto", batch_size=3), one_by_one(model, tok, prompts, style), 2e-4)
    if role == "student":  # under an injector too (the system turn, then each prompt, then each tail)
        ctrl = controllers_for(model, (4, 15))

        def edit_for(rows):
            return Injector(ctrl, AlphaSpec("constant", 1.0), "bias", prompt_len=0)

        assert_close(qa_scores(model, tok, prompts, "auto", edit_for, batch_size=3),
                     qa_scores(model, tok, prompts, "auto", edit_for, batch_size=6, share_prefix=False), 2e-4)
