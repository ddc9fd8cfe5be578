"""Causal-loop items in the pretrained student's tokens, and few-shot prompts of them (pretrained LRU/MLA ablation).

An item is ``Q: <compact prompt>\\nA:`` followed by its answer `` A=0,B=6,C=1\\n`` (variables in
``lru_mla.answer_order``; the newline ends the answer as eos does in the from-scratch form). The compact prompt
(:func:`uzr.tasks.compact.compact_prompt`) keeps items short (~45 tokens): the cost of every step and of the
8-shot prompts grows with it. Each piece (the prompt, each ``,X=v``, the newline) is tokenised on its own and the
ids concatenated, so an item's answer tokens, and so its per-variable partial credit, are the same in every
prompt it appears in.

A few-shot prompt is ``k`` solved training items (demonstrations) followed by the question: the same ``k``
demonstrations for every held-out item (the first ``k`` of :func:`demonstrations`), never the item itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from uzr.tasks.compact import compact_prompt

END = "\n"


@dataclass
class TokenItems:
    """Items as token ids: ``ids[i]`` the whole sequence, ``answer_start[i]`` the index of its first answer token,
    ``variable_ends[i]`` the end (exclusive, relative to ``answer_start``) of each variable's tokens (the last
    variable's span includes the end-of-answer token)."""

    ids: list[list[int]]
    answer_start: list[int]
    variable_ends: list[list[int]]
    level: np.ndarray
    answers: list[str]
    prompts: list[str] = field(default_factory=list)  # the English prompts (what "the same item" means)

    def __len__(self) -> int:
        return len(self.ids)


def _pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def encode(tokenizer, prompts: list[str], answers: list[str], levels: np.ndarray) -> TokenItems:
    """Items from English prompts and ``A=.., B=..`` answers (module docstring)."""
    ids, starts, ends = [], [], []
    for prompt, answer in zip(prompts, answers):
        question = _pieces(tokenizer, [f"Q: {compact_prompt(prompt)}{END}A:"])[0]
        assignments = answer.split(", ")
        parts = _pieces(tokenizer, [" " + assignments[0], *("," + a for a in assignments[1:]), END])
        parts[-2] = parts[-2] + parts.pop()  # the end token goes with the last variable
        ids.append(question + [t for p in parts for t in p])
        starts.append(len(question))
        ends.append(list(np.cumsum([len(p) for p in parts])))
    return TokenItems(ids, starts, [[int(e) for e in row] for row in ends], np.asarray(levels), list(answers),
                      list(prompts))


def demonstrations(train: TokenItems, count: int, seed: int, exclude: set[str]) -> list[int]:
    """``count`` training item indices to show as solved examples (seeded draw, prompts in ``exclude`` skipped)."""
    order = np.random.default_rng(seed).permutation(len(train))
    chosen = [int(i) for i in order if train.prompts[i] not in exclude][:count]
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} training items can be demonstrations, {count} asked")
    return chosen


def demo_block(train: TokenItems, demos: list[int]) -> list[int]:
    """The demonstrations' ids, one solved item after another."""
    return [t for i in demos for t in train.ids[i]]


def fewshot_items(train: TokenItems, demos: list[int], questions: TokenItems) -> TokenItems:
    """``questions`` with the demonstrations ``demos`` (training indices) before each; refuses a demonstration
    that is one of the questions."""
    shown = {train.prompts[i] for i in demos}
    if shown & set(questions.prompts):
        raise ValueError("a demonstration is one of the questions it is shown with")
    block = demo_block(train, demos)
    return TokenItems([block + q for q in questions.ids], [len(block) + s for s in questions.answer_start],
                      questions.variable_ends, questions.level, questions.answers, questions.prompts)


def subset(items: TokenItems, n: int) -> TokenItems:
    """The first ``n`` items."""
    return TokenItems(items.ids[:n], items.answer_start[:n], items.variable_ends[:n], items.level[:n],
                      items.answers[:n], items.prompts[:n])
