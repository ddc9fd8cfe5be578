"""Answerable prompts whose answers uzr computes itself: calendar, alphabet, numerals, units, arithmetic.

Added in prompts version 2 to grow the facts-QA held-out set past 200 prompts (one prompt is then at most
0.005 of it). Every answer comes from a rule (``datetime``, ``chr``/``ord``, a Roman-numeral or number-word
writer, a multiplication), so ``tests/test_checkable_prompts.py`` re-derives each one by a second route
(parsing the answer back, or computing it from the question's text).

Each category draws from its own ``random.Random`` (seeded by the prompt seed and the category), so adding a
category or changing one leaves every other prompt, and the prompts of version 1, exactly as they were.
Questions are short and candidates are four short strings, like the rest of the set, so facts QA stays fast.
"""

from __future__ import annotations

import calendar
import datetime
import random
from collections.abc import Callable

MONTHS = list(calendar.month_name)[1:]
WEEKDAYS = list(calendar.day_name)  # Monday first
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
         (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
# (small unit plural, big unit singular, big unit plural, small units in one big unit)
UNIT_MULTIPLES = [
    ("seconds", "minute", "minutes", 60), ("minutes", "hour", "hours", 60), ("hours", "day", "days", 24),
    ("days", "week", "weeks", 7), ("months", "year", "years", 12), ("years", "decade", "decades", 10),
    ("centimetres", "metre", "metres", 100), ("millimetres", "centimetre", "centimetres", 10),
    ("metres", "kilometre", "kilometres", 1000), ("grams", "kilogram", "kilograms", 1000),
    ("millilitres", "litre", "litres", 1000), ("inches", "foot", "feet", 12), ("feet", "yard", "yards", 3),
    ("ounces", "pound", "pounds", 16),
]

Item = tuple[str, str, str, list[str]]  # (category, question, answer, candidates)


def roman(n: int) -> str:
    """``n`` (1..3999) in Roman numerals, subtractive form (``14`` -> ``XIV``)."""
    out = []
    for value, symbol in ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def words(n: int) -> str:
    """``n`` (0..99) in English words, hyphenated (``42`` -> ``forty-two``)."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _pick(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    """The answer and three distinct distractors from ``pool``, shuffled."""
    chosen = [answer, *rng.sample(sorted(set(pool) - {answer}), 3)]
    rng.shuffle(chosen)
    return chosen


def _near(answer: int, rng: random.Random, low: int = 0, high: int | None = None) -> list[int]:
    """The answer and three distinct nearby integers (each in ``[low, high]``), shuffled."""
    offsets = [o for o in (-10, -3, -2, -1, 1, 2, 3, 10) if low <= answer + o <= (high or answer + o)]
    values = [answer, *(answer + o for o in rng.sample(offsets, 3))]
    rng.shuffle(values)
    return values


def _numbers(answer: int, rng: random.Random, low: int = 0) -> list[str]:
    return [str(v) for v in _near(answer, rng, low)]


def _calendar(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    for i, month in enumerate(MONTHS):
        out.append(("next_month", f"Which month comes after {month}?", MONTHS[(i + 1) % 12],
                    _pick(MONTHS[(i + 1) % 12], MONTHS, rng)))
        out.append(("previous_month", f"Which month comes before {month}?", MONTHS[i - 1],
                    _pick(MONTHS[i - 1], MONTHS, rng)))
        out.append(("month_order", f"What is the {ORDINALS[i]} month of the year?", month, _pick(month, MONTHS, rng)))
        if month != "February":  # 28 or 29: the answer would depend on the year
            days = str(calendar.monthrange(2001, i + 1)[1])
            out.append(("month_days", f"How many days are in {month}?", days,
                        _pick(days, ["28", "29", "30", "31"], rng)))
    for i, day in enumerate(WEEKDAYS):
        out.append(("next_weekday", f"Which day comes after {day}?", WEEKDAYS[(i + 1) % 7],
                    _pick(WEEKDAYS[(i + 1) % 7], WEEKDAYS, rng)))
        out.append(("previous_weekday", f"Which day comes before {day}?", WEEKDAYS[i - 1],
                    _pick(WEEKDAYS[i - 1], WEEKDAYS, rng)))
    return out


def _alphabet(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    for i, letter in enumerate(LETTERS):
        if i + 1 < len(LETTERS):
            out.append(("next_letter", f"Which letter comes after {letter} in the alphabet?", LETTERS[i + 1],
                        _pick(LETTERS[i + 1], LETTERS, rng)))
        if i > 0:
            out.append(("previous_letter", f"Which letter comes before {letter} in the alphabet?", LETTERS[i - 1],
                        _pick(LETTERS[i - 1], LETTERS, rng)))
    return out


def _numerals(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    for n in rng.sample(range(1, 100), 60):
        out.append(("roman", f"What is {n} in Roman numerals?", roman(n), [roman(v) for v in _near(n, rng, 1, 99)]))
    for n in rng.sample(range(11, 100), 60):
        out.append(("number_word", f"How is {n} written in words?", words(n), [words(v) for v in _near(n, rng, 1, 99)]))
    return out


def _units(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    for small, _, bigs, n in UNIT_MULTIPLES:
        for k in rng.sample(range(2, 10), 4):
            out.append(("unit_multiple", f"How many {small} are in {k} {bigs}?", str(n * k), _numbers(n * k, rng)))
    return out


def _arithmetic(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    for n in range(2, 21):
        out.append(("square", f"What is {n} squared?", str(n * n), _numbers(n * n, rng)))
    for b, q in rng.sample([(b, q) for b in range(2, 13) for q in range(2, 13)], 60):
        out.append(("division", f"What is {b * q} divided by {b}?", str(q), _numbers(q, rng, 1)))
    for n in rng.sample(range(6, 100), 45):
        out.append(("double", f"What is double {n}?", str(2 * n), _numbers(2 * n, rng)))
    for n in rng.sample(range(3, 61), 40):
        out.append(("half", f"What is half of {2 * n}?", str(n), _numbers(n, rng, 1)))
    return out


def _dates(rng: random.Random) -> list[Item]:
    out: list[Item] = []
    start = datetime.date(1990, 1, 1).toordinal()
    for _ in range(40):
        day = datetime.date.fromordinal(start + rng.randrange(365 * 40))
        answer = WEEKDAYS[day.weekday()]
        out.append(("weekday_of_date", f"What day of the week was {day.day} {MONTHS[day.month - 1]} {day.year}?",
                    answer, _pick(answer, WEEKDAYS, rng)))
    return out


GENERATORS: dict[str, Callable[[random.Random], list[Item]]] = {
    "calendar": _calendar, "alphabet": _alphabet, "numerals": _numerals, "units": _units,
    "arithmetic": _arithmetic, "dates": _dates,
}


def checkable(seed: int) -> list[Item]:
    """Every checkable prompt for a prompt seed, generator by generator (each with its own random stream)."""
    return [item for name, make in GENERATORS.items() for item in make(random.Random(f"uzr-checkable-{seed}-{name}"))]
