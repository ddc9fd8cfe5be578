"""Checkable domains that uzr generates itself, each with train and held-out items and a checker.

- ``arithmetic``: word problems (``"Mia has 23 apples and buys 17 more. How many apples does Mia have
  now?"``: addition, subtraction, multiplication), generated from a seed; right when the first integer of
  the answer is the result.
- ``facts``: the answerable factual prompts of the built-in set (:mod:`uzr.prompts`: capitals, continents,
  chemical symbols and elements, authors, SI units) with its train / held-out split; right when the
  answer's first line contains the expected answer as a whole word (case-insensitive).
- ``causal_loop``: :mod:`uzr.tasks.causal_loop` samples (levels and variable counts from the config);
  right when every variable has the right value (:func:`~uzr.tasks.causal_loop.score_answer`).

A split is a hash of ``(seed, question)`` (like the prompt set), so train and held-out never share a
question. ``reward(domain, prediction, answer)`` is the ±1 reward of REINFORCE (the reference's).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

DOMAINS = ("arithmetic", "facts", "causal_loop")
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
    from uzr.tasks.causal_loop import generate

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
        from uzr.prompts import PromptSet

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


def check(domain: str, prediction: str, answer: str) -> bool:
    """Whether ``prediction`` answers the item right (see the module docstring for each domain's rule)."""
    if domain == "arithmetic":
        found = _INT.search(prediction.replace(",", ""))
        return found is not None and int(found.group()) == int(answer)
    if domain == "facts":
        line = prediction.strip().split("\n", 1)[0].lower()
        return re.search(rf"(?<!\w){re.escape(answer.lower())}(?!\w)", line) is not None
    if domain == "causal_loop":
        from uzr.tasks.causal_loop import score_answer

        return score_answer(prediction, answer)[0]
    raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


def reward(domain: str, prediction: str, answer: str) -> float:
    """+1 right, -1 wrong (the reference's rewards)."""
    return 1.0 if check(domain, prediction, answer) else -1.0
