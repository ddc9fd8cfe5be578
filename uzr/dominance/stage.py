"""The dominance stage: MDI, AEI_T, AEI_O and A_T per layer and stage for each measured model.

Not cached (it measures in every run, so a sweep over queries x stages x alpha measures each point).
Measured settings: ``dominance.models`` — ``teacher``, ``student``, and ``injected`` (the student with the
controller injected at the run's inject/alpha settings; the controller, and the harvest it needs, come
from the cache or are built). Every setting answers the same samples; the injected student is compared
with the student by a paired bootstrap over samples.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from uzr.attention import attention_modules
from uzr.config.dominance import VISION_SOURCES, injects, splits_of
from uzr.dominance.groups import require_groups
from uzr.dominance.indices import stage_layers
from uzr.dominance.measure import run_sample
from uzr.dominance.samples import SPLITS, Prepared, text_sample, vision_sample
from uzr.dominance.sources import load_processor, text_items, vision_items
from uzr.dominance.summary import (
    SplitData,
    anchor_comparison,
    consistency_report,
    figure,
    paired,
    paired_rows,
    summarise,
    table_rows,
)
from uzr.evaluate.injection import run_injection
from uzr.models import model_device
from uzr.stages import UncachedStage

if TYPE_CHECKING:
    from uzr.injection.setup import Injection

log = logging.getLogger(__name__)


def query_mode(split: str, queries: str) -> str:
    """The rows actually used as queries: ``prompt`` only where the split defines prompt queries."""
    return queries if SPLITS[split].prompt_queries is not None else "generated"


def split_data(labels: np.ndarray, groups: tuple[str, ...], row_mass: np.ndarray, n_prompt: int, split: str,
               queries: str, where: str) -> tuple[np.ndarray, list[int], int]:
    """(L, 2) summed mass of the split's query rows on T and O, [|T|, |O|], number of query rows."""
    s = SPLITS[split]
    index = {name: i for i, name in enumerate(groups)}
    in_t, in_o = np.isin(labels, [index[g] for g in s.t]), np.isin(labels, [index[g] for g in s.o])
    names = ("+".join(s.t), "+".join(s.o))
    require_groups(np.where(in_t, 0, np.where(in_o, 1, -1)), names, where)
    if query_mode(split, queries) == "prompt":
        rows = np.isin(labels, [index[g] for g in s.prompt_queries]) & (np.arange(len(labels)) < n_prompt)
        qname = "+".join(s.prompt_queries)
    else:
        rows, qname = labels == index["answer"], "answer"
    if not rows.any():
        raise ValueError(f"dominance: no query rows ({qname} tokens) in {where}; the split '{split}' needs them")
    mass = row_mass[:, rows]  # (L, q, G)
    t = mass[..., [index[g] for g in s.t]].sum((1, 2))
    o = mass[..., [index[g] for g in s.o]].sum((1, 2))
    return np.stack([t, o], -1), [int(in_t.sum()), int(in_o.sum())], int(rows.sum())


class DominanceStage(UncachedStage):
    def report(self, run, artifact) -> dict:
        cfg, d = run.cfg, run.cfg.dominance
        injection = None
        if injects(d):
            injection = run_injection(run)  # controllers and sinks (inject.sinks=keep), as the evaluate stage
        items = vision_items(d) if d.source in VISION_SOURCES else text_items(cfg)
        data, stages, answers = {}, {}, {}
        for setting in d.models:
            data[setting], stages[setting], answers[setting] = measure_setting(run, setting, items, injection)
        settings = summarise(data, stages, d.bootstrap, d.seed)
        section = {"source": d.source, "queries": d.queries, "num_samples": len(items), "settings": settings,
                   "consistency": consistency_report(data)}
        if "injected" in data and "student" in data:
            section["paired"] = {"injected_vs_student": paired(data, stages, "injected", "student", d.bootstrap, d.seed)}
        anchor = anchor_comparison(settings, d.anchor)
        if anchor:
            section["anchor"] = anchor
        section["sweep_row"] = sweep_row(section)
        _write_samples(run.out_dir / "dominance_samples.jsonl", data, answers)
        run.tables["dominance"] = table_rows(settings)
        if "paired" in section:
            run.tables["dominance_paired"] = paired_rows(section["paired"]["injected_vs_student"], "injected − student")
        if d.figure:
            names = ", ".join(f"{s}={getattr(cfg, 'student' if s == 'injected' else s).name}" for s in d.models)
            run.images["dominance"] = figure(run.out_dir / "figures" / "dominance_layers.png", settings,
                                             f"attention dominance per layer ({names}; bands: 95% bootstrap)")
        return section

    def present(self, run, section: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 170))
        for key, title in (("dominance", "attention dominance: mean ± std [95% bootstrap interval] over samples"),
                           ("dominance_paired", "paired: injected − student, 95% bootstrap interval")):
            if key not in run.tables:
                continue
            header, rows = run.tables[key]
            table = Table(title=title)
            for column in header:
                table.add_column(column)
            for row in rows:
                table.add_row(*row)
            console.print(table)
        for row in section.get("anchor", []):
            console.print(f"• {row['index']} {row['stage']}: published {row['published']} ({row['reference']}) vs "
                          f"{row['setting']} {row['ours']:.3f} {row['ci95']} ({row['our_queries']} queries); "
                          f"{'inside' if row['inside_interval'] else 'outside'} the interval")
        c = section["consistency"]
        console.print(f"• consistency MDI = AEI_T / AEI_O: {c['checked']} (sample, layer) rows, {c['violations']} "
                      f"violated{' — FLAGGED: ' + json.dumps(c['flagged'][:3]) if c['violations'] else ''}, "
                      f"{c['undefined']} undefined (no mass on either group)")


