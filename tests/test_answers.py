"""Generated answers judged against the fact tables (uzr.qa.answers), on hand-written answers."""

from __future__ import annotations

import pytest

from uzr.qa.answers import (
    ANSWER,
    HEDGE,
    REFUSAL,
    compare_answers,
    judge_answer,
    judge_known,
    judge_prompts,
    normalise,
)
from uzr.qa.prompts import Prompt

FRANCE = ("What is the capital of France?", "Paris", ["Lyon", "Paris", "Berlin", "Madrid"])


def judge(text, question, answer, candidates=()):
    return judge_answer(text, answer, question, candidates)


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.", "Paris", "paris!", "PARIS, of course.", "It's Paris, not Lyon.",
    "The capital is not Lyon but Paris.",
])
def test_right_answers(text):
    verdict = judge(text, *FRANCE)
    assert verdict.correct and verdict.reason == "states the answer" and verdict.stance == ANSWER


@pytest.mark.parametrize(("text", "reason"), [
    ("The capital of France is Lyon.", "answer absent"),
    ("L'Étoile, la Marseillaise, la femme", "answer absent"),
    ("Parisian cafés are lovely.", "answer absent"),  # whole words only
    ("It is not Paris.", "answer negated"),
    ("The capital of France is not the Paris you know, it is Lyon.", "answer negated"),
    ("Lyon rather than Paris.", "answer negated"),
    ("Paris or Lyon.", "names another candidate too"),
    ("Paris is in France; the capital is Lyon.", "names another candidate too"),
])
def test_wrong_answers_and_why(text, reason):
    verdict = judge(text, *FRANCE)
    assert not verdict.correct and verdict.reason == reason


def test_a_denied_answer_alone_is_negated():
    assert judge("Rather than Paris, I would say Marseille.", *FRANCE).reason == "answer negated"


def test_one_letter_answer_never_matches_inside_a_word_nor_an_article():
    question = "What is the chemical symbol for fluorine?"
    assert not judge("The symbol of fluorine is Fl.", question, "F").correct  # "F" is not in "of" nor "Fl"
    assert judge("The chemical symbol for fluorine is F.", question, "F").correct
    assert judge('It is "F".', question, "F").correct
    letter = "Which letter comes before B in the alphabet?"
    assert not judge("It is a vowel.", letter, "A").correct  # the article "a" is not the letter "A"
    assert judge("A comes before B.", letter, "A").correct
    helium = "What is the chemical symbol for helium?"
    assert not judge("I think he knows.", helium, "He").correct and judge("It's He.", helium, "He").correct


def test_casing_punctuation_diacritics_and_multi_word_answers():
    author = ("Who wrote One Hundred Years of Solitude?", "Gabriel Garcia Marquez")
    assert judge("Gabriel García Márquez wrote it.", *author).correct
    assert not judge("Gabriel wrote it.", *author).correct  # every word of the answer, in order
    assert not judge("García Márquez, Gabriel.", *author).correct
    tolkien = ("Who wrote The Hobbit?", "J. R. R. Tolkien")
    assert judge("It was written by J.R.R. Tolkien.", *tolkien).correct
    assert judge("The capital of Colombia is BOGOTÁ.", "What is the capital of Colombia?", "Bogota").correct
    assert judge("The SI unit of length is the meter.", "What is the SI unit of length?", "metre").correct
    assert normalise("Bogotá, D.C.") == "bogota d c"


def test_numbers_as_digits_or_words_but_not_echoed_from_the_question():
    question = "What is 4 divided by 2?"
    assert judge("2", question, "2").correct
    assert judge("4 divided by 2 is 2.", question, "2").correct
    assert judge("The answer is two.", question, "2").correct
    echo = judge("4 divided by 2 is 3.", question, "2")
    assert not echo.correct and echo.reason == "answer only echoes the question"
    assert judge("There are 1,000 metres in a kilometre.", "How many metres are in a kilometre?", "1000").correct
    assert not judge("There are 100 metres.", "How many metres are in a kilometre?", "1000").correct
    words = "How is 42 written in words?"
    assert judge("Forty-two.", words, "forty-two").correct and not judge("Forty.", words, "forty-two").correct
    # a distractor that is part of the answer ("forty" in "forty-two") is not another candidate
    assert judge("forty-two", words, "forty-two", ["forty", "forty-two", "fifty-two", "forty-one"]).correct


@pytest.mark.parametrize(("text", "correct", "stance"), [
    ("I think it is Paris.", True, HEDGE),
    ("Maybe Paris, maybe Lyon.", False, HEDGE),
    ("I'm not sure.", False, HEDGE),
    ("I don't know.", False, REFUSAL),
    ("I'm sorry, I cannot answer that.", False, REFUSAL),
    ("There is no capital of France.", False, REFUSAL),
    ("I cannot be certain, but it is Paris.", True, HEDGE),
])
def test_hedges_and_refusals(text, correct, stance):
    verdict = judge(text, *FRANCE)
    assert (verdict.correct, verdict.stance) == (correct, stance)


