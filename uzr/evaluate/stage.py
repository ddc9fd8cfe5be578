"""The evaluate stage: the student with and without injection on held-out text and facts QA, beside the teacher.

With ``evaluate.oracle`` the teacher oracle (``inject.source=teacher``, the same injection otherwise) is scored beside
the run's source on the same texts, through the same settings path, so every run shows the ceiling of what it injects.

Not cached: it runs in every run (an alpha sweep evaluates each alpha) and writes its section of
``metrics.json`` and the heatmap figure into the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from uzr.config import RunConfig
from uzr.config.controller import per_head_targets
from uzr.config.corpus import domain_spec
from uzr.config.inject import AUTO, emphasis_alone, source_label
from uzr.controller.stage import ControllerStage
from uzr.evaluate.domains import domain_metrics, domain_store
from uzr.evaluate.heads import head_profile_section, run_profile
from uzr.evaluate.injection import emphasis_injection, matched_heads, run_injection
from uzr.evaluate.passes import heatmap_figure, student_pass
from uzr.evaluate.positions import position_metrics
from uzr.evaluate.qa import QAInjection, domain_qa, facts_qa
from uzr.evaluate.sources import controller_rows, text_prior
from uzr.evaluate.texts import PLAIN, heldout_rows, injection_key, injection_setting, score_settings
from uzr.harvest.stage import HarvestStage
from uzr.injection.injector import Injector
from uzr.injection.priors import LIVE_SOURCES, live_prior
from uzr.injection.qa_edits import qa_edit_for
from uzr.stages import UncachedStage

ORACLE = "oracle"  # the setting of the teacher oracle scored beside the run's source (evaluate.oracle)


class EvaluateStage(UncachedStage):
    def report(self, run, artifact) -> dict:
        cfg = run.cfg
        if cfg.inject.source == "emphasis" or cfg.inject.teacher_head is not None:
            return qa_only_metrics(run)
        store, controllers = run.upstream(HarvestStage), run.upstream(ControllerStage).controllers
        student, student_tok = run.models.get("student")
        teacher, teacher_tok = run.models.get("teacher")
        same_vocab = teacher_tok.get_vocab() == student_tok.get_vocab()  # next-token KL needs one vocabulary
        layers = list(cfg.inject.layers)
        source = cfg.inject.source
        heads_of = matched_heads(cfg, store.layout)
        injection = run_injection(run)
        sinks = injection.sinks

        # the injected settings: the run's source, and the teacher oracle beside it (evaluate.oracle) on one path
        sources = {"injected": source, **({ORACLE: "teacher"} if oracle_beside(cfg) else {})}
        oracle = ORACLE if ORACLE in sources else None

        def texts(rows: list[dict], desc: str):
            injected = [injection_setting(name, injection, text_prior(s, controllers, rows, cfg.device, heads_of),
                                          source_name=s) for name, s in sources.items()]
            return score_settings(student, student_tok, rows, [PLAIN, *injected], layers, cfg.harvest.locality_window,
                                  cfg.harvest.max_length, teacher if same_vocab else None, run.memo, desc,
                                  stored=run.stored)

        rows = heldout_rows(store, cfg.evaluate.num_texts)
        scores = texts(rows, "evaluate")
        names = {"student": PLAIN.name, **{name: name for name in sources}}
        own = domain_metrics(scores, PLAIN.name, "injected", cfg.data.long_text if cfg.data else "?", oracle)
        metrics = {
            "source": source,
            **({"oracle": oracle_description(cfg)} if oracle else {}),
            # which head matching chose the per-head targets (harvest.head_matching; its map: metrics.harvest)
            **({"head_matching": cfg.harvest.head_matching} if heads_of is not None else {}),
            "bits_per_byte": own["bits_per_byte"],
            "habit_distance": {f"L{layer}": {k: scores.habit_distance(v, [layer])[f"L{layer}"] for k, v in names.items()}
                               for layer in layers},
            "num_texts": len(rows),
            "sinks": {"mode": cfg.inject.sinks, **({f"L{layer}": sinks[layer].as_dict(student_tok) for layer in sinks}
                                                   if sinks else {})},
            # bits per byte per text domain: the run's own data first, then evaluate.domains
            "domains": {cfg.data.name if cfg.data else "data": own},
        }
        metrics.update(heads_metrics(run, injection))
        for name in cfg.evaluate.domains:
            domain, key = domain_store(run, name)
            metrics["domains"][name] = {
                **domain_metrics(texts(heldout_rows(domain, cfg.evaluate.num_texts), f"evaluate {name}"), PLAIN.name,
                                 "injected", domain_spec(name).long_text, oracle), "harvest_key": key}
        if same_vocab:
            metrics["next_token_kl"] = {k: float(np.mean(scores.settings[v].next_token_kl)) for k, v in names.items()}

        # the oracle reads each prompt's text live; shuffled needs another text's stored rows, which prompts lack
        def edit_for(name: str):
            return qa_edit_for(run, injection, name, controllers, store.layout, heads_of)

        injected_edit = edit_for(source)
        metrics.update(qa_metrics(run, injection, injected_edit,
                                  edit_for("teacher") if oracle and cfg.evaluate.oracle_qa else None))
        if cfg.evaluate.position_buckets:  # long texts have no stored rows either: edited as prompts are
            metrics["position_buckets"] = position_metrics(
                run, None if injected_edit is None else lambda: injected_edit([]),
                f"inject.source={source} needs a text's stored rows; the long texts have none")
        if cfg.evaluate.figure and rows and source in LIVE_SOURCES:
            def make_injector() -> Injector:
                return injection.injector(prompt_len=0, source=live_prior(source, controllers, heads_of is not None))

            run.images["heatmaps"] = figure(run.out_dir / "figures", rows[0], controllers, student, layers[0], cfg,
                                            make_injector)
        return metrics


def qa_only_metrics(run) -> dict:
    """QA only, for the sources held-out texts cannot show. ``inject.source=emphasis`` steers toward a prompt's marked
    spans; held-out texts mark none, so it would leave them exactly as they are. It needs no controller or harvest
    store unless ``inject.sinks=keep`` or a per-head profile of another source asks for them
    (:func:`uzr.config.inject.emphasis_alone`). ``inject.teacher_head``: the oracle from one teacher head, which the
    texts' stored rows (head means or matched heads) do not hold."""
    cfg = run.cfg
    if cfg.inject.source == "emphasis":
        injection = emphasis_injection(run) if emphasis_alone(cfg.inject) else run_injection(run)
        edit_for = qa_edit_for(run, injection, "emphasis", {}, None, None)
        texts = "not scored: held-out texts mark no span, so emphasis leaves them as they are"
    else:
        store, injection = run.upstream(HarvestStage), run_injection(run)
        edit_for = qa_edit_for(run, injection, "teacher", {}, store.layout, matched_heads(cfg, store.layout))
        texts = "not scored: their stored oracle rows are head means or matched heads, not inject.teacher_head"
    return {"source": source_label(cfg.inject), "texts": texts, **heads_metrics(run, injection),
            **qa_metrics(run, injection, edit_for)}