def measure_setting(run, setting: str, items: list, injection: Injection | None = None) -> tuple[dict, dict, list[str]]:
    """One setting over every sample: ({split: SplitData}, {stage: layers}, answers). ``injection``: the injected
    setting's (:func:`uzr.injection.setup.run_injection`); each answer gets a fresh injector."""
    cfg, d = run.cfg, run.cfg.dominance
    role = "student" if setting == "injected" else setting
    model, tok = run.models.get(role)
    stages = stage_layers(len(attention_modules(model)), d.stage_width,
                          {"early": d.early, "middle": d.middle, "late": d.late})
    splits = splits_of(d)
    need_answer = d.queries == "generated" or any(SPLITS[s].prompt_queries is None for s in splits)
    make_edit = (lambda prompt_len: injection.injector(prompt_len=prompt_len)) if setting == "injected" else None
    prepare = _preparer(model, tok, getattr(cfg, role), d.source in VISION_SOURCES)
    rows: dict[str, list] = {s: [] for s in splits}
    answers = []
    for k, item in enumerate(tqdm(items, desc=f"dominance: {setting}", unit="sample", leave=False)):
        prepared: Prepared = prepare(item)
        rec = run_sample(model, prepared.inputs, prepared.label_fn, len(prepared.groups),
                         max_new_tokens=d.max_new_tokens if need_answer else 0, block_size=cfg.harvest.block_size,
                         pad_id=tok.pad_token_id, make_edit=make_edit)
        labels = prepared.label_fn(rec.answer_ids)
        answers.append(tok.decode(rec.answer_ids, skip_special_tokens=True))
        for split in splits:
            rows[split].append(split_data(labels, prepared.groups, rec.row_mass, rec.n_prompt, split, d.queries,
                                          f"sample {k} of {setting}"))
    data = {split: SplitData(np.stack([r[0] for r in rs]), np.array([r[1] for r in rs], np.float64),
                             np.array([r[2] for r in rs]), query_mode(split, d.queries)) for split, rs in rows.items()}
    return data, stages, answers


def sweep_row(section: dict) -> dict[str, float]:
    """Flat ``setting/split/stage/index -> mean`` for the sweep report (``python -m uzr.report``)."""
    row = {}
    for setting, splits in section["settings"].items():
        for split, s in splits.items():
            for stage, values in s["stages"].items():
                for name, stats in values.items():
                    row[f"{setting}/{split}/{stage}/{name}"] = stats["mean"]
    for split, stages in section.get("paired", {}).get("injected_vs_student", {}).items():
        for stage, values in stages.items():
            row[f"injected-student/{split}/{stage}/MDI"] = values["MDI"]["diff"]
    return row


def _preparer(model, tok, spec, vision: bool):
    device = model_device(model)
    if not vision:
        return lambda item: text_sample(tok, item[0], item[1], device)
    processor = load_processor(spec, tok)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return lambda item: vision_sample(processor, model.config, item[0], item[1], device, dtype)


def _write_samples(path: Path, data: dict, answers: dict) -> None:
    """Per sample, setting and split: group sizes, query count, answer and per-layer A_T and MDI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for setting, splits in data.items():
            for split, sd in splits.items():
                values = sd.values()
                for k in range(sd.mass.shape[0]):
                    handle.write(json.dumps({
                        "setting": setting, "split": split, "sample": k, "queries": sd.queries,
                        "T": int(sd.sizes[k, 0]), "O": int(sd.sizes[k, 1]), "num_queries": int(sd.n_queries[k]),
                        "answer": answers[setting][k],
                        "A_T": [round(float(v), 6) for v in values["A_T"][k]],
                        "MDI": [round(float(v), 6) for v in values["MDI"][k]]}) + "\n")
