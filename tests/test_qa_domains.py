"""Checkable QA domains of the evaluate stage (``evaluate.qa_domains``): items, candidates, config validation."""

from __future__ import annotations

import re

import pytest

from tests.conftest import resolved
from uzr.evaluate.qa import causal_loop_prompts
from uzr.tasks.causal_loop import parse_assignments, score_answer


def test_causal_loop_items_have_one_right_and_three_one_variable_wrong_candidates():
    prompts = causal_loop_prompts(40, seed=3)
    assert {p.category for p in prompts} == {"level_1", "level_2", "level_3", "level_4"}
    for p in prompts:
        assert len(set(p.candidates)) == 4 and p.candidates[p.correct_index()] == p.answer
        assert [score_answer(c, p.answer)[0] for c in p.candidates].count(True) == 1
        want = parse_assignments(p.answer)
        modulus = re.search(r"modulo (\d+)", p.question)
        for c in p.candidates:
            got = parse_assignments(c)
            assert set(got) == set(want) and sum(got[k] != want[k] for k in want) == (c != p.answer)
            if modulus:
                assert all(0 <= v < int(modulus[1]) for v in got.values())
    assert causal_loop_prompts(40, seed=3) == prompts and causal_loop_prompts(40, seed=4) != prompts
    # the right answer's position is shuffled, not fixed
    assert len({p.correct_index() for p in prompts}) == 4


@pytest.mark.parametrize("override, match", [
    ("evaluate.qa_domains=[causal_loop,trivia]", r"evaluate.qa_domains=\['causal_loop', 'trivia'\] is invalid "
                                                 r"\(unknown: \['trivia'\]\); valid: distinct names from causal_loop"),
    ("evaluate.qa_domains=[causal_loop,causal_loop]", r"evaluate.qa_domains=.*valid: distinct names"),
    ("evaluate.qa_domain_items=0", r"evaluate.qa_domain_items=0 is invalid; valid: an integer >= 1"),
])
def test_bad_qa_domain_config_fails_before_models_load(override, match):
    with pytest.raises(ValueError, match=match):
        resolved("+experiment=smoke", override)


def test_qa_domains_default_to_none():
    assert resolved("+experiment=default").evaluate.qa_domains == []
