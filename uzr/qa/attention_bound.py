"""Attention-bound QA items: the answer is in the prompt, and only looking at the right place finds it.

Three generated domains of ``evaluate.qa_domains`` (scored like facts QA, :mod:`uzr.evaluate.qa`), each item a
:class:`~uzr.qa.prompts.Prompt` with four candidates, ``marked`` (the character span of the passage in the
question, for emphasis steering) and ``tags`` (the buckets accuracy is reported by):

- ``kv_retrieval``: a passage of N facts (``Alice's locker code is 4721.``, one per line) and a question about one
  key. The three wrong candidates are the values of *other keys of the same passage*, so knowing what codes look
  like does not help: the model must find the queried line. N cycles through ``facts`` (passage length) and the
  queried fact through the first, middle and last third of the passage; tags ``length`` (``"32 facts"``) and
  ``position`` (``start`` | ``middle`` | ``end``).
- ``context_override``: a passage states a counterfactual fact from the fact tables of :mod:`uzr.qa.prompts`
  (``In this atlas, the capital of France is Madrid.``) and the question asks it plainly. Candidates: the
  passage's answer (right), the memorised answer and two other values of the same table, so accuracy is the
  share of items where the model follows the passage over its memory (PASTA's CounterFact setting). Items take
  the relations (capital, symbol, author, si_unit) in turn; tag ``relation``.
- ``induction``: a list of distinct random words and the instruction to repeat it; the answer repeats the list
  up to a random word, and the candidates differ only in the next word: the right one or three other words of
  the list, so only copying the word that followed the same word the first time (what induction heads do)
  answers it; tag ``length`` (``"64 words"``). (Asking "which word comes next?" after a partial repeat in the
  prompt instead left both packaged models at chance: the question, not the copying, was the hard part.)

Items are deterministic for a seed. ``split`` gives disjoint sets: ``train`` items (to profile heads on) and
``heldout`` ones (to evaluate on) come from separate random streams, and context_override splits its subjects
(countries, elements, books, quantities) by a hash, so no held-out question is asked in the train items.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from uzr.qa.prompts import BOOKS, COUNTRIES, ELEMENTS, SI_UNITS, Prompt, split_of

SPLITS = ("train", "heldout")
POSITIONS = ("start", "middle", "end")

NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Liam", "Maria",
    "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Samuel", "Tina", "Victor", "Wendy", "Xavier", "Yvonne", "Zach",
    "Anna", "Brian", "Chloe", "Daniel", "Ella", "George", "Hannah", "Isaac", "Julia", "Kevin", "Laura", "Martin",
    "Nina", "Oscar", "Paula",
]
CODES = ["locker code", "door code", "safe code", "alarm code", "bike lock code"]
KEYS = [(name, code) for code in CODES for name in NAMES]  # 200 distinct keys: the largest passage

_WORD_TEXT = """
apple river candle forest window garden pencil bottle mirror ladder basket rocket island castle button blanket
tiger violin orange jacket hammer wallet kettle pillow carpet bridge engine feather helmet lantern magnet
needle ocean parrot rabbit saddle tunnel whistle anchor barrel cactus dragon falcon guitar harbor iceberg
jungle kitten lemon meadow napkin oyster planet quilt robot shovel tractor umbrella valley walrus yogurt
zipper acorn bucket cherry desert eagle fountain goose hotel igloo jewel koala lobster marble nest onion
piano quarry raven spider tomato unicorn vase wagon yacht zebra almond beacon cabin dolphin envelope
fiddle glacier hedge insect jigsaw kayak lizard mango noodle orchid pepper quiver ribbon statue teapot
velvet wizard badge canyon daisy ember fossil gravel hornet ivory jasmine kernel lagoon meteor nickel
otter pebble quartz rocket sapphire thimble turnip vulture willow arrow bagel cobra donkey elbow ferret
goblet harp inkwell jelly kiwi lily mitten nutmeg olive panda radish scarf tulip urchin vessel waffle
banjo cereal dagger easel fig goat hamster iron jar kite leopard mule nugget oak puppet rattle sponge
trumpet utensil vine wheat beetle crayon drum eel flute grape hippo ink juice kelp llama moth net owl
pear rose seal toad viper wasp bread chair desk fence glove horse jeep key lamp moon nail pond ring sock
tent vest wolf boat cloud dust farm gate hill lake mask nose path rope salt tree wall bell cake door fish
gold home lion milk nut pig rain ship tail yarn bean coin duck frog gift hook leaf map nest pie rug star
toy wing bear corn deer fox gum hat leg mud oar pan rat sun tub web
"""
WORDS = list(dict.fromkeys(_WORD_TEXT.split()))  # distinct (a few repeat in the text), in order

# relation -> (the passage's frame, the question, subject -> memorised answer)
RELATIONS: dict[str, tuple[str, str, dict[str, str]]] = {
    "capital": ("In this atlas, the capital of {subject} is {value}.", "What is the capital of {subject}?",
                {country: capital for country, (capital, _) in COUNTRIES.items()}),
    "symbol": ("In this chemistry book, the chemical symbol for {subject} is {value}.",
               "What is the chemical symbol for {subject}?", ELEMENTS),
    "author": ("In this library catalogue, {subject} was written by {value}.", "Who wrote {subject}?", BOOKS),
    "si_unit": ("In this physics textbook, the SI unit of {subject} is the {value}.",
                "What is the SI unit of {subject}?", SI_UNITS),
}


def _rng(domain: str, seed: int, split: str, i: int) -> random.Random:
    """The random stream of one item: the same for the same (domain, seed, split, index), disjoint across splits."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; valid: {', '.join(SPLITS)}")
    return random.Random(f"uzr-qa-{domain}-{seed}-{split}-{i}")


