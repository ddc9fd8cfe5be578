"""One trained group of the ``lru_mla`` ablation as its own sub-artifact (kind ``lru_mla_group``).

A group's artifact is keyed by the ablation's settings that shape a group (:func:`group_payload`: ``lru_mla``
without ``groups`` and ``figure``, the group, seed, trainer), so runs with different ``lru_mla.groups`` (e.g.
two processes training two groups each) share their groups and the four-group run reuses them. A group trains
with a Lightning checkpoint every epoch in ``checkpoints/`` of its work folder and resumes from it when a killed
run is started again; the finished group holds :data:`GROUP_FILES`: ``model.safetensors`` and ``group.json`` (its
training log and per-item held-out scores).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from uzr.config.keys import key_of
from uzr.config.lru_mla import GROUP_LETTERS, LRUMLASpec
from uzr.reasoning.tiny_lm import TinyLM, build, matched_widths, num_parameters
from uzr.reasoning.training import AblationModule, Items, evaluate, greedy_agreement, loader, make_items
from uzr.resumable_fit import fit_resumable
from uzr.tasks.compact import CharCodec

log = logging.getLogger(__name__)
GROUP_KIND = "lru_mla_group"
GROUP_FILES = ("model.safetensors", "group.json")
GROUP_VERSION = 1  # bump when a trained group changes meaning
HELDOUT_SEED_OFFSET = 1_000_003  # held-out items come from seed + this (their prompts seen in training dropped)


def datasets(spec: LRUMLASpec, seed: int) -> tuple[Items, Items]:
    """(train, held-out) items of the ablation."""
    train, seen = make_items(spec, spec.train_items, seed)
    heldout, _ = make_items(spec, spec.eval_items, seed + HELDOUT_SEED_OFFSET, exclude=seen)
    return train, heldout


def group_payload(cfg, group: str) -> dict:
    """What one group's training depends on: the ablation's settings but the group list and the figure switch."""
    return {"lru_mla": key_of(cfg.lru_mla, GROUP_KIND), "group": group, "seed": cfg.seed,
            "trainer": key_of(cfg.trainer, GROUP_KIND)}


def cached_group(run, group: str, train: Items, heldout: Items) -> tuple[Path, bool]:
    """The folder of ``group``'s trained artifact (built now, or resumed from its checkpoint) and whether it was
    reused (``run``: a :class:`~uzr.runner.RunContext`)."""
    folder, built = run.artifact(
        GROUP_KIND, group_payload(run.cfg, group),
        lambda work: {"resumed": train_group(run, group, train, heldout, work)["resumed"]}, version=GROUP_VERSION)
    return folder, not built


def train_group(run, group: str, train: Items, heldout: Items, out: Path) -> dict:
    """Train one group from scratch; writes ``out/model.safetensors`` and ``out/group.json``."""
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


def load_group_model(spec: LRUMLASpec, group: str, seed: int, folder: Path) -> TinyLM:
    """The trained model of ``group`` in ``folder`` (its files: its own artifact or their copy in the stage's), on
    the CPU."""
    model = build(spec, group, CharCodec().vocab_size, seed)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(torch.device("cpu"))
