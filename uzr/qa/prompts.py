"""The built-in prompt set for the gate: answerable factual questions and unanswerable ones.

Every prompt is generated from small fact tables written out in this module (capitals, continents,
chemical symbols, authors, SI units, unit conversions, arithmetic), from rules whose answers uzr computes
(:mod:`uzr.qa.checkable`: calendar, alphabet, Roman numerals, number words, units, arithmetic), plus templates that turn the same
tables into questions without an answer: false premises ("What is the capital of Mars?", "In what
year did Jane Austen walk on the Moon?"), invented entities ("Who wrote *The Glass Orchard of
Velmora*?", "What is the chemical symbol for vibranium?") and questions no one can answer (divisions
by zero, tomorrow's weather). Answerable prompts carry their answer and a fixed set of candidates
(the answer plus three distractors from the same table), for facts-QA accuracy by answer likelihood.

The train / held-out split is a hash of ``(seed, question)``: deterministic, independent of the
order of the tables, and a prompt keeps its side when other prompts are added.

``python -m uzr.qa.prompts`` prints counts per category and split; ``--jsonl PATH`` writes the set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uzr.qa.checkable import checkable

# Bump when the tables or templates change: the gate artifact's cache key includes it. Version 2 added the
# checkable prompts of uzr.qa.checkable (the held-out answerable set grew from 93 to over 200).
PROMPTS_VERSION = 2
# The random stream of the version-1 tables stays seeded as it was, so their prompts and candidates are
# unchanged (results on the old 93 held-out prompts stay comparable); new prompts draw from their own streams.
_TABLES_STREAM = 1
KINDS = ("answerable", "unanswerable")
FORMATS = ("qa", "chat", "auto")

# ------------------------------------------------------------------------------------ fact tables
# country -> (capital, continent)
COUNTRIES: dict[str, tuple[str, str]] = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Portugal": ("Lisbon", "Europe"), "the United Kingdom": ("London", "Europe"),
    "Ireland": ("Dublin", "Europe"), "the Netherlands": ("Amsterdam", "Europe"), "Belgium": ("Brussels", "Europe"),
    "Austria": ("Vienna", "Europe"), "Switzerland": ("Bern", "Europe"), "Poland": ("Warsaw", "Europe"),
    "Czechia": ("Prague", "Europe"), "Hungary": ("Budapest", "Europe"), "Greece": ("Athens", "Europe"),
    "Sweden": ("Stockholm", "Europe"), "Norway": ("Oslo", "Europe"), "Denmark": ("Copenhagen", "Europe"),
    "Finland": ("Helsinki", "Europe"), "Iceland": ("Reykjavik", "Europe"), "Russia": ("Moscow", "Europe"),
    "Ukraine": ("Kyiv", "Europe"), "Romania": ("Bucharest", "Europe"), "Bulgaria": ("Sofia", "Europe"),
    "Serbia": ("Belgrade", "Europe"), "Croatia": ("Zagreb", "Europe"),
    "Japan": ("Tokyo", "Asia"), "China": ("Beijing", "Asia"), "India": ("New Delhi", "Asia"),
    "South Korea": ("Seoul", "Asia"), "Thailand": ("Bangkok", "Asia"), "Vietnam": ("Hanoi", "Asia"),
    "Indonesia": ("Jakarta", "Asia"), "the Philippines": ("Manila", "Asia"), "Malaysia": ("Kuala Lumpur", "Asia"),
    "Pakistan": ("Islamabad", "Asia"), "Bangladesh": ("Dhaka", "Asia"), "Nepal": ("Kathmandu", "Asia"),
    "Iran": ("Tehran", "Asia"), "Iraq": ("Baghdad", "Asia"), "Saudi Arabia": ("Riyadh", "Asia"),
    "Turkey": ("Ankara", "Asia"), "Jordan": ("Amman", "Asia"), "Mongolia": ("Ulaanbaatar", "Asia"),
    "Egypt": ("Cairo", "Africa"), "Kenya": ("Nairobi", "Africa"), "Nigeria": ("Abuja", "Africa"),
    "Ethiopia": ("Addis Ababa", "Africa"), "Ghana": ("Accra", "Africa"), "Morocco": ("Rabat", "Africa"),
    "Algeria": ("Algiers", "Africa"), "Tunisia": ("Tunis", "Africa"), "Senegal": ("Dakar", "Africa"),
    "Uganda": ("Kampala", "Africa"), "Zimbabwe": ("Harare", "Africa"), "Angola": ("Luanda", "Africa"),
    "the United States": ("Washington", "North America"), "Canada": ("Ottawa", "North America"),
    "Mexico": ("Mexico City", "North America"), "Cuba": ("Havana", "North America"),
    "Jamaica": ("Kingston", "North America"), "Panama": ("Panama City", "North America"),
    "Brazil": ("Brasilia", "South America"), "Argentina": ("Buenos Aires", "South America"),
    "Chile": ("Santiago", "South America"), "Peru": ("Lima", "South America"),
    "Colombia": ("Bogota", "South America"), "Venezuela": ("Caracas", "South America"),
    "Ecuador": ("Quito", "South America"), "Uruguay": ("Montevideo", "South America"),
    "Australia": ("Canberra", "Oceania"), "New Zealand": ("Wellington", "Oceania"), "Fiji": ("Suva", "Oceania"),
}
# Countries spanning two continents get no continent question.
TRANSCONTINENTAL = {"Russia", "Turkey", "Egypt", "Indonesia", "Panama"}

# element -> symbol
ELEMENTS: dict[str, str] = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
    "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "iron": "Fe", "cobalt": "Co", "nickel": "Ni",
    "copper": "Cu", "zinc": "Zn", "arsenic": "As", "bromine": "Br", "krypton": "Kr", "silver": "Ag",
    "tin": "Sn", "iodine": "I", "xenon": "Xe", "tungsten": "W", "platinum": "Pt", "gold": "Au",
    "mercury": "Hg", "lead": "Pb", "uranium": "U", "radon": "Rn",
}

# book -> author
BOOKS: dict[str, str] = {
    "Pride and Prejudice": "Jane Austen", "Emma": "Jane Austen", "Hamlet": "William Shakespeare",
    "Macbeth": "William Shakespeare", "Romeo and Juliet": "William Shakespeare", "War and Peace": "Leo Tolstoy",
    "Anna Karenina": "Leo Tolstoy", "Crime and Punishment": "Fyodor Dostoevsky",
    "The Brothers Karamazov": "Fyodor Dostoevsky", "Nineteen Eighty-Four": "George Orwell",
    "Animal Farm": "George Orwell", "Moby-Dick": "Herman Melville", "Great Expectations": "Charles Dickens",
    "Oliver Twist": "Charles Dickens", "A Tale of Two Cities": "Charles Dickens", "Don Quixote": "Miguel de Cervantes",
    "The Odyssey": "Homer", "The Iliad": "Homer", "Frankenstein": "Mary Shelley", "Dracula": "Bram Stoker",
    "Jane Eyre": "Charlotte Bronte", "Wuthering Heights": "Emily Bronte", "The Great Gatsby": "F. Scott Fitzgerald",
    "Ulysses": "James Joyce", "Dubliners": "James Joyce", "Madame Bovary": "Gustave Flaubert",
    "Les Miserables": "Victor Hugo", "The Hobbit": "J. R. R. Tolkien", "The Lord of the Rings": "J. R. R. Tolkien",
    "Brave New World": "Aldous Huxley", "To Kill a Mockingbird": "Harper Lee",
    "The Old Man and the Sea": "Ernest Hemingway", "One Hundred Years of Solitude": "Gabriel Garcia Marquez",
    "The Divine Comedy": "Dante Alighieri", "Faust": "Johann Wolfgang von Goethe",
    "The Metamorphosis": "Franz Kafka", "The Trial": "Franz Kafka", "Alice's Adventures in Wonderland": "Lewis Carroll",
    "Treasure Island": "Robert Louis Stevenson", "The Adventures of Tom Sawyer": "Mark Twain",
}

# quantity -> SI unit
SI_UNITS: dict[str, str] = {
    "length": "metre", "mass": "kilogram", "time": "second", "electric current": "ampere",
    "temperature": "kelvin", "amount of substance": "mole", "luminous intensity": "candela",
    "force": "newton", "energy": "joule", "power": "watt", "pressure": "pascal", "frequency": "hertz",
    "electric charge": "coulomb", "voltage": "volt", "electrical resistance": "ohm", "capacitance": "farad",
    "magnetic flux": "weber", "inductance": "henry", "illuminance": "lux",
}

# (small unit, big unit, how many small in one big)
CONVERSIONS: list[tuple[str, str, int]] = [
    ("seconds", "minute", 60), ("minutes", "hour", 60), ("hours", "day", 24), ("days", "week", 7),
    ("months", "year", 12), ("years", "decade", 10), ("years", "century", 100), ("centimetres", "metre", 100),
    ("millimetres", "centimetre", 10), ("metres", "kilometre", 1000), ("grams", "kilogram", 1000),
    ("millilitres", "litre", 1000), ("inches", "foot", 12), ("feet", "yard", 3), ("ounces", "pound", 16),
    ("sides", "hexagon", 6), ("sides", "triangle", 3), ("legs", "spider", 8), ("cards", "standard deck", 52),
    ("players", "football team on the pitch", 11),
]

# ------------------------------------------------------------------------ unanswerable material
NON_COUNTRIES = [
    "Mars", "the Moon", "Venus", "Jupiter", "the Sun", "Atlantis", "Narnia", "Middle-earth", "Wakanda",
    "El Dorado", "Antarctica", "the Pacific Ocean", "the Sahara Desert", "the Milky Way", "Saturn's rings",
    "Lilliput", "Oz", "Hogwarts", "the North Pole", "Pluto",
]
FAKE_ELEMENTS = [
    "unobtainium", "kryptonite", "mithril", "adamantium", "vibranium", "phlogiston", "orichalcum",
    "dilithium", "naquadah", "tiberium", "aetherium", "quintessium",
]
FAKE_TITLE_ADJ = ["Glass", "Silent", "Crimson", "Forgotten", "Hollow", "Seventh", "Wandering", "Copper"]
FAKE_TITLE_NOUN = ["Orchard", "Lighthouse", "Cartographer", "Clockmaker", "Harbour", "Archive"]
FAKE_TITLE_PLACE = ["Velmora", "Quendris", "Ostrava Vale", "Thule Minor", "Karsith", "Emberlee"]
BODIES = ["Venus", "the Sun", "Jupiter", "Mercury", "Neptune", "Saturn"]
FUTURE_QUESTIONS = [
    "What will the weather be in {capital} exactly one year from today?",
    "What will be the exact population of {capital} on the first day of the next century?",
    "Which song will be the most popular in {country} in the year 2091?",
]
PRIVATE_QUESTIONS = [
    "What did {author} eat for breakfast on their tenth birthday?",
    "What was the name of {author}'s neighbour's cat?",
]
MOON_PEOPLE_TEMPLATE = "In what year did {author} walk on the Moon?"
NONSENSE_QUESTIONS = [
    "How many {small} are in a {colour}?",
    "What is the boiling point of a {big}?",
]
COLOURS = ["purple", "turquoise", "beige", "crimson"]


@dataclass
class Prompt:
    """One question. ``answer``/``candidates`` are set for answerable prompts (candidates include the
    answer, in a fixed shuffled order) and empty for unanswerable ones."""

    id: str
    question: str
    kind: str  # "answerable" | "unanswerable"
    category: str
    answer: str | None = None
    candidates: list[str] = field(default_factory=list)
    split: str = "train"  # "train" | "heldout"
    # (start, end) character spans of ``question`` that emphasis steering up-weights (a passage the answer must
    # come from); empty for the built-in prompts
    marked: list[tuple[int, int]] = field(default_factory=list)
    # (start, end) character spans of ``question`` that hold the answer itself (kv_retrieval: the asked line):
    # emphasis on them (``inject.emphasis_span=evidence``) tells the model where to look, a positive control of
    # steering, not a method; empty for the built-in prompts
    evidence: list[tuple[int, int]] = field(default_factory=list)
    # labels to report accuracy by (e.g. {"length": "1k-2k", "position": "middle"}); empty for the built-in prompts
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def answerable(self) -> bool:
        return self.kind == "answerable"

    def spans(self, which: str) -> list[tuple[int, int]]:
        """The character spans emphasis steers toward: ``marked`` or ``evidence``."""
        if which not in ("marked", "evidence"):
            raise ValueError(f"spans {which!r} is unknown; valid: marked, evidence")
        return self.marked if which == "marked" else self.evidence

    def correct_index(self) -> int:
        return self.candidates.index(self.answer)


def _candidates(answer: str, pool: list[str], rng: random.Random, k: int = 4) -> list[str]:
    """The answer plus ``k - 1`` distinct distractors from ``pool``, shuffled by ``rng``."""
    others = sorted({p for p in pool if p != answer})
    chosen = [answer, *rng.sample(others, k - 1)]
    rng.shuffle(chosen)
    return chosen


def _numeric_candidates(answer: int, rng: random.Random) -> list[str]:
    offsets = rng.sample([-10, -3, -2, -1, 1, 2, 3, 10], 3)
    values = [answer, *(answer + o for o in offsets)]
    rng.shuffle(values)
    return [str(v) for v in values]


def split_of(seed: int, text: str, heldout_fraction: float) -> str:
    """``heldout`` for a share ``heldout_fraction`` of texts, by a hash of ``(seed, text)`` (free of any order), else
    ``train``."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"


