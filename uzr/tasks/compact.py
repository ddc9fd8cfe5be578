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