def heads_metrics(run, injection) -> dict:
    """``heads``: the injected (layer, head) pairs (``inject.heads``); ``head_profile``: the per-head profile that
    chose them (``auto``)."""
    out = {}
    if injection.heads is not None:
        out["heads"] = [[layer, head] for layer, heads in injection.heads.items() for head in heads]
    if run.cfg.inject.heads == AUTO:  # computed when the injection was set up: the run's memo holds it
        out["head_profile"] = head_profile_section(run, run_profile(run, injection, {}, None, None))
    return out


def qa_metrics(run, injection, edit_for, oracle_edit_for=None) -> dict:
    """Facts QA and the QA domains of ``evaluate.qa_domains``, the injected student scored through ``edit_for``
    (:func:`uzr.injection.qa_edits.qa_edit_for`; None: the source has no QA edit) and, beside it, the teacher oracle
    through ``oracle_edit_for`` (``evaluate.oracle_qa``; None: not scored)."""
    cfg = run.cfg

    def scored(edit, source: str) -> QAInjection | None:
        key = injection_key(source, cfg.inject.mode, cfg.alpha, injection.sinks, injection.heads)[1:]
        if emphasis_alone(cfg.inject):  # no harvest or controller key pins the injected layers: the key must
            key = (*key, "layers", json.dumps(list(cfg.inject.layers)))
        return None if edit is None else QAInjection(edit, key)

    injected, oracle = scored(edit_for, source_label(cfg.inject)), scored(oracle_edit_for, "teacher")
    out = {}
    if cfg.evaluate.facts_qa:
        out["facts_qa"] = facts_qa(run, injected, oracle)
    if cfg.evaluate.qa_domains:
        out["qa_domains"] = {name: domain_qa(run, name, injected, oracle) for name in cfg.evaluate.qa_domains}
    return out


def oracle_beside(cfg) -> bool:
    """Whether the evaluate stage scores the teacher oracle beside the run's source (``evaluate.oracle``): not when
    the source is the oracle already."""
    return cfg.evaluate.oracle and cfg.inject.source != "teacher"


def oracle_description(cfg) -> str:
    """What the oracle row injected, for ``metrics.json``."""
    target = "its matched head per student head" if per_head_targets(cfg) else "its head mean"
    where = "held-out texts and evaluate.domains" + (", facts QA and evaluate.qa_domains (live)"
                                                     if cfg.evaluate.oracle_qa else "")
    return (f"inject.source=teacher: the teacher's aligned attention ({target}) injected with the run's layers, mode, "
            f"alpha, sinks and heads, on {where}")


def figure(folder: Path, row: dict, controllers: dict, student, layer: int, cfg: RunConfig, make_injector) -> Path:
    """teacher | controller | student | injected heatmaps of one held-out text at ``layer``."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long, device=cfg.device)[None]
    d = row[f"teacher_dist_L{layer}"].shape[-1]  # every panel shows the stored leading (d, d) block
    plain = student_pass(student, ids, [layer], cfg.harvest.locality_window, dist_rows=d)
    injected = student_pass(student, ids, [layer], cfg.harvest.locality_window, make_injector(), dist_rows=d)
    with torch.no_grad():
        ctrl = controller_rows(controllers[layer], row[f"hidden_L{layer}"][:d], cfg.device).exp().mean(1)[0]  # (d, d)
    path = folder / f"heatmaps_L{layer}.png"
    heatmap_figure(path, row[f"teacher_dist_L{layer}"].astype("float32"), ctrl.cpu().numpy(),
                   plain.head_mean[layer].cpu().numpy(), injected.head_mean[layer].cpu().numpy(), layer,
                   f"(alpha={cfg.alpha.value}, {cfg.alpha.schedule}, {cfg.inject.mode})")
    return path