def _answerable(rng: random.Random) -> list[tuple[str, str, str, list[str]]]:
    """(category, question, answer, candidates) for every answerable prompt."""
    out = []
    capitals = [c for c, _ in COUNTRIES.values()]
    continents = sorted({k for _, k in COUNTRIES.values()})
    for country, (capital, continent) in COUNTRIES.items():
        out.append(("capital", f"What is the capital of {country}?", capital, _candidates(capital, capitals, rng)))
        if country not in TRANSCONTINENTAL:
            out.append(("continent", f"On which continent is {country}?", continent,
                        _candidates(continent, continents, rng)))
    symbols, names = list(ELEMENTS.values()), list(ELEMENTS)
    for element, symbol in ELEMENTS.items():
        out.append(("symbol", f"What is the chemical symbol for {element}?", symbol, _candidates(symbol, symbols, rng)))
        out.append(("element", f"Which element has the chemical symbol {symbol}?", element,
                    _candidates(element, names, rng)))
    authors = sorted(set(BOOKS.values()))
    for book, author in BOOKS.items():
        out.append(("author", f"Who wrote {book}?", author, _candidates(author, authors, rng)))
    units = list(SI_UNITS.values())
    for quantity, unit in SI_UNITS.items():
        out.append(("si_unit", f"What is the SI unit of {quantity}?", unit, _candidates(unit, units, rng)))
    for small, big, n in CONVERSIONS:
        out.append(("conversion", f"How many {small} are in a {big}?", str(n), _numeric_candidates(n, rng)))
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append(("addition", f"What is {a} plus {b}?", str(a + b), _numeric_candidates(a + b, rng)))
    for _ in range(30):
        a, b = rng.randint(20, 99), rng.randint(2, 19)
        out.append(("subtraction", f"What is {a} minus {b}?", str(a - b), _numeric_candidates(a - b, rng)))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append(("multiplication", f"What is {a} times {b}?", str(a * b), _numeric_candidates(a * b, rng)))
    return out


