"""Emphasis steering on QA prompts (``inject.source=emphasis``): each prompt's marked spans as student tokens.

A :class:`~uzr.qa.prompts.Prompt` marks character spans of its ``question`` (``Prompt.marked``: the passage of a
context task). The model sees the formatted prompt (``Question: ...`` or the chat template around the question), so
the spans are moved to where the question sits in it and mapped to token positions through the tokenizer's offsets
with the dominance stage's :func:`~uzr.dominance.groups.span_labels` (a token is marked when its characters overlap
a span; special tokens never are). :func:`emphasis_edits` turns them into the per-batch edit of
:func:`uzr.qa.facts.qa_scores`: one :class:`~uzr.injection.priors.EmphasisPrior` row per scored row, the row's
prompt's marks. Every candidate row of a prompt gets the same marks (the prompt's), so a prompt's tokens may run once
for all its candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from uzr.dominance.groups import span_labels, special_flags
from uzr.injection.injector import Injector
from uzr.injection.priors import EmphasisPrior
from uzr.qa.prompts import Prompt, adds_special_tokens, format_prompt, resolve_format


def marked_positions(tokenizer, prompt: Prompt, style: str, which: str = "marked") -> np.ndarray:
    """(S,) bool over the tokens of ``prompt``'s formatted text (``style``: qa | chat, resolved): True where a token
    overlaps one of ``prompt.spans(which)`` (character spans of the question: ``marked`` or ``evidence``)."""
    text = format_prompt(prompt.question, tokenizer, style)
    enc = tokenizer(text, add_special_tokens=adds_special_tokens(style), return_offsets_mapping=True)
    chosen = prompt.spans(which)
    if not chosen:
        return np.zeros(len(enc["input_ids"]), dtype=bool)
    spans = placed_spans(text, prompt, chosen)
    return span_labels(enc["offset_mapping"], special_flags(enc["input_ids"], tokenizer), [spans]) == 0


def placed_spans(text: str, prompt: Prompt, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (character spans of ``prompt.question``) moved to where the question sits in its formatted
    ``text``."""
    start = text.find(prompt.question)
    if start < 0:
        raise ValueError(f"prompt {prompt.id}: the formatted prompt does not contain its question verbatim; cannot "
                         "place its marked spans")
    return [(start + a, start + b) for a, b in spans]


def emphasis_prior(layers: Sequence[int], marks: Sequence[np.ndarray], beta: float, form: str) -> EmphasisPrior:
    """The :class:`EmphasisPrior` of batch rows whose prompts have token marks ``marks`` (one (S_b,) bool each)."""
    width = max(1, *(len(m) for m in marks))
    padded = torch.zeros(len(marks), width, dtype=torch.bool)
    for b, m in enumerate(marks):
        padded[b, :len(m)] = torch.from_numpy(np.asarray(m, dtype=bool))
    return EmphasisPrior(layers, padded, torch.tensor([len(m) for m in marks]), beta, form)


def emphasis_edits(make_injector: Callable[[EmphasisPrior], Injector], tokenizer, prompt_format: str,
                   layers: Sequence[int], beta: float, form: str,
                   which: str = "marked") -> Callable[[list[Prompt]], Injector]:
    """``edit_for(row_prompts)`` of :func:`uzr.qa.facts.qa_scores`: ``make_injector(prior)`` with the emphasis prior
    of each row's prompt toward its ``which`` spans (marks tokenised once per prompt)."""
    style = resolve_format(tokenizer, prompt_format)
    cache: dict[str, np.ndarray] = {}

    def marks_of(prompt: Prompt) -> np.ndarray:
        if prompt.id not in cache:
            cache[prompt.id] = marked_positions(tokenizer, prompt, style, which)
        return cache[prompt.id]

    return lambda rows: make_injector(emphasis_prior(layers, [marks_of(p) for p in rows], beta, form))
