"""The stages of a run — harvest -> controller -> gate -> evaluate — with their cached artifacts.

Each stage's artifact is addressed by a hash of everything that produced it (DESIGN.md §2), so a
sweep over ``alpha`` harvests once and trains once. ``metrics.json`` records, per artifact, its key
and whether this run built it or reused it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from uzr.cache import ArtifactCache, content_key
from uzr.config import RunConfig, harvest_layers
from uzr.controller import ControllerModule, build_controller, load_controller, save_controller
from uzr.corpus import load_corpus
from uzr.data import StoreDataModule
from uzr.evaluate import Evaluator, heatmap_figure
from uzr.facts_qa import QA_SCORE, qa_accuracy, qa_prompts
from uzr.gate import (
    GateModule,
    evaluate_gated,
    gate_key,
    gated_table,
    load_gate,
    print_gated_table,
    train_gate,
)
from uzr.harvest.runner import HarvesterFactory, run_harvest
from uzr.harvest.store import HarvestStore, StoreLayout
from uzr.inject import Injector
from uzr.loggers import finish, log_summary, make_loggers
from uzr.models import load_model
from uzr.report_table import flat_metrics, print_results, results_rows
from uzr.resources import check_free_disk, estimate_store_bytes
from uzr.resumable_fit import fit_resumable

log = logging.getLogger(__name__)


class ModelPool:
    """Loads teacher and student on first use, once per run."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self._loaded = cfg, {}

    def get(self, role: str):
        if role not in self._loaded:
            spec = getattr(self.cfg, role)
            start = time.perf_counter()
            self._loaded[role] = load_model(spec, device=self.cfg.device, cache_dir=Path(self.cfg.cache_dir),
                                            role=role)
            log.info("loaded %s %s in %.1fs", role, spec.name, time.perf_counter() - start)
        return self._loaded[role]


# ------------------------------------------------------------------------------------------- keys
def harvest_key(cfg: RunConfig) -> tuple[str, dict]:
    payload = {
        "teacher": dataclasses.asdict(cfg.teacher), "student": dataclasses.asdict(cfg.student),
        "data": dataclasses.asdict(cfg.data), "harvest": dataclasses.asdict(cfg.harvest),
        "layers": harvest_layers(cfg),
    }
    payload["harvest"].pop("layers")  # folded into "layers" above: only the effective set counts
    return content_key("harvest", payload), payload


def controller_key(cfg: RunConfig, harvest: str) -> tuple[str, dict]:
    payload = {"harvest": harvest, "controller": dataclasses.asdict(cfg.controller),
               "layers": list(cfg.inject.layers), "seed": cfg.seed, "trainer": dataclasses.asdict(cfg.trainer)}
    return content_key("controller", payload), payload


# ---------------------------------------------------------------------------------------- harvest
def build_store(folder: Path, cfg: RunConfig, models: ModelPool) -> dict:
    """Harvest every corpus text into shards under ``folder``; resumes after the last complete shard."""
    corpus = load_corpus(cfg.data)
    texts = [(t, "train") for t in corpus.train["text"]] + [(t, "heldout") for t in corpus.heldout["text"]]
    store = HarvestStore(folder)
    layers, mapping = harvest_layers(cfg)
    check_free_disk(folder, estimate_store_bytes(  # before any model loads
        len(texts), cfg.harvest.max_length, cfg.student.hidden_size, len(layers), cfg.teacher.num_layers,
        cfg.teacher.num_heads, cfg.student.num_layers, cfg.student.num_heads, max_dist_len=cfg.harvest.max_dist_len,
    ))
    teacher, teacher_tok = models.get("teacher")
    student, student_tok = models.get("student")
    store.write_layout(StoreLayout(
        layers=layers, teacher_layers=mapping, hidden_size=student.config.hidden_size,
        teacher_num_layers=teacher.config.num_hidden_layers, teacher_num_heads=teacher.config.num_attention_heads,
        student_num_layers=student.config.num_hidden_layers, student_num_heads=student.config.num_attention_heads,
        locality_window=cfg.harvest.locality_window, max_dist_len=cfg.harvest.max_dist_len,
    ))
    h = cfg.harvest

    make_harvester = HarvesterFactory(teacher, teacher_tok, student, student_tok, layers, mapping,
                                      h.locality_window, h.block_size, h.max_length, h.max_dist_len)
    trainer_kwargs = {"accelerator": cfg.trainer.accelerator, "devices": h.devices, "strategy": h.strategy}
    summary = run_harvest(store, texts, make_harvester, h.shard_size, h.max_bad_fraction, trainer_kwargs)
    truncated = int(sum(store.dataset().with_format(None)["truncated_tokens"]))
    if truncated:
        log.info("harvest: %d of %d texts were cut at harvest.max_length=%d tokens", truncated, len(texts), h.max_length)
    return {**summary, "truncated_at_max_length": truncated, "corpus_stats": corpus.stats}


