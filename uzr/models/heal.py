"""Healing a pruned model: a short logit distillation from the unpruned model, cached as a checkpoint.

A model with ``<role>.prune.heal_steps`` > 0 (:class:`uzr.config.model.PruneSpec`) is trained, after pruning, toward
the next-token distributions of its own unpruned source (the same spec without ``prune``: same tokenizer, so the
distributions compare token for token). A step takes ``heal_texts`` training texts of the run (the ``data`` group's
train split, the harvest's texts; held-out texts stay unseen) in a fixed cyclic order, each cut at
``heal_max_length`` tokens and run on its own (no padding), and minimises the mean over their tokens of
``KL(full || pruned)`` (forward KL, as :mod:`uzr.adapters.distill` for SVF experts), by Adam at ``heal_lr``.

What trains (``heal_scope``): ``seam``, the kept layers next to each cut, which meet hidden states their training
never produced at their input or output; or ``all`` decoder layers. Embeddings (tied to the LM head in Gemma 3:
262k x 640) and the final norm stay the model's: updating the embedding matrix is most of a step's cost and would
move every token, and the cut is inside the stack.

A plain torch loop rather than a Lightning fit: a few dozen deterministic steps with no resume (the cached artifact
is the unit of reuse). The trained layers' weights are a safetensors checkpoint (:mod:`uzr.checkpoint`) in the cache
artifact ``heal/<key>``, keyed by the pruned spec (prune and heal settings), the data group and the harvest's
``max_length`` (they fix the texts); a second run loads it, checked against its sha256.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from uzr.attention import decoder_of
from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.config.keys import key_of
from uzr.config.model import ModelSpec, PruneSpec, model_key

log = logging.getLogger(__name__)

KIND, VERSION = "heal", 1  # the cache artifact; bump VERSION when what a heal writes changes meaning
FORMAT = "uzr.healed"
WEIGHTS, META = "healed.safetensors", "healed.json"


def seam_layers(kept: Sequence[int], num_layers: int) -> list[int]:
    """The pruned model's layers next to a cut: for each run of dropped source layers, the kept layer before it and
    the one after it (``kept``: the source layer of each pruned-model layer, of a ``num_layers``-layer source)."""
    seam = set()
    for i, source in enumerate(kept):
        if (i == 0 and source > 0) or (i > 0 and source - kept[i - 1] > 1):  # a cut just below layer i
            seam |= {i - 1, i} if i > 0 else {i}
    if kept[-1] < num_layers - 1:  # a cut above the last kept layer
        seam.add(len(kept) - 1)
    return sorted(seam)


def trained_layers(spec: ModelSpec) -> list[int]:
    """The pruned model's layers a heal of ``spec`` trains (``prune.heal_scope``)."""
    if spec.prune.heal_scope == "all":
        return list(range(spec.loaded_layers))
    return seam_layers(spec.kept_layers, spec.num_layers)


