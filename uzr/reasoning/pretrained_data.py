"""The pretrained ablation's data and its cached prefix (sub-artifact ``lru_mla_prefix``).

Items: causal-loop training and held-out items (:func:`uzr.reasoning.training.task_texts`, held-out prompts seen in
training dropped) in the student's tokens; few-shot prompts of the first ``fewshot_items`` held-out items with
``k`` demonstrations for each ``k`` of ``fewshot_shots``; held-out pydoc texts for bits per byte.

The prefix artifact holds the frozen lower layers' output (:mod:`uzr.reasoning.prefix`) of all of them, float32,
flattened per split (``<split>.states`` (tokens, d) and ``<split>.lengths``); every group reads it. Its key is
what the states depend on: the student, the task settings, the split sizes, the few-shot settings and where the
top starts, not the groups' training settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from uzr.config.corpus import CorpusSpec
from uzr.config.keys import key_of
from uzr.corpus import load_corpus
from uzr.reasoning.groups import HELDOUT_SEED_OFFSET
from uzr.reasoning.prefix import fewshot_states, lower_stack, prefix_states
from uzr.reasoning.pretrained_items import (
    TokenItems,
    demo_block,
    demonstrations,
    encode,
    fewshot_items,
    subset,
)
from uzr.reasoning.training import task_texts
from uzr.text_bytes import token_bytes
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)
PREFIX_KIND = "lru_mla_prefix"
PREFIX_VERSION = 1


@dataclass
class PretrainedData:
    """Items and the lower layers' states of each (one (S_i, d) tensor per item)."""

    train: TokenItems
    heldout: TokenItems
    fewshot: dict[int, TokenItems]  # k -> the few-shot questions with k demonstrations
    bpb_ids: list[list[int]]  # held-out texts for bits per byte
    bpb_bytes: list[int]  # their predicted UTF-8 bytes
    states: dict[str, list[Tensor]]  # "train", "heldout", "fewshot_<k>", "bpb"
    demos: list[int]  # training indices of the demonstrations (k shots: the first k)
    prefix_seconds: dict  # wall and CPU seconds of computing the states (0 when reused)


def items(spec, tokenizer, seed: int) -> tuple[TokenItems, TokenItems, dict[int, TokenItems], list[int]]:
    """(train, held-out, few-shot prompts by k, demonstration indices)."""
    p = spec.pretrained
    prompts, answers, levels, seen = task_texts(spec, p.train_items, seed)
    train = encode(tokenizer, prompts, answers, levels)
    prompts, answers, levels, _ = task_texts(spec, p.eval_items, seed + HELDOUT_SEED_OFFSET, exclude=seen)
    heldout = encode(tokenizer, prompts, answers, levels)
    questions = subset(heldout, p.fewshot_items)
    demos = demonstrations(train, max(p.fewshot_shots), seed, exclude=set(questions.prompts))
    return train, heldout, {k: fewshot_items(train, demos[:k], questions) for k in p.fewshot_shots}, demos


def bpb_texts(spec, tokenizer) -> tuple[list[list[int]], list[int]]:
    """Ids and predicted bytes of ``bpb_texts`` held-out pydoc texts, each cut at ``bpb_max_tokens`` tokens."""
    p = spec.pretrained
    texts = load_corpus(CorpusSpec()).heldout["text"][:p.bpb_texts]
    ids, nbytes = [], []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(enc["input_ids"][:p.bpb_max_tokens])
        nbytes.append(sum(token_bytes(text, [tuple(o) for o in enc["offset_mapping"][:p.bpb_max_tokens]])))
    return ids, nbytes


def prefix_payload(cfg) -> dict:
    s, p = cfg.lru_mla, cfg.lru_mla.pretrained
    task = {k: getattr(s, k) for k in ("levels", "max_vars", "max_rounds", "answer_order")}
    sizes = {k: getattr(p, k) for k in ("top_layers", "train_items", "eval_items", "fewshot_shots", "fewshot_items",
                                        "bpb_texts", "bpb_max_tokens")}
    return {"task": task, "sizes": sizes, "seed": cfg.seed, "student": key_of(cfg.student, PREFIX_KIND)}


def _flat(states: list[Tensor], name: str) -> dict[str, Tensor]:
    return {f"{name}.states": torch.cat(states).contiguous(),
            f"{name}.lengths": torch.tensor([len(s) for s in states], dtype=torch.long)}


def _unflat(tensors: dict[str, Tensor], name: str) -> list[Tensor]:
    return list(torch.split(tensors[f"{name}.states"], tensors[f"{name}.lengths"].tolist()))


def load_data(run, model, tokenizer) -> PretrainedData:
    """Items regenerated from the seed and their states from the prefix artifact (computed when missing)."""
    spec, seed = run.cfg.lru_mla, run.cfg.seed
    train, heldout, fewshot, demos = items(spec, tokenizer, seed)
    bpb_ids, bpb_bytes = bpb_texts(spec, tokenizer)
    timing = {"seconds": 0.0, "cpu_seconds": 0.0}

    def build(folder: Path) -> dict:
        clock = Stopwatch()
        lower = lower_stack(model, spec.pretrained.top_layers)
        tensors = {**_flat(prefix_states(lower, train.ids), "train"), **_flat(prefix_states(lower, heldout.ids),
                                                                               "heldout"),
                   **_flat(prefix_states(lower, bpb_ids), "bpb")}
        questions = subset(heldout, spec.pretrained.fewshot_items)
        for k in fewshot:
            demo, rest = fewshot_states(lower, demo_block(train, demos[:k]), questions.ids)
            tensors.update(_flat([torch.cat([demo, q]) if len(demo) else q for q in rest], f"fewshot_{k}"))
        save_file(tensors, str(folder / "prefix.safetensors"))
        timing.update(clock.read())
        log.info("lru_mla_pretrained: lower-layer states of %d items in %.0f s", len(train) + len(heldout),
                 timing["seconds"])
        return {"prefix_seconds": clock.read()}

    folder, _ = run.artifact(PREFIX_KIND, prefix_payload(run.cfg), build, version=PREFIX_VERSION)
    tensors = load_file(str(folder / "prefix.safetensors"))
    names = ["train", "heldout", "bpb", *(f"fewshot_{k}" for k in fewshot)]
    return PretrainedData(train, heldout, fewshot, bpb_ids, bpb_bytes, {n: _unflat(tensors, n) for n in names},
                          demos, timing)
