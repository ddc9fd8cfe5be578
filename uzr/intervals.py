"""Paired confidence intervals: is the difference between two settings on the same items more than noise?

Two settings scored on the same texts or prompts are compared item by item (the student with and
without injection on the same 24 texts; two alphas on the same 93 prompts). Resampling the *items*
(the paired bootstrap) keeps what the settings share — which texts are hard — out of the interval, so
it is far narrower than two separate intervals would suggest.

- Bits per byte is a ratio of sums (nats over bytes), so each bootstrap replicate recomputes the ratio
  of both settings on the same resampled texts and takes their difference.
- Accuracy differences come with the paired bootstrap interval and McNemar's exact test on the
  discordant prompts (right in one setting, wrong in the other).

A difference whose interval contains 0 is reported as *no difference*, never as better or worse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` on the same items, with a ``level`` confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    n: int  # items (texts or prompts) both settings were scored on
    level: float = LEVEL
    method: str = "paired bootstrap"
    p_value: float | None = None  # McNemar's exact test, for accuracies

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return not self.low <= 0.0 <= self.high

    def verdict(self, higher_is_better: bool) -> str:
        """``better`` / ``worse`` for ``a`` against ``b`` when the interval excludes 0, else ``no difference``."""
        if not self.significant:
            return "no difference"
        return "better" if (self.estimate > 0) == higher_is_better else "worse"

    def describe(self, digits: int = 4) -> str:
        """``+0.0117 [+0.0051, +0.0183]`` — the estimate and its interval."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) item indices drawn with replacement: the same draws for every statistic of one call."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _percentiles(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def _check_paired(name: str, *columns: Sequence) -> int:
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"{name}: paired items must line up, got lengths {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise ValueError(f"{name}: no items to compare")
    return n


def bits_per_byte_difference(nll_a: Sequence[float], nll_b: Sequence[float], nbytes: Sequence[float],
                             level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> PairedDifference:
    """Bits per byte of setting ``a`` minus setting ``b`` on the same texts, with a paired bootstrap interval.

    Args:
        nll_a, nll_b: (n,) summed next-token loss of each text in nats under each setting.
        nbytes: (n,) predicted UTF-8 bytes of each text (the same for both settings).
    """
    n = _check_paired("bits_per_byte_difference", nll_a, nll_b, nbytes)
    a, b, d = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, nbytes))
    estimate = (a.sum() - b.sum()) / d.sum() / math.log(2)
    idx = _resamples(n, samples, seed)  # (samples, n)
    replicates = (a[idx].sum(1) - b[idx].sum(1)) / d[idx].sum(1) / math.log(2)  # (samples,)
    low, high = _percentiles(replicates, level)
    return PairedDifference(float(estimate), low, high, n, level)


def mean_difference(values_a: Sequence[float], values_b: Sequence[float], level: float = LEVEL,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> PairedDifference:
    """Mean of ``a`` minus mean of ``b`` on the same items (e.g. partial credit), with a paired bootstrap interval."""
    n = _check_paired("mean_difference", values_a, values_b)
    diff = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)  # (n,)
    low, high = _percentiles(diff[_resamples(n, samples, seed)].mean(1), level)
    return PairedDifference(float(diff.mean()), low, high, n, level)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a right and b wrong; the reverse)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def accuracy_difference(correct_a: Sequence[bool], correct_b: Sequence[bool], level: float = LEVEL,
                        samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> PairedDifference:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same prompts: paired bootstrap interval and McNemar p.

    Args:
        correct_a, correct_b: (n,) whether each prompt was answered right under each setting.
    """
    n = _check_paired("accuracy_difference", correct_a, correct_b)
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    diff = a.astype(np.float64) - b.astype(np.float64)  # (n,) in {-1, 0, 1}
    replicates = diff[_resamples(n, samples, seed)].mean(1)  # (samples,)
    low, high = _percentiles(replicates, level)
    p = mcnemar_p(int((a & ~b).sum()), int((~a & b).sum()))
    return PairedDifference(float(diff.mean()), low, high, n, level, "paired bootstrap + McNemar exact", p)
