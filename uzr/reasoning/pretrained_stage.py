"""The ``lru_mla_pretrained`` stage: the four-group ablation on the pretrained student (issue 27).

A pretrained top (``baseline``), its attention converted to MLA (``mla``), and MLA with the LRU on ``c_kv``
(``mla_lru_fixed``, ``mla_lru_act``), each trained for the same steps on the same items from the same cached
lower-layer states (:mod:`uzr.reasoning.pretrained_data`). Each group is its own sub-artifact
(``lru_mla_pretrained_group``: ``top.safetensors`` with the trained top, ``group.json`` with its scores), resumable
from its epoch checkpoint; the stage's artifact holds copies and ``conversion.json`` (what the conversion alone
costs, per latent rank, before any training).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from uzr.config.keys import key_of
from uzr.config.lru_mla import GROUP_LETTERS, PretrainedSpec
from uzr.intervals import bits_per_byte_difference
from uzr.reasoning.mla_convert import full_rank
from uzr.reasoning.prefix import lower_stack
from uzr.reasoning.pretrained_data import PretrainedData, load_data
from uzr.reasoning.pretrained_report import present, summarise
from uzr.reasoning.pretrained_reward import train_reward
from uzr.reasoning.pretrained_top import convert_top, copy_top, group_top, set_exit, trainable_parameters
from uzr.reasoning.pretrained_training import TopModule, epochs_for, score, text_nll
from uzr.reasoning.training import EpochShuffle
from uzr.resumable_fit import fit_resumable
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)
STAGE_KIND = "lru_mla_pretrained"
GROUP_KIND = "lru_mla_pretrained_group"
GROUP_FILES = ("top.safetensors", "group.json")
GROUP_VERSION = 1


def group_payload(cfg, group: str, spec=None) -> dict:
    """What one group's training depends on (``spec``: ``cfg.lru_mla`` unless given)."""
    return {"lru_mla": key_of(spec or cfg.lru_mla, GROUP_KIND), "group": group, "seed": cfg.seed,
            "trainer": key_of(cfg.trainer, GROUP_KIND), "student": key_of(cfg.student, GROUP_KIND)}


def sft_spec(spec):
    """The settings of the SFT run that the reward objective starts from (reward knobs at their defaults, so every
    reward setting shares it)."""
    reward = {f.name: f.default for f in dataclasses.fields(PretrainedSpec) if f.name.startswith("reward_")}
    return dataclasses.replace(spec, objective="sft", pretrained=dataclasses.replace(spec.pretrained, **reward))


def conversion_cost(model, data: PretrainedData, spec) -> dict:
    """Bits per byte of the held-out texts with the top as it is and converted at each latent rank (and the full
    rank), before any training, with the paired interval of converted - original."""
    p = spec.pretrained
    states, nbytes = data.states["bpb"], data.bpb_bytes
    original = text_nll(copy_top(model, p.top_layers), states, data.bpb_ids)
    total = sum(nbytes)
    rows = {"original": {"bits_per_byte": round(sum(original) / total / 0.6931471805599453, 4)}}
    full = full_rank(copy_top(model, 1).layers[0].self_attn, p.rope_pairs)
    for rank in sorted({*p.conversion_ranks, p.latent_rank, full}):
        if rank > full:
            continue
        nll = text_nll(convert_top(copy_top(model, p.top_layers), rank, p.rope_pairs), states, data.bpb_ids)
        diff = bits_per_byte_difference(nll, original, nbytes)
        rows[f"rank_{rank}"] = {"rank": rank, "full_rank": rank == full,
                                "bits_per_byte": round(sum(nll) / total / 0.6931471805599453, 4),
                                "minus_original": {k: round(v, 4) if isinstance(v, float) else v
                                                   for k, v in diff.as_dict().items()},
                                "verdict": diff.verdict(higher_is_better=False)}
    return {"texts": len(states), "bytes": total, "top_layers": p.top_layers, "rope_pairs": p.rope_pairs,
            "ranks": rows}


def train_group(run, model, data: PretrainedData, group: str, out: Path, spec) -> dict:
    """Train one group's top by SFT (equal steps and data) and score it; writes ``out/top.safetensors`` and
    ``out/group.json``."""
    cfg, p = run.cfg, spec.pretrained
    top = group_top(model, spec, group, cfg.seed)
    before = score(top, data.states["heldout"], data.heldout)
    top.train()  # scoring left it in eval mode (nothing in it drops out: the mode changes no number)
    module = TopModule(top, spec, data.states["train"], data.train)
    loader = DataLoader(list(range(len(data.train))), batch_size=p.batch_size,
                        sampler=EpochShuffle(len(data.train), cfg.seed))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t = cfg.trainer
    clock = Stopwatch()
    resumed = fit_resumable(module, out / "checkpoints", f"lru_mla_pretrained {group}", dict(
        max_epochs=epochs_for(spec, len(data.train)), max_steps=p.steps, accelerator=t.accelerator, devices=1,
        precision=t.precision, deterministic=t.deterministic, logger=False, default_root_dir=str(run.out_dir),
        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0), train_dataloaders=loader)
    result = {"group": group, "letter": GROUP_LETTERS[group], "parameters": trainable_parameters(top),
              "resumed": resumed, "steps": len(module.history), "history": module.history,
              "train_time": clock.read(), "before_training": {k: before[k] for k in ("exact", "partial", "nll")}}
    return finish_group(module.top.cpu(), data, spec, result, out)