# ------------------------------------------------------------------------------------- controller
def train_controller(folder: Path, cfg: RunConfig, store: HarvestStore, loggers, out_dir: Path) -> dict:
    """Fit the controllers; Lightning checkpoints in ``folder`` let a killed run resume where it stopped."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = StoreDataModule(store, cfg.inject.layers, cfg.controller.batch_size, cfg.seed)
    module = ControllerModule(store.layout.hidden_size, cfg.inject.layers, cfg.controller)
    t = cfg.trainer
    checkpoints = folder / "checkpoints"
    resumed = fit_resumable(module, checkpoints, "controller", dict(
        max_epochs=cfg.controller.max_epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        precision=t.precision, deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        logger=loggers or False, default_root_dir=str(out_dir), enable_model_summary=False,
    ), datamodule=datamodule)
    report = module.heldout_report()
    save_controller(module, folder, {"student": cfg.student.name, "heldout": report})
    shutil.rmtree(checkpoints, ignore_errors=True)  # the finished artifact is the safetensors file
    return {"heldout": report, "resumed": resumed}


def controller_summary(report: dict, layers: list[int]) -> dict:
    methods = ("controller", "uniform", "recency", "student_self")
    summary = {"heldout_kl": {m: report.get(f"val/kl/{m}") for m in methods}}
    summary["heldout_kl_by_layer"] = {
        f"L{layer}": {m: report.get(f"val/kl/L{layer}/{m}") for m in methods} for layer in layers
    }
    return summary


# --------------------------------------------------------------------------------------- evaluate
def evaluate(cfg: RunConfig, store: HarvestStore, controllers: dict, models: ModelPool, out_dir: Path) -> tuple[dict, dict]:
    student, student_tok = models.get("student")
    rows = store.rows("heldout")
    n = len(rows) if cfg.evaluate.num_texts == 0 else min(cfg.evaluate.num_texts, len(rows))
    selected = [rows[i] for i in tqdm(range(n), desc="load held-out rows", leave=False)]
    teacher, same_vocab = None, False
    if cfg.teacher.source == "tiny" or cfg.teacher.hub_id == cfg.student.hub_id:
        teacher, teacher_tok = models.get("teacher")
        same_vocab = teacher_tok.get_vocab() == student_tok.get_vocab()
    layers = list(cfg.inject.layers)
    evaluator = Evaluator(student, student_tok, layers, cfg.harvest.locality_window, cfg.harvest.max_length)
    ctrl = {int(k): v.to(cfg.device) for k, v in controllers.items()}

    def make_injector():
        return Injector(ctrl, cfg.alpha, cfg.inject.mode, prompt_len=0)

    metrics = evaluator.evaluate(tqdm(selected, desc="evaluate", unit="text"), make_injector, teacher if same_vocab else None,
                                 same_vocab)
    if cfg.evaluate.facts_qa:
        metrics["facts_qa"] = facts_qa(cfg, models, make_injector)
    images = {}
    if cfg.evaluate.figure and selected:
        images["heatmaps"] = figure(out_dir / "figures", selected[0], ctrl, student, layers[0], cfg, make_injector)
    return metrics, images


def facts_qa(cfg: RunConfig, models: ModelPool, make_injector) -> dict:
    """Facts-QA accuracy of teacher, student and injected student on the same held-out prompts."""
    prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
    student, student_tok = models.get("student")
    teacher, teacher_tok = models.get("teacher")
    style = cfg.gate.prompt_format
    return {
        "teacher": qa_accuracy(teacher, teacher_tok, tqdm(prompts, desc="facts QA: teacher", leave=False), style),
        "student": qa_accuracy(student, student_tok, tqdm(prompts, desc="facts QA: student", leave=False), style),
        "injected": qa_accuracy(student, student_tok, tqdm(prompts, desc="facts QA: injected", leave=False), style,
                                lambda prompt: make_injector()),
        "num_prompts": len(prompts), "score": QA_SCORE,
    }


def figure(folder: Path, row: dict, controllers: dict, student, layer: int, cfg: RunConfig, make_injector) -> Path:
    from uzr.controller import masked_log_softmax
    from uzr.evaluate import student_pass

    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long, device=cfg.device)[None]
    d = row[f"teacher_dist_L{layer}"].shape[-1]  # every panel shows the stored leading (d, d) block
    plain = student_pass(student, ids, [layer], cfg.harvest.locality_window, dist_rows=d)
    injected = student_pass(student, ids, [layer], cfg.harvest.locality_window, make_injector(), dist_rows=d)
    with torch.no_grad():
        hidden = torch.as_tensor(row[f"hidden_L{layer}"][:d], dtype=torch.float32, device=cfg.device)[None]
        s = hidden.shape[1]
        allowed = torch.ones(1, s, s, dtype=torch.bool, device=cfg.device).tril()
        ctrl = masked_log_softmax(controllers[layer](hidden), allowed).exp()[0] * allowed[0]
    path = folder / f"heatmaps_L{layer}.png"
    heatmap_figure(path, row[f"teacher_dist_L{layer}"].astype("float32"), ctrl.cpu().numpy(),
                   plain.head_mean[layer].cpu().numpy(), injected.head_mean[layer].cpu().numpy(), layer,
                   f"(alpha={cfg.alpha.value}, {cfg.alpha.schedule}, {cfg.inject.mode})")
    return path


# ------------------------------------------------------------------------------------ artifacts
@dataclass
class Artifacts:
    """The cached products of the stages, loaded (built where the stage is selected)."""

    store: HarvestStore
    controllers: dict | None = None
    controller_meta: dict | None = None
    gate: GateModule | None = None
    gate_meta: dict | None = None
    info: dict = field(default_factory=dict)  # per artifact: {"key", "built", "path"}


def load_artifacts(cfg: RunConfig, models: ModelPool, loggers, out_dir: Path, stages, build=None) -> Artifacts:
    """Store, controllers and (if ``gate`` is a stage) gate of ``cfg`` from the cache. The stages in
    ``build`` (default: ``stages``) build their artifact when missing; the others must find it cached
    (the error names the stage to run)."""
    cache, stages, info = ArtifactCache(cfg.cache_dir), set(stages), {}
    build = stages if build is None else set(build)

    def get(kind: str, key_payload: tuple[str, dict], make) -> Path:
        key, payload = key_payload
        path, built = cache.get_or_build(kind, key, payload, make, allow_build=kind in build)
        info[kind] = {"key": key, "built": built, "path": str(path)}
        return path

    store = HarvestStore(get("harvest", harvest_key(cfg), lambda d: build_store(d, cfg, models)))
    art = Artifacts(store, info=info)
    if not stages & {"controller", "gate", "evaluate"}:
        return art
    c_dir = get("controller", controller_key(cfg, info["harvest"]["key"]),
                lambda d: train_controller(d, cfg, store, loggers, out_dir))
    art.controllers, art.controller_meta = load_controller(c_dir, expected={
        "student": cfg.student.name, "hidden_size": cfg.student.hidden_size, "layers": list(cfg.inject.layers),
    })
    if "gate" in stages:
        g_dir = get("gate", gate_key(cfg, info["controller"]["key"]),
                    lambda d: train_gate(d, cfg, store, art.controllers, models, loggers))
        art.gate, art.gate_meta = load_gate(g_dir, expected={"layers": list(cfg.inject.layers),
                                                             "student": cfg.student.name})
    return art


# -------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, out_dir: Path, config_dict: dict, run_name: str) -> dict:
    """Run the selected stages; writes ``metrics.json`` into ``out_dir`` and returns the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    models = ModelPool(cfg)
    loggers = make_loggers(cfg.logger, out_dir, run_name, config_dict)
    metrics: dict = {"name": run_name}
    stages = set(cfg.stages)
    try:
        art = load_artifacts(cfg, models, loggers, out_dir, stages)
        metrics["artifacts"] = art.info
        images, tables = {}, {}
        if art.controllers is not None:
            metrics["controller"] = controller_summary(art.controller_meta["heldout"], cfg.inject.layers)
        if "evaluate" in stages:
            metrics["evaluate"], images = evaluate(cfg, art.store, art.controllers, models, out_dir)
        if art.gate is not None:
            # the evaluate stage already scored the plain student and the teacher on the same QA prompts
            qa = metrics.get("evaluate", {}).get("facts_qa")
            known = {"none": qa["student"], "teacher": qa["teacher"]} if qa else None
            metrics["gate"] = {"heldout": art.gate.report(), "evaluation": evaluate_gated(
                cfg, art.store, art.controllers, art.gate, models, known_qa=known)}
            tables["gated"] = gated_table(metrics["gate"]["evaluation"])
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        tables["results"] = results_rows(metrics)
        print_results(metrics, cfg)
        if art.gate is not None:
            print_gated_table(metrics["gate"]["evaluation"])
            log.info("gate: %s", metrics["gate"]["heldout"]["verdict"])
        log_summary(loggers, flat_metrics(metrics), images, tables)
    finally:
        finish(loggers)
    return metrics


__all__ = ["Artifacts", "load_artifacts", "run", "build_controller", "harvest_key", "controller_key"]