def test_unanswerable_prompts_are_never_right_and_refusals_are_classified():
    prompts = [Prompt("u0", "What is the capital of Mars?", "unanswerable", "no_capital"),
               Prompt("a0", FRANCE[0], "answerable", "capital", "Paris", FRANCE[2])]
    verdicts = judge_prompts(prompts, ["Mars does not have a capital.", "Paris."])
    assert [v.correct for v in verdicts] == [False, True]
    assert verdicts[0].stance == REFUSAL and verdicts[0].reason == "no known answer"
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        judge_prompts(prompts, ["Paris."])


def test_compare_answers_counts_wrecked_and_rescued_with_a_paired_interval():
    before = [True] * 30 + [False] * 10
    after = [True] * 10 + [False] * 20 + [True] * 2 + [False] * 8  # 20 wrecked, 2 rescued
    result = compare_answers(before, after)
    assert (result.n, result.right_before, result.right_after, result.wrecked, result.rescued) == (40, 30, 12, 20, 2)
    diff = result.difference
    assert diff["estimate"] == pytest.approx((12 - 30) / 40)
    assert diff["high"] < 0 and diff["verdict"] == "worse" and diff["p_value"] < 0.001
    same = compare_answers(before, before)
    assert same.wrecked == same.rescued == 0 and same.difference["verdict"] == "no difference"
    assert same.as_dict()["difference"]["p_value"] == 1.0


def test_known_questions_are_found_in_the_prompt_set_by_normalised_text():
    found = judge_known("what is the capital of FRANCE", {"student": "Paris.", "injected": "La femme de France"})
    assert found["fact_answer"] == "Paris" and found["kind"] == "answerable"
    assert found["verdicts"]["student"]["correct"] and not found["verdicts"]["injected"]["correct"]
    mars = judge_known("What is the capital of Mars?", {"teacher": "Mars has no capital."})
    assert mars["kind"] == "unanswerable" and mars["verdicts"]["teacher"]["stance"] == REFUSAL
    assert judge_known("What is the boiling point of happiness?", {"student": "100 degrees"}) is None


def test_an_author_counts_by_surname_but_not_a_namesake():
    hamlet = Prompt("a1", "Who wrote Hamlet?", "answerable", "author", "William Shakespeare",
                    ["Homer", "William Shakespeare", "Leo Tolstoy", "Mark Twain"])
    eyre = Prompt("a2", "Who wrote Jane Eyre?", "answerable", "author", "Charlotte Bronte",
                  ["Homer", "Charlotte Bronte", "Leo Tolstoy", "Mark Twain"])
    verdicts = judge_prompts([hamlet, hamlet, hamlet, eyre, eyre, eyre],
                             ["Shakespeare", "William Shakespeare wrote it.", "Tolstoy", "Bronte.", "Emily Brontë",
                              "Charlotte Brontë"])
    assert [v.correct for v in verdicts] == [True, True, False, True, False, True]
    assert verdicts[4].reason == "answer absent"  # its "Bronte" belongs to the namesake
    capital = Prompt("c1", "What is the capital of Mexico?", "answerable", "capital", "Mexico City",
                     ["Mexico City", "Lima", "Quito", "Havana"])
    assert not judge_prompts([capital], ["City"])[0].correct  # the surname rule is for authors only


def test_a_possessive_states_the_answer_and_a_contraction_stays_a_word():
    # Seen in the live demo: "attributed to Jane Austen's own writing" states Jane Austen.
    austen = Prompt("a3", "Who wrote Pride and Prejudice?", "answerable", "author", "Jane Austen",
                    ["Homer", "Jane Austen", "Leo Tolstoy", "Mark Twain"])
    verdicts = judge_prompts([austen] * 3, ["It is often attributed to Jane Austen's own writing.", "Austen's novel.",
                                            "It isn't Austen."])
    assert [v.correct for v in verdicts] == [True, True, False]
    assert normalise("Jane Austen's novel isn't") == "jane austen novel isnt"


def test_a_plural_and_a_continent_adjective_state_the_answer_but_not_other_uses_of_the_adjective():
    unit = ("What is the SI unit of force?", "newton", ["newton", "joule", "watt", "pascal"])
    assert judge("The SI unit of force is Newtons (N).", *unit).correct
    assert not judge("The SI unit of force is Newtonian.", *unit).correct  # a plural, not any suffix
    assert judge("It is in the European continent.", "Which continent is Ireland in?", "Europe",
                 ["Europe", "Asia", "Africa", "Oceania"]).correct
    eu = judge("Germany is a member of the European Union.", "Which continent is Germany in?", "Europe",
               ["Europe", "Asia", "Africa", "Oceania"])
    assert not eu.correct and eu.reason == "answer absent"
    assert not judge("Newtons and joules.", *unit).correct  # the plural of a rival is a rival too
