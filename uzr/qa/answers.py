"""Generated answers judged against the fact tables, and two settings compared on the same prompts.

Facts QA (:mod:`uzr.qa.facts`) scores candidates by likelihood; a user reads the *greedy answer*. This
module judges that answer: it is **right** when it states the fact-table answer, found as whole words
after normalisation (case, punctuation, diacritics, ``metre``/``meter`` spellings; a plural ("Newtons"); an
integer answer also as English words; a continent also as "the European continent"), with three ways a mention does not count:

- **echo**: the answer's words only inside a run of two or more words copied from the question
  ("What is 4 divided by 2?" -> "4 divided by 2 is 3" does not state 2);
- **negation**: the answer right after ``not`` / ``isn't`` / ``rather than`` ... ("It is not Paris");
- **another candidate**: a distractor of the prompt stated as well, outside the answer ("Paris or Lyon").

An author counts by surname alone ("Shakespeare"), unless another author of that surname is named.

Answers of at most two letters with a capital ("F", "He", "IV") are matched with their case, so a
one-letter answer never matches inside a word ("of") nor the article "a" or the pronoun "he".

Each answer also gets a **stance**: ``refusal`` (a refusal phrase and the answer not stated),
``hedge`` (a hedging or refusal phrase; right or wrong), or ``answer``.

:func:`compare_answers` pairs two settings on the same prompts (e.g. the student without and with
injection): right counts of each, *wrecked* (right without, wrong with) and *rescued* (the reverse), and
the paired interval of the accuracy difference (:func:`uzr.intervals.accuracy_difference`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from uzr.config.gate import DEFAULT_HEDGES
from uzr.intervals import accuracy_difference
from uzr.qa.checkable import words as number_words
from uzr.qa.prompts import BOOKS, PromptSet

ANSWER, HEDGE, REFUSAL = "answer", "hedge", "refusal"
# A refusal states that there is no answer, or that the model will not give one.
REFUSALS = [
    "i don't know", "i do not know", "don't know", "no one knows", "nobody knows", "i cannot", "i can't",
    "i'm sorry", "i am sorry", "as an ai", "i'm unable", "i am unable", "unable to", "i'm not able", "i am not able",
    "there is no", "there's no", "there are no", "does not exist", "doesn't exist", "does not have", "doesn't have",
    "has no", "not possible", "impossible", "undefined", "not defined", "fictional", "not real", "not known",
    "unknown", "cannot be determined", "can't be determined", "not enough information",
]
# Words after which a mention is denied, not stated ("not Paris"), and word pairs doing the same ("rather than").
NEGATORS = {"not", "isnt", "arent", "wasnt", "werent", "never", "nor", "neither", "doesnt", "dont"}
NEGATING_PAIRS = {("rather", "than"), ("instead", "of"), ("other", "than")}
FILLERS = {"the", "a", "an", "exactly", "actually", "really", "quite", "simply", "just"}  # "not the answer"
# A continent stated as its adjective counts only before "continent" ("the European continent" states Europe,
# "the European Union" does not).
CONTINENT_ADJECTIVES = {"Europe": "European", "Asia": "Asian", "Africa": "African", "North America": "North American",
                        "South America": "South American", "Oceania": "Oceanian", "Antarctica": "Antarctic"}
# British and American spellings fold to one (the fact tables are British).
SPELLINGS = (("metre", "meter"), ("litre", "liter"), ("aluminium", "aluminum"), ("sulphur", "sulfur"))


@dataclass(frozen=True)
class AnswerVerdict:
    """Whether a generated answer states the fact-table answer, its stance and why."""

    correct: bool
    stance: str  # answer | hedge | refusal
    reason: str  # states the answer | answer absent | answer negated | answer only echoes the question | names another candidate too

    def as_dict(self) -> dict:
        return asdict(self)


def _fold(text: str) -> str:
    """Diacritics off, possessive 's dropped ("Austen's" -> "Austen"), other apostrophes dropped ("isn't" ->
    "isnt"), thousands separators dropped, every other non-alphanumeric character a space; case kept."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(?<=[A-Za-z])['\u2019]s\b", "", text)
    text = re.sub(r"['\u2018\u2019`]", "", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.sub(r"[^0-9A-Za-z]+", " ", text).strip()


def normalise(text: str) -> str:
    """Lower-case words of ``text`` as :func:`judge_answer` compares them: ``"Bogotá, D.C."`` -> ``"bogota d c"``."""
    return _spell(_fold(text).lower())


def _spell(text: str) -> str:
    for british, american in SPELLINGS:
        text = text.replace(british, american)
    return text


def _case_sensitive(answer: str) -> bool:
    """Short symbols ("F", "He", "IV"): their case tells them from words ("of", "he", "iv")."""
    letters = _fold(answer).replace(" ", "")
    return letters.isalpha() and len(letters) <= 2 and any(c.isupper() for c in letters)


def _words(text: str, keep_case: bool) -> list[str]:
    folded = _fold(text)
    return (folded if keep_case else _spell(folded.lower())).split()


def _forms(answer: str) -> list[list[str]]:
    """The word sequences that state ``answer``: itself, its plural ("newtons" for newton), an integer 0..99 also
    in English words, a continent also as "<adjective> continent"."""
    forms = [_words(answer, _case_sensitive(answer))]
    if not _case_sensitive(answer) and forms[0] and forms[0][-1].isalpha() and len(forms[0][-1]) >= 3:
        forms.append([*forms[0][:-1], forms[0][-1] + ("es" if forms[0][-1].endswith(("s", "x", "z")) else "s")])
    if answer.strip().isdigit() and int(answer) < 100:
        forms.append(_words(number_words(int(answer)), False))
    if answer in CONTINENT_ADJECTIVES:
        forms.append(_words(f"{CONTINENT_ADJECTIVES[answer]} continent", False))
    return [f for f in forms if f]


def _echoed(response: list[str], question: list[str]) -> list[bool]:
    """(len(response),) True where a word sits in a run of >= 2 words copied from the question."""
    echo = [False] * len(response)
    run = [0] * (len(question) + 1)  # run[j + 1]: length of the common run ending at response[i], question[j]
    for i, word in enumerate(response):
        previous, run = run, [0] * (len(question) + 1)
        for j, q in enumerate(question):
            if word == q:
                run[j + 1] = previous[j] + 1
                if run[j + 1] >= 2:
                    for k in range(i - run[j + 1] + 1, i + 1):
                        echo[k] = True
    return echo


def _negated(lower: list[str], start: int) -> bool:
    """Whether the mention starting at word ``start`` is denied: "not X", "not the X", "rather than X"."""
    before = lower[max(0, start - 2):start]
    if before and before[-1] in NEGATORS:
        return True
    return len(before) == 2 and (tuple(before) in NEGATING_PAIRS or (before[0] in NEGATORS and before[1] in FILLERS))


def _mentions(words: list[str], form: list[str]) -> list[tuple[int, int]]:
    """(start, end) word spans where ``form`` occurs in ``words``."""
    n = len(form)
    return [(i, i + n) for i in range(len(words) - n + 1) if words[i:i + n] == form]


def _spans(text: str, answer: str, question: str) -> dict[str, list[tuple[int, int]]]:
    """The answer's mentions in ``text`` (word spans of its lower-case word list) by kind: ``stated``,
    ``echo`` (inside words copied from the question) and ``negated``."""
    lower = _words(text, False)
    echo = _echoed(lower, _words(question, False))
    keep_case = _case_sensitive(answer)
    cased = _words(text, True)
    out: dict[str, list[tuple[int, int]]] = {"stated": [], "echo": [], "negated": []}
    for k, form in enumerate(_forms(answer)):
        words = cased if keep_case and k == 0 else lower
        if len(words) != len(lower):  # the spelling fold never splits words; guard the index alignment anyway
            words = lower
        for start, end in _mentions(words, form):
            kind = "echo" if all(echo[start:end]) else "negated" if _negated(lower, start) else "stated"
            out[kind].append((start, end))
    return out


def _phrase_text(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_phrase(text: str, phrases: Sequence[str]) -> bool:
    """True if ``text`` contains one of ``phrases`` as whole words, ignoring case, curly apostrophes and runs
    of whitespace ("I'm NOT  sure" contains "not sure"; "Maybelline" does not contain "maybe")."""
    norm = _phrase_text(text)
    for phrase in phrases:
        p = _phrase_text(phrase)
        if p and re.search(rf"(?<![\w']){re.escape(p)}(?![\w'])", norm):
            return True
    return False


def _stance(text: str, stated: bool, hedges: Sequence[str]) -> str:
    if not stated and contains_phrase(text, REFUSALS):
        return REFUSAL
    return HEDGE if contains_phrase(text, [*hedges, *REFUSALS]) else ANSWER


def judge_answer(text: str, answer: str, question: str = "", candidates: Sequence[str] = (),
                 hedges: Sequence[str] = DEFAULT_HEDGES, aliases: Sequence[str] = ()) -> AnswerVerdict:
    """Whether the generated ``text`` states ``answer`` (module docstring: whole words, normalised; not
    echoed from ``question``, not negated, no other of ``candidates`` stated beside it), and its stance.
    ``aliases``: shorter forms that count too unless they sit inside a candidate's mention (an author's
    surname: "Bronte" inside "Emily Bronte" does not state "Charlotte Bronte")."""
    spans = _spans(text, answer, question)
    full = spans["stated"]
    rivals = [r for c in candidates if normalise(c) != normalise(answer) for r in _spans(text, c, question)["stated"]
              if not any(_overlap(r, f) for f in full)]
    short = [a for alias in aliases for a in _spans(text, alias, question)["stated"]
             if not any(_overlap(a, r) for r in rivals)]
    stated = full + short
    correct = bool(stated) and not rivals
    if correct:
        reason = "states the answer"
    elif stated:
        reason = "names another candidate too"
    elif spans["negated"]:
        reason = "answer negated"
    elif spans["echo"]:
        reason = "answer only echoes the question"
    else:
        reason = "answer absent"
    return AnswerVerdict(correct, _stance(text, correct, hedges), reason)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _surname_rule(prompt, people: Sequence[str]) -> tuple[list[str], list[str]]:
    """(aliases, extra rivals) of an author prompt: the surname counts, and every other author of that surname
    is a rival (so "Emily Bronte" is not "Charlotte Bronte")."""
    surname = prompt.answer.split()[-1]
    if surname == prompt.answer:
        return [], []
    namesakes = [p for p in people if p != prompt.answer and p.split()[-1] == surname]
    return [surname], namesakes


def judge_prompts(prompts: Sequence, texts: Sequence[str], hedges: Sequence[str] = DEFAULT_HEDGES
                  ) -> list[AnswerVerdict]:
    """:func:`judge_answer` of each generated text against its :class:`~uzr.qa.prompts.Prompt` (answer,
    question, candidates; an author also by surname, see :func:`_surname_rule`); a prompt without an
    answer is never right."""

    if len(prompts) != len(texts):
        raise ValueError(f"judge_prompts: {len(prompts)} prompts but {len(texts)} answers")
    people = sorted(set(BOOKS.values()))
    out = []
    for p, t in zip(prompts, texts):
        if not p.answer:
            out.append(AnswerVerdict(False, _stance(t, False, hedges), "no known answer"))
            continue
        aliases, namesakes = _surname_rule(p, people) if p.category == "author" else ([], [])
        out.append(judge_answer(t, p.answer, p.question, [*p.candidates, *namesakes], hedges, aliases))
    return out


@dataclass(frozen=True)
class AnswerComparison:
    """Setting ``after`` against setting ``before`` on the same prompts (e.g. the student without and with
    injection): right counts, wrecked / rescued answers and the paired accuracy difference ``after - before``."""

    n: int
    right_before: int
    right_after: int
    wrecked: int  # right before, wrong after
    rescued: int  # wrong before, right after
    difference: dict  # PairedDifference.as_dict() of after - before, with its verdict

    def as_dict(self) -> dict:
        return asdict(self)


def compare_answers(correct_before: Sequence[bool], correct_after: Sequence[bool], seed: int = 0) -> AnswerComparison:
    """Pair two settings' verdicts (``(n,)`` bools, same prompts in the same order): counts, wrecked,
    rescued, and the paired bootstrap interval + McNemar p of the accuracy difference (after - before)."""
    before, after = [bool(c) for c in correct_before], [bool(c) for c in correct_after]
    diff = accuracy_difference(after, before, seed=seed)
    return AnswerComparison(
        n=len(before), right_before=sum(before), right_after=sum(after),
        wrecked=sum(b and not a for b, a in zip(before, after)), rescued=sum(a and not b for b, a in zip(before, after)),
        difference={**diff.as_dict(), "verdict": diff.verdict(higher_is_better=True)})


def judge_known(question: str, texts: dict[str, str], prompts: Sequence | None = None) -> dict | None:
    """Verdicts of several answers (``{setting: text}``) to ``question`` when it is one of the built-in prompts
    (:mod:`uzr.qa.prompts`, matched by normalised text): ``{"fact_answer", "kind", "verdicts": {setting: {...}}}``;
    None for a question the fact tables do not hold."""
    if prompts is None:

        prompts = PromptSet().all
    key = normalise(question)
    prompt = next((p for p in prompts if normalise(p.question) == key), None)
    if prompt is None:
        return None
    verdicts = judge_prompts([prompt] * len(texts), list(texts.values()))
    return {"fact_answer": prompt.answer, "kind": prompt.kind,
            "verdicts": {name: v.as_dict() for name, v in zip(texts, verdicts)}}
