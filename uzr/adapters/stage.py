"""The ``svf`` stage: one SVF expert per domain, trained with REINFORCE or distilled from the teacher
(``svf.objective``; cached, resumable).

The artifact holds ``<domain>/expert.safetensors`` + ``expert.json`` for every domain of ``svf.domains``.
A domain named in ``svf.experts`` is loaded from its folder instead of trained (checked against the model).
Each domain's training writes a Lightning checkpoint every epoch into ``<domain>/checkpoints`` of the
artifact's work folder, so a killed run resumes there; finished domains are kept and skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from uzr.adapters.distill import DistillModule, check_same_vocabulary
from uzr.adapters.domains import domain_items, reward
from uzr.adapters.reinforce import ReinforceModule
from uzr.adapters.svd import decompose, target_matrices
from uzr.adapters.svf import SVFExpert, expert_meta, load_expert, save_expert
from uzr.cache import file_digest
from uzr.config.keys import key_of
from uzr.qa.prompts import adds_special_tokens, format_prompt, resolve_format
from uzr.resumable_fit import fit_resumable
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)


def question_text(item) -> str:
    """The question as asked: arithmetic asks for a bare number (the checker reads the first integer)."""
    return item.question + (" Answer with a number." if item.domain == "arithmetic" else "")


def formatted(tokenizer, items, prompt_format: str) -> tuple[list[str], bool]:
    style = resolve_format(tokenizer, prompt_format)
    return [format_prompt(question_text(it), tokenizer, style) for it in items], adds_special_tokens(style)


def items_for(svf, domain: str, split: str, n: int, seed: int):
    return domain_items(domain, split, n, seed, svf.heldout_fraction, tuple(svf.causal_levels), svf.causal_max_vars)


@dataclasses.dataclass
class SVFArtifact:
    experts: dict[str, SVFExpert]  # domain -> expert
    decomp: object  # uzr.adapters.svd.Decomposition of the adapted matrices
    report: dict


class SVFStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        svf = cfg.svf
        given = {d: file_digest(Path(p).expanduser() / "expert.safetensors") for d, p in sorted(svf.experts.items())}
        return {"svf": key_of(svf, "svf"), "student": key_of(cfg.student, "svf"), "seed": cfg.seed,
                "trainer": key_of(cfg.trainer, "svf"), "given_experts": given, **teacher_key(cfg)}

    def _decomp(self, run):
        model, _ = run.models.get("student")
        svf = run.cfg.svf

        def compute():
            return decompose(target_matrices(model, svf.matrices, svf.layers), run.cfg.cache_dir)

        return run.memo(("svf_decomposition", svf.matrices, tuple(svf.layers or ())), compute)

    def build(self, run, folder: Path) -> dict:
        svf = run.cfg.svf
        model, tok = run.models.get("student")
        decomp = self._decomp(run)
        report = {}
        for domain in svf.domains:
            out = folder / domain
            if domain in svf.experts:
                expert = load_expert(Path(svf.experts[domain]).expanduser(), decomp=decomp)
                save_expert(out, expert)
                report[domain] = {"source": svf.experts[domain]}
                continue
            if (out / "expert.json").is_file():  # finished before a kill
                report[domain] = load_expert(out, decomp=decomp).meta.get("training", {})
                continue
            report[domain] = train_expert(run, model, tok, decomp, domain, out)
        return {"training": report}

    def load(self, run, folder: Path) -> SVFArtifact:
        decomp = self._decomp(run)
        svf = run.cfg.svf
        experts = {d: load_expert(folder / d, expected={"student": run.cfg.student.name, "matrices": svf.matrices,
                                                         "domain": d}, decomp=decomp) for d in svf.domains}
        return SVFArtifact(experts, decomp, {d: e.meta.get("training", {}) for d, e in experts.items()})

    def report(self, run, artifact: SVFArtifact) -> dict:
        return {"experts": {d: {"parameters": e.num_parameters, **e.meta.get("training", {})}
                            for d, e in artifact.experts.items()}}


def teacher_key(cfg) -> dict:
    """The teacher is part of what trained an expert only when it is distilled from."""
    return {"teacher": key_of(cfg.teacher, "svf")} if cfg.svf.objective == "distill" else {}


def train_expert(run, model, tok, decomp, domain: str, out: Path) -> dict:
    """REINFORCE one expert on the domain's training prompts; writes ``out/expert.*``; returns its training log."""
    cfg, svf = run.cfg, run.cfg.svf
    module, training = fit_reinforce(run, model, tok, domain, out / "checkpoints", f"svf expert {domain}",
                                     decomp=decomp)
    meta = expert_meta(decomp, cfg.student.name, svf.matrices, svf.layers, domain, svf.objective, training=training,
                       lr=svf.lr, clip=svf.clip, kl_weight=svf.kl_weight, samples_per_prompt=svf.samples_per_prompt,
                       reward=svf.reward, baseline=svf.baseline,
                       **({"teacher": cfg.teacher.name} if svf.objective == "distill" else {}))
    save_expert(out, SVFExpert(module.z(), meta))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log.info("svf expert %s: %s", domain, training)
    return training


