"""Facts QA: is the right answer the most likely of its candidates?

The held-out answerable prompts of the built-in set (:mod:`uzr.prompts`: capitals, chemical symbols,
authors, units, arithmetic) each carry four candidate answers. A model gets a prompt right when the
correct candidate has the highest summed log-likelihood of its tokens after the formatted question
(teacher-forced, no generation). Scoring by likelihood keeps the metric free of answer parsing and
comparable between teacher, student and injected student.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from uzr.attention import decoder_of
from uzr.hooks import injected
from uzr.inject import Injector
from uzr.masks import pad_sequences
from uzr.next_token import lm_head_logits
from uzr.prompts import Prompt, PromptSet, adds_special_tokens, answer_prefix, format_prompt, resolve_format

QA_SCORE = "summed log-likelihood of the answer tokens among 4 candidates"


def qa_prompts(prompt_seed: int, heldout_fraction: float, limit: int = 0) -> list[Prompt]:
    """The held-out answerable prompts of the built-in set (the first ``limit`` of them; 0 = all)."""
    prompts = [p for p in PromptSet(prompt_seed, heldout_fraction).heldout if p.answerable]
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def candidate_logprobs(model, tokenizer, prompt_text: str, candidates: Sequence[str], prefix: str = " ",
                       injector: Injector | None = None, add_special_tokens: bool = True) -> list[float]:
    """Summed log-probability (nats) of each candidate's tokens after ``prompt_text + prefix``
    (teacher-forced, one right-padded batch of ``len(candidates)`` sequences). A candidate's tokens are
    those whose characters end after the prompt, so a token that straddles the boundary counts."""
    device = next(model.parameters()).device
    seqs, spans = [], []
    for cand in candidates:
        enc = tokenizer(prompt_text + prefix + cand, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        scored = [j for j, (s, e) in enumerate(offsets) if e > len(prompt_text) and e > s and j > 0]
        if not scored:
            raise ValueError(f"candidate {cand!r} has no tokens after the prompt")
        seqs.append(ids)
        spans.append(scored)
    ids, mask = pad_sequences(seqs, tokenizer.pad_token_id or 0)
    ids, mask = ids.to(device), mask.to(device)
    with injected(model, injector):
        final = decoder_of(model)(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, S, D)
    out = []
    for b, positions in enumerate(spans):
        pos = torch.tensor(positions, device=device)
        logp = torch.log_softmax(lm_head_logits(model, final[b, pos - 1]), -1)  # (n, V)
        out.append(float(logp.gather(-1, ids[b, pos][:, None]).sum()))
    return out


def qa_accuracy(model, tokenizer, prompts: Sequence[Prompt], prompt_format: str = "auto",
                injector_for: Callable[[Prompt], Injector | None] | None = None) -> float | None:
    """Fraction of ``prompts`` whose correct candidate scores highest; None for no prompts.

    ``prompt_format``: qa | chat | auto (see :func:`uzr.prompts.resolve_format`); ``injector_for``
    gives a fresh injector per prompt (None = the plain model)."""
    if not prompts:
        return None
    style = resolve_format(tokenizer, prompt_format)
    right = 0
    for p in prompts:
        injector = injector_for(p) if injector_for is not None else None
        scores = candidate_logprobs(model, tokenizer, format_prompt(p.question, tokenizer, style), p.candidates,
                                    answer_prefix(style), injector, adds_special_tokens(style))
        right += int(int(np.argmax(scores)) == p.correct_index())
    return right / len(prompts)


def plain_qa_accuracy(run, role: str) -> float | None:
    """Facts-QA accuracy of the uninjected ``role`` (``"student"`` or ``"teacher"``) on the run's held-out
    prompts, scored once per run (``run``: a :class:`uzr.runner.RunContext`): the evaluate and gate
    stages report the same number for the same model."""
    from tqdm.auto import tqdm

    cfg = run.cfg

    def score() -> float | None:
        prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
        model, tokenizer = run.models.get(role)
        return qa_accuracy(model, tokenizer, tqdm(prompts, desc=f"facts QA: {role}", unit="prompt", leave=False),
                           cfg.gate.prompt_format)

    return run.memo(("facts_qa", role), score)
