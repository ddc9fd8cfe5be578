"""The domains' checkers, partial credit and REINFORCE rewards / advantages (pure functions, no model)."""

from __future__ import annotations

import pytest
import torch

from uzr.adapters.domains import DOMAINS, check, credit, domain_items, reward, stated_result
from uzr.adapters.reinforce import advantages


@pytest.mark.parametrize("prediction, stated", [
    ("15 + 23 = 38", 38), ("38 apples", 38), ("There are 3 x 2 = 6 books, in 2 bags", 6), ("= -4 left", -4),
    ("Mia has 1,234 coins", 1234), ("no number", None), ("", None), ("7\n15 + 23 = 38", 7),  # the first line only
])
def test_arithmetic_reads_the_stated_result(prediction, stated):
    assert stated_result(prediction) == stated


@pytest.mark.parametrize("domain, prediction, answer, right, partial", [
    ("arithmetic", "15 + 23 = 38", "38", True, 1.0),
    ("arithmetic", "Iris has 38 apples, 15 + 23 = 37", "38", False, 0.5),  # worked out, then misstated
    ("arithmetic", "Iris has 15 apples", "38", False, 0.0),
    ("facts", "It was written by Charles Dickens.", "Charles Dickens", True, 1.0),
    ("facts", "Dickens, I think", "Charles Dickens", False, 0.5),
    ("facts", "The capital is Accrax", "Accra", False, 0.0),  # whole words only
    ("causal_loop", "A=1, B=2, C=3", "A=1, B=2, C=3", True, 1.0),
    ("causal_loop", "A = 1, B = 5, C = 4", "A=1, B=2, C=3", False, 1 / 3),
    ("causal_loop", "no idea", "A=1, B=2, C=3", False, 0.0),
])
def test_check_and_partial_credit_agree_and_rewards_follow(domain, prediction, answer, right, partial):
    assert check(domain, prediction, answer) is right
    assert credit(domain, prediction, answer) == pytest.approx(partial)
    assert reward(domain, prediction, answer) == (1.0 if right else -1.0)  # the reference's ±1 stays the default
    assert reward(domain, prediction, answer, "graded") == pytest.approx(2 * partial - 1)
    with pytest.raises(ValueError, match="unknown reward 'soft'; valid: binary, graded"):
        reward(domain, prediction, answer, "soft")


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_reference_answer_gets_full_credit(domain):
    for item in domain_items(domain, "train", 12):
        assert check(domain, item.answer, item.answer) and credit(domain, item.answer, item.answer) == 1.0


def test_prompt_mean_baseline_centres_each_prompts_samples():
    r = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, -1.0])  # two prompts x three samples
    assert torch.equal(advantages(r, 3), r)  # none: the raw reward (the reference)
    centred = advantages(r, 3, "prompt_mean")
    assert torch.allclose(centred, torch.tensor([0.0, 0.0, 0.0, 2 / 3, 2 / 3, -4 / 3]))  # all -1: nothing to learn
    with pytest.raises(ValueError, match="valid: none, prompt_mean"):
        advantages(r, 3, "mean")