def layer_parameters(model, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    """The parameters of decoder ``layers`` by their names in ``model.state_dict()``."""
    wanted = {id(p) for i in layers for p in decoder_of(model).layers[i].parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def next_token_kl(full, pruned, ids: Tensor) -> Tensor:
    """Sum over the positions of ``ids`` (1, S) of ``KL(full || pruned)`` of the next-token distributions."""
    with torch.no_grad():
        target = torch.log_softmax(full(input_ids=ids).logits[0].float(), dim=-1)  # (S, V)
    student = torch.log_softmax(pruned(input_ids=ids).logits[0].float(), dim=-1)  # (S, V)
    return torch.sum(target.exp() * (target - student))


def heal(pruned, full, texts: Sequence[Tensor], layers: Sequence[int], steps: int, lr: float,
         per_step: int) -> list[float]:
    """Train decoder ``layers`` of ``pruned`` toward ``full`` for ``steps`` Adam steps; returns each step's KL
    (nats per token, before its update). ``texts``: token ids (1, S_i), taken ``per_step`` at a time in cyclic order.
    The parameters are frozen again afterwards."""
    params = layer_parameters(pruned, layers)
    for p in params.values():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    history = []
    try:
        for step in range(steps):
            batch = [texts[(step * per_step + j) % len(texts)] for j in range(per_step)]
            tokens = sum(ids.shape[1] for ids in batch)
            optimiser.zero_grad(set_to_none=True)
            total = 0.0
            for ids in batch:  # one text at a time: no padding, and one (S, V) logits tensor alive at once
                loss = next_token_kl(full, pruned, ids) / tokens
                loss.backward()
                total += float(loss.detach())
            optimiser.step()
            history.append(total)
            log.info("heal step %d/%d: KL to the unpruned model %.4f nats per token", step + 1, steps, total)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return history


def heal_texts(texts: Sequence[str], tokenizer, max_length: int) -> list[Tensor]:
    """Each text's token ids (1, S <= max_length), texts of fewer than 2 tokens left out."""
    out = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return [ids for ids in out if ids.shape[1] >= 2]


def heal_key(spec: ModelSpec, cfg) -> dict:
    """What determines the healed weights: the pruned spec with its heal settings, and the texts (data, max_length)."""
    return {"model": model_key(spec), "data": key_of(cfg.data, "harvest"), "max_length": cfg.harvest.max_length}


def load_healed(model, folder: Path, spec: ModelSpec) -> dict:
    """Put the healed weights of ``folder`` into ``model`` (pruned as ``spec`` says); returns the checkpoint's
    metadata. Fails naming the checkpoint when it was made for another spec or its weights are not all the model's."""
    hint = f"delete {folder} and run again to heal it anew"
    tensors, meta = load_checkpoint(folder, WEIGHTS, META, FORMAT, VERSION, expected={"model": model_key(spec)},
                                    rebuild_hint=hint)
    missing = sorted(set(tensors) - set(model.state_dict()))
    if missing:
        raise ValueError(f"{folder / WEIGHTS} holds weights the model lacks ({missing[:3]}); {hint}")
    model.load_state_dict(tensors, strict=False)
    return meta


def healed(model, tokenizer, spec: ModelSpec, cfg, artifact: Callable, load_full: Callable, role: str) -> dict:
    """Heal the pruned ``model`` in place as ``spec.prune`` says, or load the cached heal; returns the record (also
    in ``model.config.uzr_prune["heal"]``). ``artifact``: :meth:`uzr.runner.RunContext.artifact`; ``load_full(spec)``
    loads a model (the unpruned source when building)."""
    from uzr.corpus import load_run_corpus  # datasets: only when a heal is built or loaded

    def build(folder: Path) -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        full, _ = load_full(replace(spec, prune=PruneSpec()))
        corpus = load_run_corpus(cfg.data, lambda: tokenizer, cfg.harvest.max_length)
        texts = heal_texts(corpus.train["text"], tokenizer, spec.prune.heal_max_length)
        if not texts:
            raise ValueError(f"{role}.prune.heal_steps={spec.prune.heal_steps}: the data group has no training text "
                             "of 2 or more tokens to heal on")
        layers = trained_layers(spec)
        history = heal(model, full, texts, layers, spec.prune.heal_steps, spec.prune.heal_lr, spec.prune.heal_texts)
        seconds = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        meta = {"model": model_key(spec), "layers": layers, "kl_per_step": history, "texts": len(texts), **seconds}
        save_checkpoint(folder, WEIGHTS, META, layer_parameters(model, layers), meta, FORMAT, VERSION)
        return {"kl_first": history[0], "kl_last": history[-1], **seconds}

    folder, built = artifact(KIND, heal_key(spec, cfg), build, version=VERSION)
    meta = load_healed(model, folder, spec)
    record = {"layers": meta["layers"], "steps": len(meta["kl_per_step"]), "kl_first": meta["kl_per_step"][0],
              "kl_last": meta["kl_per_step"][-1], "built": built, "path": str(folder)}
    model.config.uzr_prune["heal"] = record
    log.info("%s: healed layers %s (%d steps, KL %.4f -> %.4f nats per token)%s", role, record["layers"],
             record["steps"], record["kl_first"], record["kl_last"], "" if built else f", loaded from {folder}")
    return record