def _unanswerable(rng: random.Random) -> list[tuple[str, str]]:
    """(category, question) for every unanswerable / false-premise prompt."""
    out = []
    for place in NON_COUNTRIES:
        out.append(("no_capital", f"What is the capital of {place}?"))
    for body in BODIES:
        out.append(("false_premise", f"Who was the first person to walk on {body}?"))
        out.append(("false_premise", f"What is the name of the largest city on {body}?"))
    for fake in FAKE_ELEMENTS:
        out.append(("fake_element", f"What is the chemical symbol for {fake}?"))
        out.append(("fake_element", f"What is the atomic number of {fake}?"))
    titles = [f"The {a} {n} of {p}" for a in FAKE_TITLE_ADJ for n in FAKE_TITLE_NOUN for p in FAKE_TITLE_PLACE]
    for title in rng.sample(titles, 40):
        out.append(("fake_book", f"Who wrote {title}?"))
    authors = sorted(set(BOOKS.values()))
    for author in rng.sample(authors, 15):
        out.append(("false_premise", MOON_PEOPLE_TEMPLATE.format(author=author)))
    for author in rng.sample(authors, 12):
        template = rng.choice(PRIVATE_QUESTIONS)
        out.append(("unknowable", template.format(author=author)))
    for country in rng.sample(sorted(COUNTRIES), 24):
        template = rng.choice(FUTURE_QUESTIONS)
        out.append(("future", template.format(country=country, capital=COUNTRIES[country][0])))
    for _ in range(15):
        out.append(("division_by_zero", f"What is {rng.randint(1, 99)} divided by zero?"))
    for small, big, _ in rng.sample(CONVERSIONS, 12):
        template = rng.choice(NONSENSE_QUESTIONS)
        out.append(("nonsense", template.format(small=small, big=big, colour=rng.choice(COLOURS))))
    return out


