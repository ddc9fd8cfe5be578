"""Every computed answer of the prompt set, re-derived by a second route; the version-1 prompts unchanged."""

from __future__ import annotations

import datetime
import hashlib
import json
import re

import pytest

from uzr.qa.checkable import roman, words
from uzr.qa.prompts import CONVERSIONS, PromptSet

MONDAY = datetime.date(2001, 1, 1)  # a Monday: weekday names come from strftime, not from calendar.day_name
ORDINAL = {w: i for i, w in enumerate(["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                                       "ninth", "tenth", "eleventh", "twelfth"], 1)}
ROMAN_RE = re.compile(r"^(X{0,3}|XL|L|LX{1,3}|XC)(I{0,3}|IV|V|VI{1,3}|IX)$")  # canonical numerals below 100
ROMAN_VALUE = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
WORD_VALUE = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                          "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                                          "seventeen", "eighteen", "nineteen"])}
WORD_VALUE.update({w: 10 * i for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                                                    "ninety"], 2)})
PER_BIG = {(small, big): n for small, big, n in CONVERSIONS}


def month_name(m: int) -> str:
    return datetime.date(2001, m, 1).strftime("%B")


def weekday_name(offset: int) -> str:
    return (MONDAY + datetime.timedelta(days=offset)).strftime("%A")


def month_number(name: str) -> int:
    return datetime.datetime.strptime(name, "%B").month


def weekday_number(name: str) -> int:
    return [weekday_name(i) for i in range(7)].index(name)


def parse_roman(text: str) -> int:
    """Subtractive Roman numeral -> int (a symbol before a larger one subtracts)."""
    values = [ROMAN_VALUE[c] for c in text]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def parse_words(text: str) -> int:
    return sum(WORD_VALUE[w] for w in text.split("-"))


def _numbers(q: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", q)]


def _unit_multiple(q: str) -> str:
    small, k, bigs = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", q).groups()
    big = {"feet": "foot", "inches": "inch"}.get(bigs, bigs[:-1])
    return str(int(k) * PER_BIG[small, big])


# category -> the answer computed from the question's text
CHECKS = {
    "addition": lambda q: str(sum(_numbers(q))),
    "subtraction": lambda q: str(_numbers(q)[0] - _numbers(q)[1]),
    "multiplication": lambda q: str(_numbers(q)[0] * _numbers(q)[1]),
    "conversion": lambda q: str(PER_BIG[re.fullmatch(r"How many (.+) are in a (.+)\?", q).groups()]),
    "square": lambda q: str(_numbers(q)[0] ** 2),
    "division": lambda q: str(_numbers(q)[0] // _numbers(q)[1]) if _numbers(q)[0] % _numbers(q)[1] == 0 else None,
    "double": lambda q: str(2 * _numbers(q)[0]),
    "half": lambda q: str(_numbers(q)[0] // 2) if _numbers(q)[0] % 2 == 0 else None,
    "unit_multiple": _unit_multiple,
    "next_month": lambda q: month_name(month_number(q.split()[-1][:-1]) % 12 + 1),
    "previous_month": lambda q: month_name((month_number(q.split()[-1][:-1]) - 2) % 12 + 1),
    "month_order": lambda q: month_name(ORDINAL[q.split()[3]]),
    "month_days": lambda q: str(((datetime.date(2001, m + 1, 1) if (m := month_number(q.split()[-1][:-1])) < 12
                                  else datetime.date(2002, 1, 1)) - datetime.date(2001, m, 1)).days),
    "next_weekday": lambda q: weekday_name(weekday_number(q.split()[-1][:-1]) + 1),
    "previous_weekday": lambda q: weekday_name(weekday_number(q.split()[-1][:-1]) - 1),
    "next_letter": lambda q: chr(ord(q.split()[4]) + 1),
    "previous_letter": lambda q: chr(ord(q.split()[4]) - 1),
    "weekday_of_date": lambda q: datetime.datetime.strptime(q.split("was ")[1][:-1], "%d %B %Y").strftime("%A"),
    "roman": lambda q: next(r for r in _roman_candidates() if parse_roman(r) == _numbers(q)[0]),
    "number_word": lambda q: next(w for w in _word_candidates() if parse_words(w) == _numbers(q)[0]),
}
# facts from tables (not computable): checked by hand in test_gate's spot checks
TABLE_CATEGORIES = {"capital", "continent", "symbol", "element", "author", "si_unit"}


def _roman_candidates() -> list[str]:
    """Every canonical numeral below 100, written out from the grammar (not from uzr's writer)."""
    tens = ["", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"]
    ones = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
    return [t + o for t in tens for o in ones if t + o]


def _word_candidates() -> list[str]:
    tens = [w for w, v in WORD_VALUE.items() if v >= 20]
    units = [w for w, v in WORD_VALUE.items() if 0 < v < 10]
    return [w for w, v in WORD_VALUE.items() if 0 < v < 20] + tens + [f"{t}-{u}" for t in tens for u in units]


@pytest.fixture(scope="module")
def prompt_set() -> PromptSet:
    return PromptSet(seed=0)


def test_every_computed_answer_is_right_and_among_four_valid_candidates(prompt_set):
    answerable = [p for p in prompt_set.all if p.answerable]
    assert {p.category for p in answerable} <= set(CHECKS) | TABLE_CATEGORIES  # a new category brings a check
    checked = 0
    for p in answerable:
        if p.category in TABLE_CATEGORIES:
            continue
        assert CHECKS[p.category](p.question) == p.answer, p
        assert len(p.candidates) == 4 == len(set(p.candidates)) and p.answer in p.candidates, p
        if p.category == "roman":
            assert all(ROMAN_RE.match(c) for c in p.candidates), p
        if p.category == "number_word":
            assert all(c in _word_candidates() for c in p.candidates), p
        if p.answer.lstrip("-").isdigit():
            assert all(c.lstrip("-").isdigit() for c in p.candidates), p
        checked += 1
    assert checked == 606  # of 886 answerable prompts; the other 280 come from the fact tables


def test_writers_agree_with_the_parsers():
    assert [parse_roman(roman(n)) for n in range(1, 100)] == list(range(1, 100))
    assert sorted(roman(n) for n in range(1, 100)) == sorted(_roman_candidates())
    assert [parse_words(words(n)) for n in range(1, 100)] == list(range(1, 100))
    assert (roman(14), roman(49), words(42), words(70)) == ("XIV", "XLIX", "forty-two", "seventy")


def test_heldout_set_is_large_enough_that_one_prompt_is_at_most_half_a_percent(prompt_set):
    heldout = [p for p in prompt_set.heldout if p.answerable]
    assert len(heldout) == 203 and 1 / len(heldout) <= 0.005
    assert len({p.category for p in heldout}) >= 25


def test_version_one_prompts_keep_their_ids_candidates_and_split(prompt_set):
    """The 568 prompts of version 1 come first and are unchanged (results on the old 93 stay comparable)."""
    old = prompt_set.all[:568]
    digest = hashlib.sha256(json.dumps([[p.id, p.question, p.candidates, p.split] for p in old]).encode()).hexdigest()
    assert sum(p.answerable and p.split == "heldout" for p in old) == 93
    assert digest == V1_DIGEST


V1_DIGEST = "fa9c7ee88783b005bc9c307fdf7d885f33b7dc00787207d63d5796bf60f2d4d1"  # main at 8914c44, version 1
