"""Causal-loop samples as short character sequences for models trained from scratch (the LRU/MLA ablation).

The English prompt (``Start: A=6, B=5. Rules: A = B + 1; ... What are the values after 4 rounds? ...``) carries
~150 characters of fixed wording; a tiny model would spend most of its context on it. :func:`compact_prompt`
keeps only what differs between samples::

    A=6,B=5,C=3|A=B+1;B=C+1|p|*         parallel update, asked for the fixed point
    A=1,B=2|A=B+8;B=A|s|%9|r6           sequential update, values modulo 9, after 6 rounds

(``X if C > 1 else Y`` becomes ``X?C>1:Y``). The answer ``A=2, B=6`` becomes ``A=2,B=6``, which
:func:`uzr.tasks.causal_loop.score_answer` parses as it parses the original.

:class:`CharCodec`: ids 0 pad, 1 bos, 2 sep (the answer follows), 3 eos, then one id per character of
:data:`ALPHABET`. A sequence is ``bos prompt sep answer eos``.
"""

from __future__ import annotations

import re

import numpy as np

ALPHABET = "0123456789ABCDEFGH=+-*/%,;|?:<>()maxinprs"
PAD, BOS, SEP, EOS = range(4)
_PROMPT = re.compile(r"Start: (?P<start>.*?)\. Rules: (?P<rules>.*?)\. (?P<update>Each round[^.]*\.)(?P<rest>.*)")


def compact_prompt(prompt: str) -> str:
    """The compact form of a causal-loop prompt (module docstring); raises ValueError on another text."""
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a causal-loop prompt: {prompt[:80]!r}")
    rules = m["rules"].replace(" if ", "?").replace(" else ", ":").replace(" ", "")
    parts = [m["start"].replace(" ", ""), rules, "p" if "at once" in m["update"] else "s"]
    modulus = re.search(r"modulo (\d+)", m["rest"])
    if modulus:
        parts.append("%" + modulus[1])
    rounds = re.search(r"after (\d+) rounds?", m["rest"])
    parts.append("r" + rounds[1] if rounds else "*")
    return "|".join(parts)


def compact_answer(answer: str) -> str:
    return answer.replace(" ", "")


def settle_order(trajectory: list[list[int]], steps: int) -> list[int]:
    """Variable indices (letter order) sorted by the round from which each keeps its final value, ties by letter.

    ``trajectory``: the states after rounds 0..``steps`` (or more), each in letter order (the generator's
    ``trajectory`` column). In an acyclic system that round is the variable's depth (sources 0), so writing the
    answer in this order puts every value after the value its rule reads: each is one rule applied to a number
    already written, not a composition of all the rules on the way (which a small model cannot do in one pass)."""
    final = trajectory[steps]
    settle = []
    for j, value in enumerate(final):
        r = steps
        while r > 0 and trajectory[r - 1][j] == value:
            r -= 1
        settle.append(r)
    return sorted(range(len(final)), key=lambda j: (settle[j], j))


def reorder_answer(answer: str, order: list[int]) -> str:
    """``A=1, B=2, C=3`` with its assignments in ``order`` (indices into the letter-ordered list)."""
    parts = answer.split(", ")
    return ", ".join(parts[j] for j in order)


class CharCodec:
    """Characters of :data:`ALPHABET` <-> ids (after the four special ids)."""

    def __init__(self):
        self.ids = {ch: i + 4 for i, ch in enumerate(ALPHABET)}
        self.vocab_size = len(ALPHABET) + 4

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} of {text!r} is not in the causal-loop alphabet") from None

    def decode(self, ids) -> str:
        """Characters up to the first special id."""
        out = []
        for i in ids:
            if int(i) < 4:
                break
            out.append(ALPHABET[int(i) - 4])
        return "".join(out)

    def sequences(self, prompts: list[str], answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``bos prompt sep answer eos`` ids (n, S) and the index of ``sep`` in each row (n,)."""
        rows = [[BOS, *self.encode(compact_prompt(p)), SEP, *self.encode(compact_answer(a)), EOS]
                for p, a in zip(prompts, answers)]
        ids = np.full((len(rows), max(map(len, rows))), PAD, np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        sep = np.asarray([row.index(SEP) for row in rows], np.int64)
        return ids, sep
