"""The ``lru_mla`` stage: the four-group ablation (A attention, B MLA, C MLA + LRU fixed, D MLA + LRU + ACT).

Cached and resumable: each group is its own artifact (kind ``lru_mla_group``, keyed by the ablation's settings
without ``groups`` and ``figure``, plus the group), so runs with different ``lru_mla.groups`` (e.g. two processes
training two groups each) share their groups, and the four-group run reuses them. A group trains with a Lightning
checkpoint every epoch in ``checkpoints/`` of its work folder and resumes from it when a killed run is started
again; the finished group holds ``model.safetensors`` and ``group.json`` (its training log and per-item held-out
scores), copied into the stage's artifact as ``<group>/``.
The report (:mod:`uzr.reasoning.ablation_report`) compares the groups on the same held-out items.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from uzr.config.lru_mla import GROUP_LETTERS
from uzr.resumable_fit import fit_resumable

log = logging.getLogger(__name__)
HELDOUT_SEED_OFFSET = 1_000_003  # held-out items come from seed + this (their prompts seen in training dropped)


def datasets(spec, seed: int):
    """(train, held-out) :class:`uzr.reasoning.training.Items`."""
    from uzr.reasoning.training import make_items

    train, seen = make_items(spec, spec.train_items, seed)
    heldout, _ = make_items(spec, spec.eval_items, seed + HELDOUT_SEED_OFFSET, exclude=seen)
    return train, heldout


class LRUMLAStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        spec = {k: v for k, v in dataclasses.asdict(cfg.lru_mla).items() if k != "figure"}
        return {"lru_mla": spec, "seed": cfg.seed, "trainer": dataclasses.asdict(cfg.trainer)}

    def build(self, run, folder: Path) -> dict:
        spec, seed = run.cfg.lru_mla, run.cfg.seed
        train, heldout = datasets(spec, seed)
        reused = {}
        for group in spec.groups:
            done, reused[group] = cached_group(run, group, train, heldout)
            (folder / group).mkdir(parents=True, exist_ok=True)
            for name in GROUP_FILES:
                shutil.copyfile(done / name, folder / group / name)
        return {"groups": list(spec.groups), "train_items": len(train.ids), "heldout_items": len(heldout.ids),
                "groups_reused": reused}

    def load(self, run, folder: Path) -> dict:
        """Each group's ``group.json``, the held-out items and the training answers (regenerated: same seed)."""
        spec = run.cfg.lru_mla
        train, heldout = datasets(spec, run.cfg.seed)
        return {"groups": {g: json.loads((folder / g / "group.json").read_text()) for g in spec.groups},
                "heldout": heldout, "train_answers": train.answers, "folder": folder}

    def report(self, run, artifact: dict) -> dict:
        from uzr.reasoning.ablation_report import summarise

        return summarise(run, artifact)

    def present(self, run, section: dict) -> None:
        from uzr.reasoning.ablation_report import present

        present(run, section)


GROUP_FILES = ("model.safetensors", "group.json")
GROUP_VERSION = 1  # bump when a trained group changes meaning


def group_payload(cfg, group: str) -> dict:
    """What one group's training depends on: the ablation's settings but the group list and the figure switch."""
    spec = {k: v for k, v in dataclasses.asdict(cfg.lru_mla).items() if k not in ("groups", "figure")}
    return {"lru_mla": spec, "group": group, "seed": cfg.seed, "trainer": dataclasses.asdict(cfg.trainer)}


def cached_group(run, group: str, train, heldout) -> tuple[Path, bool]:
    """The folder of ``group``'s trained artifact (built now, or resumed from its checkpoint) and whether it was
    reused."""
    from uzr.cache import ArtifactCache, content_key

    payload = group_payload(run.cfg, group)
    folder, built = ArtifactCache(run.cfg.cache_dir).get_or_build(
        "lru_mla_group", content_key("lru_mla_group", payload, GROUP_VERSION), payload,
        lambda work: {"resumed": train_group(run, group, train, heldout, work)["resumed"]})
    return folder, not built


def train_group(run, group: str, train, heldout, out: Path) -> dict:
    """Train one group from scratch; writes ``out/model.safetensors`` and ``out/group.json``."""
    from uzr.reasoning.tiny_lm import build, matched_widths, num_parameters
    from uzr.reasoning.training import AblationModule, evaluate, greedy_agreement, loader
    from uzr.tasks.compact import CharCodec

    cfg, spec = run.cfg, run.cfg.lru_mla
    vocab = CharCodec().vocab_size
    model = build(spec, group, vocab, cfg.seed)
    data = loader(train, spec.batch_size, cfg.seed)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = AblationModule(model, spec, spec.epochs * len(data))
    t = cfg.trainer
    start = time.perf_counter()
    resumed = fit_resumable(module, out / "checkpoints", f"lru_mla {group}", dict(
        max_epochs=spec.epochs, accelerator=t.accelerator, devices=1, precision=t.precision,
        deterministic=t.deterministic, logger=False, default_root_dir=str(run.out_dir),
        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0), train_dataloaders=data)
    seconds = time.perf_counter() - start
    model = model.cpu()
    scores = evaluate(model, heldout)
    per_epoch = len(data)
    hist = module.history
    result = {
        "group": group, "letter": GROUP_LETTERS[group], "parameters": num_parameters(model),
        "ffn": matched_widths(spec, vocab)[group][0], "train_seconds": round(seconds, 1), "resumed": resumed,
        "steps": len(hist), "device": t.accelerator,
        "loss_by_epoch": [round(sum(h["loss"] for h in hist[i:i + per_epoch]) / len(hist[i:i + per_epoch]), 4)
                          for i in range(0, len(hist), per_epoch)],
        "iterations_by_epoch": [round(sum(h["iterations"] for h in hist[i:i + per_epoch]) / per_epoch, 3)
                                for i in range(0, len(hist), per_epoch)] if hist and "iterations" in hist[0] else None,
        **scores, "greedy_agreement": greedy_agreement(model, heldout, scores["exact"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "group.json").write_text(json.dumps(result))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log.info("lru_mla %s: %d parameters, %.0f s, exact %.3f", group, result["parameters"], seconds,
             sum(scores["exact"]) / len(scores["exact"]))
    return result


def load_group_model(run, folder: Path, group: str):
    """The trained model of ``group`` from the artifact."""
    from uzr.reasoning.tiny_lm import build
    from uzr.tasks.compact import CharCodec

    model = build(run.cfg.lru_mla, group, CharCodec().vocab_size, run.cfg.seed)
    model.load_state_dict(load_file(str(folder / group / "model.safetensors")))
    return model.to(torch.device("cpu"))
