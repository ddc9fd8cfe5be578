"""Checkable domains that uzr generates itself, each with train and held-out items and a checker.

- ``arithmetic``: word problems (``"Mia has 23 apples and buys 17 more. How many apples does Mia have
  now?"``: addition, subtraction, multiplication), generated from a seed; right when the number the answer's
  first line states (:func:`stated_result`: after its last ``=``, else its first integer) is the result. (The
  first integer alone scored ``"15 + 23 = 38"`` wrong: the 135M student works sums out before it answers.)
- ``facts``: the answerable factual prompts of the built-in set (:mod:`uzr.qa.prompts`: capitals, continents,
  chemical symbols and elements, authors, SI units) with its train / held-out split; right when the
  answer's first line contains the expected answer as a whole word (case-insensitive).
- ``causal_loop``: :mod:`uzr.tasks.causal_loop` samples (levels and variable counts from the config);
  right when every variable has the right value (:func:`~uzr.tasks.causal_loop.score_answer`).

A split is a hash of ``(seed, question)`` (like the prompt set), so train and held-out never share a
question. ``reward(domain, prediction, answer, kind)`` is the reward of REINFORCE: ``binary`` is the
reference's ±1 from :func:`check`; ``graded`` is ``2 * credit - 1`` with the partial credit of :func:`credit`, so
a base model that is never exactly right still ranks its samples (the packaged 135M student answers no
arithmetic or causal-loop item right, which gives the binary reward no signal: experiments/svf_default).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from uzr.qa.prompts import PromptSet
from uzr.tasks.causal_loop import generate, score_answer

DOMAINS = ("arithmetic", "facts", "causal_loop")
REWARDS = ("binary", "graded")
FACT_CATEGORIES = ("capital", "continent", "symbol", "element", "author", "si_unit")
NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Iris", "Tom"]
THINGS = ["apples", "books", "marbles", "stickers", "pencils", "coins", "cards", "shells"]


@dataclass(frozen=True)
class Item:
    domain: str
    question: str
    answer: str


def _heldout(seed: int, question: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"svf:{seed}:{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _arithmetic_pool(seed: int, n: int) -> list[Item]:
    rng = random.Random(f"uzr-svf-arithmetic-{seed}")
    out, seen = [], set()
    while len(out) < n:
        name, thing, kind = rng.choice(NAMES), rng.choice(THINGS), rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 40)
            q, ans = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
        elif kind == 1:
            a, b = rng.randint(20, 90), rng.randint(2, 19)
            q, ans = f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, ans = f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} does {name} have?", a * b
        if q not in seen:
            seen.add(q)
            out.append(Item("arithmetic", q, str(ans)))
    return out


def _causal_pool(seed: int, n: int, levels: list[int], max_vars: int) -> list[Item]:
    table = generate({"n": n, "levels": list(levels), "seed": seed, "max_vars": max_vars, "max_rounds": 3})
    return [Item("causal_loop", q, a) for q, a in zip(table.column("prompt").to_pylist(), table.column("answer").to_pylist())]


def domain_items(domain: str, split: str, n: int, seed: int = 0, heldout_fraction: float = 0.25,
                 causal_levels: tuple[int, ...] = (1,), causal_max_vars: int = 3) -> list[Item]:
    """The first ``n`` items of ``domain`` in ``split`` (``train`` | ``heldout``); fewer when the domain has fewer."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; valid: train, heldout")
    if domain == "facts":
        prompts = getattr(PromptSet(seed, heldout_fraction), split)
        pool = [Item("facts", p.question, p.answer) for p in prompts if p.answerable and p.category in FACT_CATEGORIES]
        rng = random.Random(f"uzr-svf-facts-{seed}")
        rng.shuffle(pool)  # mix the categories: the first n are not all capitals
        return pool[:n]
    want_heldout = split == "heldout"
    size = int(2 * n / (heldout_fraction if want_heldout else 1 - heldout_fraction)) + 64  # enough for n
    pool = (_arithmetic_pool(seed, size) if domain == "arithmetic"
            else _causal_pool(seed, size, list(causal_levels), causal_max_vars))
    return [it for it in pool if _heldout(seed, it.question, heldout_fraction) == want_heldout][:n]


_INT = re.compile(r"-?\d+")


def stated_result(prediction: str) -> int | None:
    """The number an arithmetic answer states: the first integer after the last ``=`` of its first line
    (``"15 + 23 = 38"`` -> 38), else its first integer (``"38 apples"`` -> 38); None without one."""
    line = prediction.strip().split("\n", 1)[0].replace(",", "")
    found = _INT.search(line.rsplit("=", 1)[1]) if "=" in line else None
    found = found or _INT.search(line)
    return int(found.group()) if found else None


def check(domain: str, prediction: str, answer: str) -> bool:
    """Whether ``prediction`` answers the item right (see the module docstring for each domain's rule)."""
    if domain == "arithmetic":
        stated = stated_result(prediction)
        return stated is not None and stated == int(answer)
    if domain == "facts":
        return _whole_word(answer.lower(), prediction.strip().split("\n", 1)[0].lower())
    if domain == "causal_loop":
        return score_answer(prediction, answer)[0]
    raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


def credit(domain: str, prediction: str, answer: str) -> float:
    """Partial credit in [0, 1]; 1 exactly when :func:`check` says right.

    - ``arithmetic``: 0.5 when the result appears in the answer's first line but is not the stated number
      (``"6 bags, 3 x 2 = 6 ... 2 books"``: worked out, not stated);
    - ``facts``: the share of the answer's words found as whole words in the first line (``Dickens`` for
      ``Charles Dickens``: 0.5);
    - ``causal_loop``: the share of variables given their right value (:func:`~uzr.tasks.causal_loop.score_answer`).
    """
    if check(domain, prediction, answer):
        return 1.0
    line = prediction.strip().split("\n", 1)[0]
    if domain == "arithmetic":
        return 0.5 if int(answer) in {int(x) for x in _INT.findall(line.replace(",", ""))} else 0.0
    if domain == "facts":
        words = answer.lower().split()
        return sum(_whole_word(w, line.lower()) for w in words) / len(words)
    return score_answer(prediction, answer)[1]


def _whole_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def reward(domain: str, prediction: str, answer: str, kind: str = "binary") -> float:
    """``binary``: +1 right, -1 wrong (the reference's rewards); ``graded``: ``2 * credit - 1`` in [-1, 1]."""
    if kind == "binary":
        return 1.0 if check(domain, prediction, answer) else -1.0
    if kind == "graded":
        return 2.0 * credit(domain, prediction, answer) - 1.0
    raise ValueError(f"unknown reward {kind!r}; valid: {', '.join(REWARDS)}")
