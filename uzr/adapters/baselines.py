"""The ``svf_baselines`` stage: LoRA and IA3 (through ``peft``) per domain, the weight-space baselines of the experts.

For each method of ``svf.baselines`` and each domain: an adapter on the experts' matrices (``svf.matrices``) with as
many decoder layers as fit in one SVF expert's parameter count (:func:`~uzr.adapters.peft_edit.plan_baseline`),
trained exactly like the expert (REINFORCE on the same training prompts, samples, epochs, gradient clip; the
objective of ``svf.objective``) once per learning rate of ``svf.baseline_lrs``. The learning rate kept is the one
with the best greedy accuracy on ``svf.val_items`` validation prompts (train split, after the training prompts; never
the held-out items ``svf_eval`` reports on), ties broken by the mean log-likelihood of the validation answers, then
by the order of ``svf.baseline_lrs``. The artifact holds ``<method>/<domain>/adapter.safetensors`` + ``adapter.json``
(plan, parameter counts, the sweep); cached and resumable (finished adapters are kept and skipped).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from uzr.adapters.evaluation import answers_correct
from uzr.adapters.peft_edit import BaselinePlan, PeftTrainable, plan_baseline
from uzr.adapters.reinforce import answer_logprobs
from uzr.adapters.stage import fit_reinforce, formatted, items_for
from uzr.adapters.svd import target_matrices
from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.config.keys import key_of
from uzr.hooks import injected

log = logging.getLogger(__name__)
ADAPTER_FORMAT, ADAPTER_VERSION = "uzr.peft_baseline", 1
WEIGHTS_FILE, META_FILE = "adapter.safetensors", "adapter.json"


def svf_budget(model, matrices: str, layers=None) -> int:
    """Parameters of one SVF expert: one ``z`` entry per singular value, ``Σ min(out, in)`` over its matrices."""
    return sum(min(lin.weight.shape) for lin in target_matrices(model, matrices, layers).values())


def validation_items(svf, domain: str, seed: int):
    """``svf.val_items`` training-split prompts that come after the ``svf.train_items`` training prompts."""
    return items_for(svf, domain, "train", svf.train_items + svf.val_items, seed)[svf.train_items:]


@torch.no_grad()
def validation_score(model, tok, items, svf, edit) -> tuple[float, float]:
    """(greedy accuracy, mean per-token log-likelihood of the reference answers) with ``edit`` attached."""
    accuracy = sum(answers_correct(model, tok, items, svf, edit)) / len(items)
    texts, special = formatted(tok, items, svf.prompt_format)
    prompts = [tok(t, add_special_tokens=special)["input_ids"] for t in texts]
    answers = [tok(it.answer if special else " " + it.answer, add_special_tokens=False)["input_ids"] for it in items]
    with injected(model, edit):
        totals, _ = answer_logprobs(model, prompts, answers, tok.pad_token_id or 0)
    return accuracy, float(totals.sum()) / sum(len(a) for a in answers)


@dataclasses.dataclass
class Baseline:
    plan: BaselinePlan
    state: dict  # adapter tensors
    meta: dict

    def edit(self, model) -> PeftTrainable:
        return PeftTrainable(model, self.plan, self.state)


class SVFBaselinesStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        return {"svf": key_of(cfg.svf, "svf_baselines"), "student": key_of(cfg.student, "svf_baselines"),
                "seed": cfg.seed, "trainer": key_of(cfg.trainer, "svf_baselines")}

    def build(self, run, folder: Path) -> dict:
        svf = run.cfg.svf
        model, tok = run.models.get("student")
        budget = svf_budget(model, svf.matrices, svf.layers)
        report = {}
        for method in svf.baselines:
            plan = plan_baseline(model, method, svf.matrices, budget, svf.lora_rank)
            for domain in svf.domains:
                out = folder / method / domain
                if not (out / META_FILE).is_file():  # else finished before a kill
                    train_baseline(run, model, tok, plan, domain, out)
                report[f"{method}:{domain}"] = self._read(out)[1]
        return {"training": report}

    @staticmethod
    def _read(out: Path) -> tuple[dict, dict]:
        hint = f"delete {out} to train the baseline again"
        return load_checkpoint(out, WEIGHTS_FILE, META_FILE, ADAPTER_FORMAT, ADAPTER_VERSION, None, hint)

    def load(self, run, folder: Path) -> dict[str, dict[str, Baseline]]:
        svf = run.cfg.svf
        out: dict[str, dict[str, Baseline]] = {}
        for method in svf.baselines:
            for domain in svf.domains:
                tensors, meta = self._read(folder / method / domain)
                plan = BaselinePlan(**{**meta["plan"], "layers": tuple(meta["plan"]["layers"])})
                out.setdefault(method, {})[domain] = Baseline(plan, dict(tensors), meta)
        return out

    def report(self, run, artifact: dict[str, dict[str, Baseline]]) -> dict:
        return {method: {d: {k: b.meta[k] for k in ("parameters", "svf_parameters", "layers", "lr", "sweep",
                                                              "base_val_accuracy")}
                         for d, b in per.items()} for method, per in artifact.items()}


def train_baseline(run, model, tok, plan: BaselinePlan, domain: str, out: Path) -> None:
    """Train ``plan`` on ``domain`` once per ``svf.baseline_lrs``; keep the best on validation (``out/adapter.*``)."""
    svf, seed = run.cfg.svf, run.cfg.seed
    val = validation_items(svf, domain, seed)
    base_accuracy, base_loglik = validation_score(model, tok, val, svf, None)  # the adapters' starting point
    sweep, best = [], None
    for lr in svf.baseline_lrs:
        edit = PeftTrainable(model, plan)
        module, training = fit_reinforce(run, model, tok, domain, out / "checkpoints" / f"lr{lr:g}",
                                         f"{plan.method} {domain} lr={lr:g}", edit=edit, lr=lr)
        model.eval()
        accuracy, loglik = validation_score(model, tok, val, svf, edit)
        sweep.append({"lr": lr, "val_accuracy": accuracy, "val_loglik": round(loglik, 4), **training})
        if best is None or (accuracy, loglik) > best[0]:  # strict: ties keep the earlier lr
            best = ((accuracy, loglik), lr, edit.state())
        log.info("%s %s lr=%g: val accuracy %.3f, log-likelihood %.3f", plan.method, domain, lr, accuracy, loglik)
    _, lr, state = best
    meta = {"student": run.cfg.student.name, "domain": domain, "method": plan.method,
            "plan": {**dataclasses.asdict(plan), "layers": list(plan.layers)}, "parameters": plan.parameters,
            "svf_parameters": plan.budget, "layers": list(plan.layers), "lr": lr, "val_items": len(val),
            "base_val_accuracy": base_accuracy, "base_val_loglik": round(base_loglik, 4),
            "sweep": sweep, "objective": svf.objective}
    save_checkpoint(out, WEIGHTS_FILE, META_FILE, state, meta, ADAPTER_FORMAT, ADAPTER_VERSION)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