def fit_reinforce(run, model, tok, domain: str, checkpoints: Path, what: str, decomp=None, edit=None,
                  lr: float | None = None):
    """Train an SVF expert (``decomp``) or a trainable edit (``edit``) by ``svf.objective`` (``svf.*`` settings;
    ``lr`` overrides ``svf.lr``) on the domain's ``svf.train_items`` training prompts, resumable from
    ``checkpoints``. Returns the trained module and its training log (mean reward, or mean KL to the teacher,
    of the first and the last epoch)."""
    cfg, svf = run.cfg, run.cfg.svf
    items = items_for(svf, domain, "train", svf.train_items, cfg.seed)
    texts, special = formatted(tok, items, svf.prompt_format)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, metric = _objective(run, model, tok, domain, decomp, edit, items, texts, special, lr or svf.lr)
    loader = DataLoader(list(range(len(items))), batch_size=svf.prompts_per_step, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    t = cfg.trainer
    clock = Stopwatch()
    resumed = fit_resumable(module, checkpoints, what, dict(
        max_epochs=svf.epochs, accelerator=t.accelerator, devices=1, precision=t.precision,
        deterministic=t.deterministic, log_every_n_steps=1, logger=False, default_root_dir=str(run.out_dir),
        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=svf.clip,
        gradient_clip_algorithm="norm"), train_dataloaders=loader)
    values = [h[metric] for h in module.history]
    training = {"steps": len(values), f"mean_{metric}_first_epoch": _mean(values[:len(loader)]),
                f"mean_{metric}_last_epoch": _mean(values[-len(loader):]), f"{metric}_per_step": [round(v, 4) for v in values],
                **clock.read(), **_sampling_cpu(module.history), "resumed": resumed, "train_items": len(items)}
    return module, training


def _objective(run, model, tok, domain, decomp, edit, items, texts, special, lr):
    """The LightningModule of ``svf.objective`` and the name of the value it logs per step."""
    svf = run.cfg.svf
    if svf.objective == "distill":
        teacher, teacher_tok = run.models.get("teacher")
        check_same_vocabulary(teacher_tok, tok)
        return DistillModule(model, teacher, tok, decomp, texts, lr, svf.max_new_tokens, svf.init_z, special,
                             edit=edit), "kl"
    return ReinforceModule(model, tok, decomp, texts, [it.answer for it in items],
                           lambda pred, ans: reward(domain, pred, ans, svf.reward), lr, svf.kl_weight,
                           svf.samples_per_prompt, svf.max_new_tokens, svf.temperature, svf.init_z, special,
                           edit=edit, baseline=svf.baseline), "reward"


def _sampling_cpu(history: list[dict]) -> dict:
    """CPU seconds the steps spent sampling (the rest of a step is scoring, backward and the optimiser)."""
    spent = [h["sample_cpu_seconds"] for h in history if "sample_cpu_seconds" in h]
    return {"sampling_cpu_seconds": round(sum(spent), 1)} if spent else {}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None
