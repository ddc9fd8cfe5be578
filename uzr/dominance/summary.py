"""From per-sample group masses to the dominance section of ``metrics.json``, its tables and figure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uzr.dominance.indices import (
    INDICES,
    STAGES,
    bootstrap_mean,
    consistency,
    fmt_interval,
    indices,
    paired_difference,
)

# Table 1 of arXiv 2508.10552 (MMMU-Pro, generated-token queries), and a public reimplementation's real run
# (92 samples, 4-bit, the prompt's text tokens as queries). "AEI" of the paper is read as AEI_T.
ANCHORS = {
    "llava_1_5_7b": [
        {"source": "paper Table 1 (MMMU-Pro), generated-token queries", "queries": "generated",
         "MDI": {"early": 1.58, "middle": 10.23, "late": 17.37}, "AEI_T": {"early": 1.04, "middle": 3.51, "late": 4.23}},
        {"source": "public reimplementation, real run (92 samples, 4-bit), prompt text tokens as queries",
         "queries": "prompt", "MDI": {"early": 2.19, "middle": 5.72, "late": 4.47}},
    ],
}


@dataclass
class SplitData:
    """One setting on one split: per sample (N) and layer (L)."""

    mass: np.ndarray  # (N, L, 2) summed head-mean mass of the query rows on T and O
    sizes: np.ndarray  # (N, 2) |T|, |O|
    n_queries: np.ndarray  # (N,)
    queries: str  # the query rows used: generated | prompt

    def values(self) -> dict[str, np.ndarray]:
        """{index: (N, L)} (plus A_O)."""
        return indices(self.mass[..., 0], self.mass[..., 1], self.sizes[:, :1], self.sizes[:, 1:])

    def stage_values(self, stages: Mapping[str, list[int]]) -> dict[str, dict[str, np.ndarray]]:
        """{stage: {index: (N,)}}: per sample, the mean of its per-layer values over the stage's layers."""
        values = self.values()
        return {stage: {name: values[name][:, layers].mean(1) for name in INDICES} for stage, layers in stages.items()}


def summarise(data: Mapping[str, Mapping[str, SplitData]], stages: Mapping[str, Mapping[str, list[int]]],
              resamples: int, seed: int) -> dict:
    """The ``settings`` part of the section: per setting, split, layer and stage, each index's
    mean ± std and 95% bootstrap interval over samples."""
    out: dict = {}
    for setting, splits in data.items():
        out[setting] = {}
        for split, sd in splits.items():
            values = sd.values()
            per_stage = sd.stage_values(stages[setting])
            out[setting][split] = {
                "queries": sd.queries,
                "num_samples": int(sd.mass.shape[0]),
                "group_sizes": {"T": float(sd.sizes[:, 0].mean()), "O": float(sd.sizes[:, 1].mean())},
                "mean_queries": float(sd.n_queries.mean()),
                "stage_layers": {k: list(v) for k, v in stages[setting].items()},
                "stages": {stage: {name: bootstrap_mean(per_stage[stage][name], resamples, seed) for name in INDICES}
                           for stage in STAGES},
                "layers": {f"L{layer}": {name: bootstrap_mean(values[name][:, layer], resamples, seed)
                                         for name in INDICES} for layer in range(sd.mass.shape[1])},
            }
    return out


def paired(data: Mapping[str, Mapping[str, SplitData]], stages, a: str, b: str, resamples: int, seed: int) -> dict:
    """``a`` minus ``b`` on the same samples, per split, stage and index (paired bootstrap)."""
    out = {}
    for split in data[a]:
        va, vb = data[a][split].stage_values(stages[a]), data[b][split].stage_values(stages[b])
        out[split] = {stage: {name: paired_difference(va[stage][name], vb[stage][name], resamples, seed)
                              for name in INDICES} for stage in STAGES}
    return out