def build_prompts(seed: int = 0, heldout_fraction: float = 0.25) -> list[Prompt]:
    """The whole prompt set (deterministic for a seed); duplicates are dropped, first one kept."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    rng = random.Random(f"uzr-prompts-{_TABLES_STREAM}-{seed}")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    # the version-1 prompts first, in their order (same ids), then the checkable ones
    for kind, items in (("answerable", _answerable(rng)), ("unanswerable", _unanswerable(rng)),
                        ("answerable", checkable(seed))):
        for category, question, *answer in items:
            if question not in seen:
                seen.add(question)
                prompts.append(Prompt(f"{kind[0]}{len(prompts):04d}", question, kind, category, *answer))
    for p in prompts:
        p.split = split_of(seed, p.question, heldout_fraction)
    return prompts


class PromptSet:
    """The built-in prompts with their split: ``.train``, ``.heldout``, ``.all``."""

    def __init__(self, seed: int = 0, heldout_fraction: float = 0.25):
        self.seed, self.heldout_fraction = seed, heldout_fraction
        self.all = build_prompts(seed, heldout_fraction)

    @property
    def train(self) -> list[Prompt]:
        return [p for p in self.all if p.split == "train"]

    @property
    def heldout(self) -> list[Prompt]:
        return [p for p in self.all if p.split == "heldout"]

    def stats(self) -> dict:
        return {
            "total": len(self.all),
            "by_split_kind": {f"{s}/{k}": n for (s, k), n in sorted(Counter((p.split, p.kind) for p in self.all).items())},
            "by_category": dict(sorted(Counter(p.category for p in self.all).items())),
        }

    def write_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in self.all))
        return path


def resolve_format(tokenizer, style: str = "auto") -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template (instruction-tuned models answer a
    bare "Question: ... Answer:" with end-of-turn), else ``qa``; ``qa``/``chat`` are kept."""
    if style not in FORMATS:
        raise ValueError(f"prompt format {style!r} is unknown; valid: {', '.join(FORMATS)}")
    if style == "auto":
        return "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "qa"
    return style


def format_prompt(question: str, tokenizer=None, style: str = "qa") -> str:
    """The text a model sees. ``qa``: ``"Question: ...\nAnswer:"`` (answers start with a space);
    ``chat``: the tokenizer's chat template with a generation prompt; ``auto``: see :func:`resolve_format`."""
    style = resolve_format(tokenizer, style)
    if style == "qa":
        return f"Question: {question}\nAnswer:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("gate.prompt_format=chat needs a tokenizer with a chat template; use prompt_format=qa or auto")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def answer_prefix(style: str) -> str:
    """What goes between the formatted prompt and a candidate answer (``style`` resolved)."""
    return " " if style == "qa" else ""


def adds_special_tokens(style: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS): a chat template writes its own."""
    return style == "qa"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    parser.add_argument("--jsonl", help="write the prompt set to this file")
    args = parser.parse_args(argv)
    prompts = PromptSet(args.seed, args.heldout_fraction)
    print(json.dumps(prompts.stats(), indent=2))
    if args.jsonl:
        print(f"wrote {prompts.write_jsonl(args.jsonl)}")


if __name__ == "__main__":
    main()
