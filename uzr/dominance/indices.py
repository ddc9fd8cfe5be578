"""The dominance indices and their statistics (numpy only).

For one sample, one layer, a set of query rows and two key groups T and O (heads averaged):

- ``m_T``, ``m_O``: attention mass of the query rows on the keys of each group, summed over the rows;
- ``A_T = m_T / (m_T + m_O)``, ``A_O = 1 - A_T`` (renormalised: mass on keys in neither group, such as
  BOS or chat markers, is left out);
- ``MDI = (A_T / |T|) / (A_O / |O|)`` (per-token mass ratio; ``|T|``, ``|O|``: tokens in each group);
- ``AEI_T = A_T / (|T| / (|T| + |O|))``, ``AEI_O = A_O / (|O| / (|T| + |O|))`` (mass share over token
  share), so ``MDI = AEI_T / AEI_O`` exactly; :func:`consistency` checks it per sample and layer.

A stage (early / middle / late) is a set of layers; a sample's stage value is the mean of its per-layer
values over those layers. A dataset value is the mean over samples with its standard deviation and a
95% percentile-bootstrap interval of the mean; two settings on the same samples are compared with a
paired bootstrap of the per-sample differences (an interval holding 0 reads "no difference").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

INDICES = ("MDI", "AEI_T", "AEI_O", "A_T")
STAGES = ("early", "middle", "late")
REL_TOL = 1e-6  # MDI vs AEI_T / AEI_O, relative


def indices(mass_t, mass_o, n_t, n_o) -> dict[str, np.ndarray]:
    """MDI, AEI_T, AEI_O, A_T (and A_O) from group masses and group sizes; arrays broadcast.

    ``A_O = 0`` gives MDI = inf (all mass on T); no mass on either group gives NaN.
    """
    mass_t, mass_o = np.asarray(mass_t, np.float64), np.asarray(mass_o, np.float64)
    n_t, n_o = np.asarray(n_t, np.float64), np.asarray(n_o, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = mass_t + mass_o
        a_t = mass_t / total
        a_o = mass_o / total
        share_t, share_o = n_t / (n_t + n_o), n_o / (n_t + n_o)
        mdi = (a_t / n_t) / (a_o / n_o)
        return {"MDI": mdi, "AEI_T": a_t / share_t, "AEI_O": a_o / share_o, "A_T": a_t, "A_O": a_o}


def consistency(values: Mapping[str, np.ndarray], rel_tol: float = REL_TOL) -> np.ndarray:
    """Bool array, True where ``MDI = AEI_T / AEI_O`` holds within ``rel_tol`` (both infinite counts as
    holding; NaN never does)."""
    mdi = np.asarray(values["MDI"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(values["AEI_T"], np.float64) / np.asarray(values["AEI_O"], np.float64)
        close = np.abs(mdi - ratio) <= rel_tol * np.maximum(1.0, np.abs(mdi))
    return close | (np.isinf(mdi) & np.isinf(ratio))


def stage_layers(num_layers: int, width: int = 2, explicit: Mapping[str, Sequence[int] | None] | None = None
                 ) -> dict[str, list[int]]:
    """Layers of each stage: ``explicit[stage]`` (negative indices count from the end) or, when absent,
    the first ``width`` layers, the middle ``width`` (starting at ``(L - width) // 2``) and the last ``width``."""
    defaults = {"early": list(range(width)),
                "middle": list(range((num_layers - width) // 2, (num_layers - width) // 2 + width)),
                "late": list(range(num_layers - width, num_layers))}
    out = {}
    for stage in STAGES:
        chosen = (explicit or {}).get(stage)
        layers = defaults[stage] if chosen is None else [i % num_layers if i < 0 else i for i in chosen]
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers:
            raise ValueError(f"dominance.{stage}={chosen}: layers {bad} outside 0..{num_layers - 1} (or empty)")
        out[stage] = sorted(set(layers))
    return out


def bootstrap_mean(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean, standard deviation and a percentile-bootstrap interval of the mean over finite values.

    Non-finite values (a sample with no mass on a group) are counted in ``dropped`` and left out.
    """
    x = np.asarray(values, np.float64).ravel()
    finite = x[np.isfinite(x)]
    out = {"n": int(finite.size), "dropped": int(x.size - finite.size)}
    if finite.size == 0:
        return {**out, "mean": None, "std": None, "ci95": [None, None]}
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, finite.size, size=(resamples, finite.size))].mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {**out, "mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "ci95": [float(lo), float(hi)]}


def paired_difference(a, b, resamples: int = 2000, seed: int = 0) -> dict:
    """``a - b`` per sample (same samples in the same order), bootstrapped; ``verdict`` is "no difference"
    when the 95% interval holds 0, else "higher" / "lower" (of ``a`` relative to ``b``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same samples: {a.shape} vs {b.shape}")
    stats = bootstrap_mean(a - b, resamples, seed)
    lo, hi = stats["ci95"]
    if lo is None:
        verdict = "not measurable"
    elif lo <= 0 <= hi:
        verdict = "no difference"
    else:
        verdict = "higher" if lo > 0 else "lower"
    return {"diff": stats["mean"], "ci95": stats["ci95"], "n": stats["n"], "verdict": verdict}


def fmt_interval(stats: Mapping) -> str:
    """``1.234 ± 0.5 [1.1, 1.4]`` (mean ± std [95% bootstrap interval])."""
    if stats.get("mean") is None:
        return "—"
    lo, hi = stats["ci95"]
    return f"{_num(stats['mean'])} ± {_num(stats['std'])} [{_num(lo)}, {_num(hi)}]"


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}"
