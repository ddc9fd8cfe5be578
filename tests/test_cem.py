"""The cross-entropy method: finds a known optimum, is deterministic for a seed, keeps the best."""

from __future__ import annotations

import numpy as np
import pytest

from uzr.adapters.cem import cem

TARGET = np.array([[0.9, 0.1, 0.6], [0.2, 0.75, 0.3]])  # a (experts, layers) mixing optimum inside [0, 1]


def mixing_objective(a: np.ndarray) -> float:
    """A synthetic mixing objective: negative squared distance of the per-layer coefficients to TARGET."""
    return -float(((a.reshape(TARGET.shape) - TARGET) ** 2).sum())


def test_finds_the_known_optimum_with_reference_settings():
    res = cem(mixing_objective, np.full(TARGET.size, 0.5), population=32, elite_ratio=0.2, iterations=50, seed=0)
    # The reference's elite std collapses within ~20 iterations, so CEM lands near, not on, the optimum
    # (seed 0: 0.033; over seeds 0-19 the worst was 0.12); a uniform random search of the same 1600 draws
    # lands within 0.05 of all six coordinates with probability ~1600 * 0.1**6 = 0.0016.
    assert np.abs(res.best.reshape(TARGET.shape) - TARGET).max() < 0.05
    assert res.score > -0.005 and res.evaluations == 32 * 50
    assert all(b >= a for a, b in zip(res.history, res.history[1:]))  # the best is re-evaluated: never lost


def test_optimum_on_the_boundary_is_reached_by_clamping():
    target = np.array([0.0, 1.0, 1.0, 0.0])
    res = cem(lambda a: -float(np.abs(a - target).sum()), np.full(4, 0.5), iterations=30, seed=3)
    assert np.allclose(res.best, target, atol=1e-6)


def test_same_seed_same_answer_and_another_seed_another_path():
    a = cem(mixing_objective, np.full(TARGET.size, 0.5), iterations=5, seed=7)
    b = cem(mixing_objective, np.full(TARGET.size, 0.5), iterations=5, seed=7)
    c = cem(mixing_objective, np.full(TARGET.size, 0.5), iterations=5, seed=8)
    assert np.array_equal(a.best, b.best) and a.history == b.history
    assert not np.array_equal(a.best, c.best)


def test_first_generation_scores_the_initial_solution():
    seen = []
    cem(lambda a: seen.append(a.copy()) or 0.0, np.array([0.25, 0.75]), population=8, elite_ratio=0.25, iterations=1)
    assert np.array_equal(seen[0], [0.25, 0.75]) and len(seen) == 8


@pytest.mark.parametrize("kwargs", [{"population": 4, "elite_ratio": 0.2}, {"iterations": 0}, {"low": 1.0, "high": 0.0}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError, match="cem"):
        cem(mixing_objective, np.zeros(6), **kwargs)