def reward_group(run, model, tokenizer, data: PretrainedData, group: str, sft: Path, out: Path, spec) -> dict:
    """REINFORCE (``lru_mla.objective=reward``) from the group's SFT top in ``sft``; scores and saves like SFT."""
    top = group_top(model, spec, group, run.cfg.seed)
    top.load_state_dict(load_file(str(sft / "top.safetensors")))
    sft_result = json.loads((sft / "group.json").read_text())
    clock = Stopwatch()
    history = train_reward(top, lower_stack(model, spec.pretrained.top_layers), tokenizer, data.train, spec,
                           run.cfg.seed)
    result = {**{k: sft_result[k] for k in ("group", "letter", "parameters", "steps", "history", "before_training")},
              "resumed": False, "sft_train_time": sft_result["train_time"], "train_time": clock.read(),
              "reward_history": history, "sft_exact": sft_result["exact"], "sft_partial": sft_result["partial"]}
    return finish_group(top, data, spec, result, out)


def finish_group(top, data: PretrainedData, spec, result: dict, out: Path) -> dict:
    """Score a trained top on the held-out items, the few-shot prompts and (D) with Huginn's exit; save it."""
    group = result["group"]
    clock = Stopwatch()
    result.update(score(top, data.states["heldout"], data.heldout))
    result["fewshot"] = {str(k): {key: v for key, v in score(top, data.states[f"fewshot_{k}"], items).items()
                                  if key in ("exact", "partial", "iterations")} for k, items in data.fewshot.items()}
    if group == "mla_lru_act":  # Huginn's training-free exit at inference, in place of ACT's halting
        set_exit(top, "kl", spec.pretrained.kl_exit_tol)
        exit_scores = score(top, data.states["heldout"], data.heldout)
        set_exit(top, "act", spec.pretrained.kl_exit_tol)
        result["kl_exit"] = {k: exit_scores[k] for k in ("exact", "partial", "nll", "tokens", "tokens_right",
                                                          "iterations", "convergence_ratio")}
    result["eval_time"] = clock.read()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in top.state_dict().items()}, str(out / "top.safetensors"))
    (out / "group.json").write_text(json.dumps(result))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log.info("lru_mla_pretrained %s: %d trainable parameters, %.0f s, exact %.3f", group, result["parameters"],
             result["train_time"]["seconds"], sum(result["exact"]) / len(result["exact"]))
    return result


def cached_group(run, model, tokenizer, data: PretrainedData, group: str) -> tuple[Path, bool]:
    """The folder of ``group``'s trained artifact (SFT; with ``objective=reward`` REINFORCE from the cached SFT
    artifact) and whether this call built it."""
    spec = run.cfg.lru_mla
    sft = sft_spec(spec)
    folder, built = run.artifact(GROUP_KIND, group_payload(run.cfg, group, sft),
                                 lambda work: {"resumed": train_group(run, model, data, group, work, sft)["resumed"]},
                                 version=GROUP_VERSION)
    if spec.objective == "sft":
        return folder, built

    def build(work: Path) -> dict:
        reward_group(run, model, tokenizer, data, group, folder, work, spec)
        return {"sft": str(folder)}

    return run.artifact(GROUP_KIND, group_payload(run.cfg, group), build, version=GROUP_VERSION)


class PretrainedLRUMLAStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        return {"lru_mla": key_of(cfg.lru_mla, STAGE_KIND), "seed": cfg.seed,
                "trainer": key_of(cfg.trainer, STAGE_KIND), "student": key_of(cfg.student, STAGE_KIND)}

    def build(self, run, folder: Path) -> dict:
        spec = run.cfg.lru_mla
        model, tok = run.models.get("student")
        data = load_data(run, model, tok)
        clock = Stopwatch()
        conversion = conversion_cost(model, data, spec)
        conversion["seconds"] = clock.read()
        (folder / "conversion.json").write_text(json.dumps(conversion))
        reused = {}
        for group in spec.groups:
            done, built = cached_group(run, model, tok, data, group)
            reused[group] = not built
            (folder / group).mkdir(parents=True, exist_ok=True)
            for name in GROUP_FILES:
                shutil.copyfile(done / name, folder / group / name)
        (folder / "data.json").write_text(json.dumps({
            "train_items": len(data.train), "heldout_items": len(data.heldout), "demonstrations": data.demos,
            "prefix_time": data.prefix_seconds, "train_answers": data.train.answers,
            "heldout_level": data.heldout.level.tolist(), "heldout_answers": data.heldout.answers,
            "fewshot_level": data.fewshot[min(data.fewshot)].level.tolist(),
            "tokens_per_item": round(sum(map(len, data.train.ids)) / len(data.train), 1)}))
        return {"groups": list(spec.groups), "groups_reused": reused}

    def load(self, run, folder: Path) -> dict:
        spec = run.cfg.lru_mla
        return {"groups": {g: json.loads((folder / g / "group.json").read_text()) for g in spec.groups},
                "conversion": json.loads((folder / "conversion.json").read_text()),
                "data": json.loads((folder / "data.json").read_text()), "folder": folder}

    def report(self, run, artifact: dict) -> dict:
        return summarise(run, artifact)

    def present(self, run, section: dict) -> None:
        present(run, section)
