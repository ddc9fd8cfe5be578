"""The cross-entropy method (CEM) as in Transformer²'s few-shot adaptation, seeded and deterministic.

Matches the reference's ``optim_modules.CEM``: the search starts from a given solution (the mean) with a
standard deviation of half the allowed range; each iteration draws ``population`` candidates from
``N(mean, std)``, clamps them to ``[low, high]``, puts the best solution so far in slot 0 (``re_eval_best``),
scores every candidate, keeps the best ``int(elite_ratio · population)`` as elites and sets mean and std to
the elites' mean and (unbiased) standard deviation. The best candidate of the last scored generation is the
answer (slot 0 makes it never worse than an earlier best). Reference settings: population 32, elite ratio
0.2, 50 iterations, range [0, 1].

Ties are broken by the candidate's index (a stable sort), and every draw comes from one
``numpy.random.Generator(seed)``, so the same objective and seed give the same answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CEMResult:
    best: np.ndarray  # (dim,) the best candidate found
    score: float  # its objective value
    mean: np.ndarray  # (dim,) the final search distribution
    std: np.ndarray
    history: list[float] = field(default_factory=list)  # best score after each iteration
    evaluations: int = 0


def cem(objective: Callable[[np.ndarray], float], init: np.ndarray, population: int = 32, elite_ratio: float = 0.2,
        iterations: int = 50, low: float = 0.0, high: float = 1.0, seed: int = 0) -> CEMResult:
    """Maximise ``objective(candidate (dim,)) -> float`` from ``init`` (dim,) (the reference's initial solution)."""
    elites = int(elite_ratio * population)
    if population < 2 or not 2 <= elites <= population:
        raise ValueError(f"cem: population={population} x elite_ratio={elite_ratio} gives {elites} elites; "
                         "need at least 2 (population >= 2, elite_ratio in (0, 1])")
    if iterations < 1 or not low < high:
        raise ValueError(f"cem: iterations={iterations} must be >= 1 and low={low} < high={high}")
    rng = np.random.default_rng(seed)
    mean = np.clip(np.asarray(init, np.float64), low, high)
    std = np.full_like(mean, (high - low) / 2)
    best, best_score = mean.copy(), -np.inf
    history, evaluations = [], 0
    for _ in range(iterations):
        pop = np.clip(rng.standard_normal((population, mean.size)) * std + mean, low, high)
        pop[0] = best  # re-evaluate the best so far (the reference's re_eval_best)
        scores = np.array([float(objective(c)) for c in pop])
        evaluations += population
        order = np.argsort(-scores, kind="stable")
        best, best_score = pop[order[0]].copy(), float(scores[order[0]])
        elite = pop[order[:elites]]
        mean, std = elite.mean(0), elite.std(0, ddof=1)
        history.append(best_score)
    return CEMResult(best, best_score, mean, std, history, evaluations)