def _item(domain: str, seed: int, split: str, i: int, passage: str, question: str, answer: str,
          wrong: list[str], rng: random.Random, tags: dict[str, str], evidence: tuple[int, int]) -> Prompt:
    """A 4-candidate prompt: ``passage``, a blank line, ``question``; the passage is the marked span, ``evidence``
    (a character span of the passage) the part that holds the answer. The id ends in a
    hash of the text and candidates: results kept across runs by prompt id (the injected scores) never meet an item
    whose wording changed."""
    candidates = [answer, *wrong]
    if len(set(candidates)) != 4:
        raise ValueError(f"{domain} item {i}: candidates {candidates} are not 4 distinct answers")
    rng.shuffle(candidates)
    text = f"{passage}\n\n{question}"
    digest = hashlib.sha256(json.dumps([text, candidates]).encode()).hexdigest()[:8]
    return Prompt(f"{domain}:{seed}:{split}:{i}:{digest}", text, "answerable", domain, answer, candidates, split,
                  marked=[(0, len(passage))], evidence=[evidence], tags=tags)


def kv_retrieval_prompts(n: int, seed: int, facts: list[int], split: str = "heldout") -> list[Prompt]:
    """``n`` key-value retrieval items; item ``i`` has ``facts[i % len(facts)]`` facts and asks about one in the
    ``POSITIONS[(i // len(facts)) % 3]`` third of the passage, so lengths and positions are balanced."""
    if not facts or min(facts) < 4 or max(facts) > len(KEYS):
        raise ValueError(f"kv_retrieval facts={facts}: each must be in [4, {len(KEYS)}] (3 distractors, distinct keys)")
    prompts = []
    for i in range(n):
        rng = _rng("kv_retrieval", seed, split, i)
        count, position = facts[i % len(facts)], POSITIONS[(i // len(facts)) % len(POSITIONS)]
        keys = rng.sample(KEYS, count)
        values = [str(v) for v in rng.sample(range(1000, 10000), count)]
        third = POSITIONS.index(position)
        asked = rng.randrange(third * count // 3, (third + 1) * count // 3)
        lines = [f"{name}'s {code} is {value}." for (name, code), value in zip(keys, values)]
        passage = "\n".join(lines)
        start = sum(len(line) + 1 for line in lines[:asked])
        name, code = keys[asked]
        wrong = rng.sample(values[:asked] + values[asked + 1:], 3)
        prompts.append(_item("kv_retrieval", seed, split, i, passage, f"What is {name}'s {code}?", values[asked],
                             wrong, rng, {"length": f"{count} facts", "position": position},
                             evidence=(start, start + len(lines[asked]))))
    return prompts


def _override_pool(seed: int, split: str, relation: str) -> list[tuple[str, str]]:
    """Every (subject, counterfactual value) of ``relation`` in ``split``: subjects are split by a hash of the seed,
    relation and subject; each counterfactual is another value of the same table."""
    table = RELATIONS[relation][2]
    values = sorted(set(table.values()))
    return [(subject, value) for subject, true in table.items() if split_of(seed, f"{relation}:{subject}", 0.5) == split
            for value in values if value != true]


def context_override_capacity(seed: int, split: str) -> int:
    """The most items :func:`context_override_prompts` can make for ``split`` (4 relations in turn, each item a
    distinct (subject, counterfactual) pair)."""
    return len(RELATIONS) * min(len(_override_pool(seed, split, relation)) for relation in RELATIONS)


def context_override_prompts(n: int, seed: int, split: str = "heldout") -> list[Prompt]:
    """``n`` counterfactual-passage items, the relations in turn (item ``i`` asks ``list(RELATIONS)[i % 4]``), each
    a distinct (subject, counterfactual) pair."""
    relations = [list(RELATIONS)[i % len(RELATIONS)] for i in range(n)]
    chosen = {}  # relation -> its items' (subject, counterfactual), in order
    for relation in RELATIONS:
        pool, need = _override_pool(seed, split, relation), relations.count(relation)
        if need > len(pool):
            raise ValueError(f"context_override: {n} items need {need} {relation} items; the {split} pool holds "
                             f"{len(pool)}")
        chosen[relation] = iter(random.Random(f"uzr-qa-context_override-{seed}-{split}-{relation}").sample(pool, need))
    prompts = []
    for i, relation in enumerate(relations):
        subject, value = next(chosen[relation])
        rng = _rng("context_override", seed, split, i)
        frame, question, table = RELATIONS[relation]
        true = table[subject]
        others = sorted(set(table.values()) - {true, value})
        passage = frame.format(subject=subject, value=value)
        prompts.append(_item("context_override", seed, split, i, passage, question.format(subject=subject), value,
                             [true, *rng.sample(others, 2)], rng, {"relation": relation},
                             evidence=(0, len(passage))))
    return prompts


def induction_prompts(n: int, seed: int, words: list[int], split: str = "heldout") -> list[Prompt]:
    """``n`` induction items; item ``i`` shows ``words[i % len(words)]`` distinct words and asks to repeat them. Each
    candidate is the repeat up to a random word (at least one, at most all but the last) plus one more word: the right
    next word or another word of the list. The repeated words are the same in every candidate, so the scores differ by
    the next word's log-likelihood given the repeat: whether the model copies what followed that word before."""
    if not words or min(words) < 4 or max(words) > len(WORDS):
        raise ValueError(f"induction words={words}: each must be in [4, {len(WORDS)}] (3 distractors, distinct words)")
    prompts = []
    for i in range(n):
        rng = _rng("induction", seed, split, i)
        count = words[i % len(words)]
        sequence = rng.sample(WORDS, count)
        shown = rng.randrange(1, count)  # words repeated before the scored one
        repeat = " ".join(sequence[:shown])
        wrong = rng.sample(sequence[:shown] + sequence[shown + 1:], 3)
        shown_words = f"Words: {' '.join(sequence)}"
        # the evidence: the last repeated word and the one that followed it the first time
        start = len("Words: ") + sum(len(w) + 1 for w in sequence[:shown - 1])
        end = start + len(sequence[shown - 1]) + 1 + len(sequence[shown])
        prompts.append(_item("induction", seed, split, i, shown_words, "Repeat these words in order.",
                             f"{repeat} {sequence[shown]}", [f"{repeat} {w}" for w in wrong], rng,
                             {"length": f"{count} words"}, evidence=(start, end)))
    return prompts


GENERATORS: dict[str, Callable[..., list[Prompt]]] = {
    "kv_retrieval": kv_retrieval_prompts, "context_override": context_override_prompts,
    "induction": induction_prompts,
}
