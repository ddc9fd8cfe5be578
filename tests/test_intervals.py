"""Paired intervals: exact on known data, and covering the true difference at the nominal rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uzr.intervals import PairedDifference, accuracy_difference, bits_per_byte_difference, mcnemar_p


def test_bits_per_byte_difference_estimate_is_the_difference_of_ratios():
    nll_a, nll_b, nbytes = [10.0, 20.0, 30.0], [12.0, 18.0, 33.0], [8, 16, 24]
    diff = bits_per_byte_difference(nll_a, nll_b, nbytes)
    expected = (60.0 - 63.0) / 48 / math.log(2)
    assert diff.estimate == pytest.approx(expected, rel=1e-12)
    assert diff.low <= diff.estimate <= diff.high and diff.n == 3


def test_identical_settings_give_a_zero_width_interval_and_no_difference():
    nll = [5.0, 7.0, 9.0, 11.0]
    diff = bits_per_byte_difference(nll, nll, [4, 4, 4, 4])
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.verdict(higher_is_better=False) == "no difference"


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # all five discordant prompts one way
    assert mcnemar_p(3, 3) == 1.0
    # 10 vs 2: two-sided exact binomial = 2 * P(X <= 2 | n=12, p=1/2)
    assert mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_accuracy_difference_counts_and_verdicts():
    a = [True] * 60 + [False] * 40
    b = [True] * 30 + [False] * 70  # every prompt b gets right, a gets right too
    diff = accuracy_difference(a, b)
    assert diff.estimate == pytest.approx(0.30)
    assert diff.p_value == pytest.approx(mcnemar_p(30, 0))
    assert diff.significant and diff.verdict(higher_is_better=True) == "better"
    assert diff.verdict(higher_is_better=False) == "worse"
    one_apart = accuracy_difference([True] + [False] * 92, [False] * 93)  # one prompt of 93 is noise
    assert one_apart.verdict(higher_is_better=True) == "no difference"


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="paired items must line up"):
        bits_per_byte_difference([1.0, 2.0], [1.0], [3, 4])
    with pytest.raises(ValueError, match="no items"):
        accuracy_difference([], [])


def _coverage(simulate, truth, trials=300):
    hits = 0
    for trial in range(trials):
        diff: PairedDifference = simulate(np.random.default_rng(1000 + trial), trial)
        hits += diff.low <= truth <= diff.high
    return hits / trials


def test_bits_per_byte_interval_covers_the_true_difference_at_the_nominal_rate():
    """Texts of varying length and difficulty; setting a costs 0.05 bits per byte more on average."""
    n, delta = 60, 0.05

    def simulate(rng, trial):
        nbytes = rng.integers(200, 2000, n).astype(float)
        base = rng.gamma(8.0, 0.15, n)  # bits per byte of each text under b
        a_bpb = base + delta + rng.normal(0, 0.08, n)
        nll_a, nll_b = a_bpb * nbytes * math.log(2), base * nbytes * math.log(2)
        return bits_per_byte_difference(nll_a, nll_b, nbytes, samples=600, seed=trial)

    # the truth is the population ratio difference: E[(a - b) * bytes] / E[bytes] = delta
    assert 0.91 <= _coverage(simulate, delta) <= 0.99


def test_accuracy_interval_covers_the_true_difference_at_the_nominal_rate():
    n, p_b, flip_up, flip_down = 200, 0.7, 0.10, 0.04  # a gets 10% of b's misses right and 4% of its hits wrong

    def simulate(rng, trial):
        b = rng.random(n) < p_b
        a = np.where(b, rng.random(n) >= flip_down, rng.random(n) < flip_up)
        return accuracy_difference(a, b, samples=600, seed=trial)

    truth = (1 - p_b) * flip_up - p_b * flip_down
    assert 0.91 <= _coverage(simulate, truth) <= 0.99