def consistency_report(data: Mapping[str, Mapping[str, SplitData]], limit: int = 20) -> dict:
    """MDI = AEI_T / AEI_O per sample and layer; rows where it fails are flagged (first ``limit`` listed).
    Rows with no mass on either group are undefined (NaN), counted apart."""
    checked, undefined, flagged = 0, 0, []
    for setting, splits in data.items():
        for split, sd in splits.items():
            values = sd.values()
            ok = consistency(values)
            nan = np.isnan(values["MDI"])
            checked += int(ok.size)
            undefined += int(nan.sum())
            for sample, layer in zip(*np.nonzero(~ok & ~nan)):
                flagged.append({"setting": setting, "split": split, "sample": int(sample), "layer": int(layer),
                                "MDI": float(values["MDI"][sample, layer]),
                                "AEI_T/AEI_O": float(values["AEI_T"][sample, layer] / values["AEI_O"][sample, layer])})
    return {"checked": checked, "violations": len(flagged), "undefined": undefined, "flagged": flagged[:limit],
            "ok": not flagged}


def anchor_comparison(settings: dict, anchor: str | None) -> list[dict]:
    """Published rows beside uzr's values of the same model (the text_image split), stage by stage."""
    if anchor is None:
        return []
    rows = []
    for setting, splits in settings.items():
        ours = splits.get("text_image")
        if ours is None:
            continue
        for ref in ANCHORS[anchor]:
            for name in ("MDI", "AEI_T"):
                for stage in STAGES:
                    if name not in ref:
                        continue
                    stats = ours["stages"][stage][name]
                    lo, hi = stats["ci95"]
                    rows.append({"setting": setting, "reference": ref["source"], "reference_queries": ref["queries"],
                                 "our_queries": ours["queries"], "index": name, "stage": stage,
                                 "published": ref[name][stage], "ours": stats["mean"], "ci95": stats["ci95"],
                                 "inside_interval": None if lo is None else bool(lo <= ref[name][stage] <= hi)})
    return rows


def table_rows(settings: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of the stage table: one row per setting, split and stage (text cells)."""
    header = ["setting", "split", "queries", "stage", "layers", *INDICES]
    rows = []
    for setting, splits in settings.items():
        for split, s in splits.items():
            for stage in STAGES:
                rows.append([setting, split, s["queries"], stage, str(s["stage_layers"][stage]),
                             *(fmt_interval(s["stages"][stage][name]) for name in INDICES)])
    return header, rows


def paired_rows(comparison: dict, label: str) -> tuple[list[str], list[list]]:
    header = ["comparison", "split", "stage", *(f"Δ {n}" for n in INDICES)]
    rows = []
    for split, stages in comparison.items():
        for stage in STAGES:
            cells = []
            for name in INDICES:
                p = stages[stage][name]
                cells.append("—" if p["diff"] is None else
                             f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] {p['verdict']}")
            rows.append([label, split, stage, *cells])
    return header, rows


def figure(path: Path, settings: dict, title: str) -> Path:
    """Per split: MDI and A_T per layer (depth as a fraction, so models of different depth share an axis),
    one line per setting with its 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(split for s in settings.values() for split in s))
    fig, axes = plt.subplots(2, len(splits), figsize=(5.5 * len(splits), 7), squeeze=False)
    for col, split in enumerate(splits):
        for setting, per_split in settings.items():
            if split not in per_split:
                continue
            layers = per_split[split]["layers"]
            depth = np.linspace(0, 1, len(layers))
            for row, name in enumerate(("MDI", "A_T")):
                stats = [layers[f"L{i}"][name] for i in range(len(layers))]
                mean = np.array([np.nan if s["mean"] is None else s["mean"] for s in stats])
                lo = np.array([np.nan if s["ci95"][0] is None else s["ci95"][0] for s in stats])
                hi = np.array([np.nan if s["ci95"][1] is None else s["ci95"][1] for s in stats])
                ax = axes[row, col]
                ax.plot(depth, mean, marker=".", label=f"{setting} ({len(layers)} layers)")
                ax.fill_between(depth, lo, hi, alpha=0.2)
                ax.set_ylabel(name)
                ax.set_xlabel("layer / (layers - 1)")
        axes[0, col].set_title(f"{split} ({next(iter(settings.values()))[split]['queries']} queries)")
        axes[0, col].axhline(1.0, color="grey", lw=0.8, ls="--")  # MDI = 1: no per-token preference
        axes[0, col].set_yscale("log")
        axes[0, col].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
