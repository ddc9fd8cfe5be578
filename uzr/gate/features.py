"""Gate inputs from the student side only (the teacher is absent at run time)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from uzr.attention import attention_modules, decoder_of
from uzr.config.gate import (
    FEATURES,
)
from uzr.controller.archs import mean_row_logprobs
from uzr.hooks import capture_inputs
from uzr.masks import causal_mask, normalised_entropy, pad_sequences
from uzr.models import model_device
from uzr.next_token import next_token_stats

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

def controllers_on(controllers: Mapping, device) -> dict[int, nn.Module]:
    return {int(k): v.to(device).eval() for k, v in controllers.items()}


@torch.no_grad()
def sequence_parts(student, controllers: Mapping, sequences: Sequence, layers: Sequence[int],
                   batch_size: int = 8, with_nll: bool = False, desc: str | None = None) -> list[dict[str, Tensor]]:
    """One uninjected student pass per sequence of token ids; per sequence (length S) a dict of CPU
    float32 tensors: ``hidden`` (S, len(layers)*D), ``ctrl_entropy`` and ``ctrl_peak`` (S, len(layers)),
    ``student_entropy`` (S, 1) and, with ``with_nll``, ``nll`` (S-1,) of tokens 1..S-1. ``desc``: label of a
    progress bar counting sequences (None: no bar)."""
    device = model_device(student)
    ctrls = controllers_on(controllers, device)
    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in ctrls]
    if missing:
        raise ValueError(f"no controller for injected layer(s) {missing}; controllers cover {sorted(ctrls)}")
    modules = attention_modules(student)
    results: list[dict[str, Tensor]] = []
    bar = tqdm(total=len(sequences), desc=desc, unit="text", leave=False, disable=desc is None)
    with bar, capture_inputs({x: modules[x] for x in layers}) as captured:
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_sequences(sequences[start:start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            final = decoder_of(student)(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, S, D)
            targets = torch.roll(ids, -1, 1) if with_nll else None
            nt = next_token_stats(student, final, targets)
            allowed = causal_mask(mask)  # (B, S, S)
            n_keys = allowed.sum(-1)  # (B, S)
            ent_cols, peak_cols, hidden_cols = [], [], []
            for layer in layers:
                h = captured[layer].float()  # (B, S, D)
                logp = mean_row_logprobs(ctrls[layer](h), allowed)  # (B, S, S); per-head: the heads' mean
                p = logp.exp() * allowed
                ent_cols.append(normalised_entropy(-(p * logp).sum(-1), n_keys))  # (B, S)
                peak_cols.append(p.amax(-1))
                hidden_cols.append(h)
            parts = {
                "hidden": torch.cat(hidden_cols, -1), "ctrl_entropy": torch.stack(ent_cols, -1),
                "ctrl_peak": torch.stack(peak_cols, -1), "student_entropy": nt["entropy"][..., None],
            }
            for b in range(ids.shape[0]):
                n = int(mask[b].sum())
                row = {k: v[b, :n].float().cpu() for k, v in parts.items()}
                if with_nll:
                    row["nll"] = nt["nll"][b, : n - 1].float().cpu()
                results.append(row)
            bar.update(ids.shape[0])
    return results


def feature_names(layers: Sequence[int], hidden_size: int, features: Sequence[str], pool: str) -> list[str]:
    base = []
    for name in FEATURES:  # fixed order, whatever order the config lists them in
        if name not in features:
            continue
        if name == "hidden":
            base += [f"hidden_L{layer}[{i}]" for layer in layers for i in range(hidden_size)]
        elif name == "student_entropy":
            base.append("student_entropy")
        else:
            base += [f"{name}_L{layer}" for layer in layers]
    prefixes = {"current": ["cur:"], "mean": ["mean:"], "both": ["cur:", "mean:"]}[pool]
    return [p + n for p in prefixes for n in base]


def token_matrix(parts: Mapping[str, Tensor], features: Sequence[str]) -> Tensor:
    """(S, F) concatenation of the selected parts, in the fixed order of :data:`FEATURES`."""
    return torch.cat([parts[name] for name in FEATURES if name in features], -1)


def pool_prefix(x: Tensor, pool: str) -> Tensor:
    """(S, F) per-position features -> (S, F') gate inputs: the position itself, the running mean over
    positions 0..i (causal), or both concatenated."""
    if pool == "current":
        return x
    mean = x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]
    return mean if pool == "mean" else torch.cat([x, mean], -1)


def gate_features(student, tokenizer, controllers: Mapping, texts_or_rows: Sequence, layers: Sequence[int],
                  features: Sequence[str] = FEATURES, pool: str = "both", batch_size: int = 8) -> list[Tensor]:
    """Gate inputs from the student side only, one (S_i, F) float32 tensor per text or store row.

    ``texts_or_rows``: strings (tokenised with ``tokenizer``, special tokens added) or store rows
    (their ``input_ids``). Row ``i`` of a result is the gate input at position ``i`` (causal); a
    prompt's vector is the last row. Column names: :func:`feature_names`.
    """
    seqs = [token_ids(tokenizer, item) for item in texts_or_rows]
    parts = sequence_parts(student, controllers, seqs, layers, batch_size)
    return [pool_prefix(token_matrix(p, features), pool) for p in parts]


def prompt_gate_values(gate, student, tokenizer, controllers: Mapping, texts: Sequence[str], layers: Sequence[int],
                       add_special_tokens: bool = True) -> list[float]:
    """The gate's value of each formatted prompt in ``texts`` (at its last token), from an uninjected student pass."""
    parts = sequence_parts(student, controllers, [token_ids(tokenizer, t, add_special_tokens) for t in texts], layers)
    return [gate.prompt_value(p) for p in parts]


def gate_positions(gate, student, controllers: Mapping, input_ids, layers: Sequence[int]) -> Tensor:
    """Gate value at every position of one sequence, shaped (1, S) for ``Injector.gate`` (schedule
    ``gated``, teacher-forced passes such as bits per byte); from an uninjected student pass."""
    ids = [int(t) for t in torch.as_tensor(np.asarray(input_ids)).reshape(-1)]
    return gate.positions(sequence_parts(student, controllers, [ids], layers)[0])[None]


def token_ids(tokenizer, item, add_special_tokens: bool = True) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"])
    return [int(t) for t in np.asarray(item["input_ids"]).reshape(-1)]
