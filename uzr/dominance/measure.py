"""One sample through one model: a greedy answer, then one recorded forward with group masses per layer.

Generated-token queries (the paper's setting) are measured in two steps: the model answers greedily
(``model.generate``, bounded by ``max_new_tokens``; an injector, if any, attached while it answers), then
one forward pass over prompt + answer runs with the :class:`GroupMass` reducer on
every layer, and the rows of the answer tokens are the queries. Under causal attention that row sees
exactly what the model saw when it read the token, so the masses equal those of decoding step by step
without storing a KV-cache's worth of attention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from uzr.attention import LayerRecorder, ScoreBlock, attention_modules, recording
from uzr.dominance.groups import indicator
from uzr.hooks import ModelEdit, injected

EditFactory = Callable[[int | None], ModelEdit | None]  # prompt_len -> a fresh edit (None: the plain model)


@dataclass
class Recorded:
    """What one model did on one sample."""

    answer_ids: list[int]  # generated tokens (stop token included when it came)
    row_mass: np.ndarray  # (L, S, G) head-averaged mass of every query row on every key group
    n_prompt: int  # prompt tokens (answer rows are n_prompt..S-1)


class GroupMass:
    """Attention mass of every (batch, head, query) row on each group of keys (DESIGN.md §9, MDI / AEI).

    Args:
        groups: (B or 1, K, G) float32 indicator of the call's keys (KV cache included, ``K = k_len``):
            ``groups[b, j, g] = 1`` when key ``j`` belongs to group ``g``; a key in no group (BOS,
            padding, chat markers) has a zero row. Set ``.groups`` before each forward pass.

    Each block costs one matmul of its unnormalised probabilities with the block's slice of the indicator,
    ``(B, H, n, w) @ (B, 1, w, G)``, scaled by ``1 / Z``: no attention map is kept, so memory is that of
    the block plus the (B, H, q, G) result. Result: (B, H, q, G) float32; rows without allowed keys (or
    with non-finite scores) are 0.
    """

    name = "group_mass"
    query_dim = -2

    def __init__(self, groups: torch.Tensor | None = None):
        self.groups = groups
        self.out: torch.Tensor | None = None

    def start(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        if self.groups is None or self.groups.shape[-2] != k_len:
            have = None if self.groups is None else tuple(self.groups.shape)
            raise ValueError(f"GroupMass: the key-group indicator must cover the call's {k_len} keys, got {have} "
                             "(one recorded forward over the whole sequence, not cached decoding steps)")
        self.groups = self.groups.to(device=device, dtype=torch.float32)
        self.out = torch.zeros(batch, heads, q_len, self.groups.shape[-1], device=device)  # (B, H, q, G)

    def add(self, block: ScoreBlock) -> None:
        onehot = self.groups[:, None, block.lo:block.hi]  # (B|1, 1, w, G)
        mass = torch.matmul(block.e, onehot)  # (B, H, n, G)
        self.out[:, :, block.start:block.stop] = mass * block.inv_z[..., None]

    def finish(self) -> torch.Tensor:
        out, self.out = self.out, None
        return out


def _extend(inputs: Mapping[str, torch.Tensor], answer: torch.Tensor) -> dict:
    """``inputs`` with ``answer`` (1, T) appended to ``input_ids`` and ``attention_mask``."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], answer], 1)
    if "attention_mask" in inputs:
        out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], 1)
    return out


@torch.no_grad()
def greedy_answer(model, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, pad_id: int | None,
                  edit: ModelEdit | None = None) -> list[int]:
    """Greedy answer ids (bounded by ``max_new_tokens``) of one prompt (batch 1)."""
    if max_new_tokens == 0:
        return []
    with injected(model, edit):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False,
                             pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def record_masses(model, inputs: Mapping[str, torch.Tensor], labels: np.ndarray, n_groups: int, block_size: int,
                  edit: ModelEdit | None = None) -> np.ndarray:
    """(L, S, G) head-averaged attention mass of every row on each labelled key group, every layer, from one
    forward of ``model.base_model`` (no LM head) with the GroupMass reducer; ``labels`` (S,) as in
    :mod:`uzr.dominance.groups`."""
    groups = indicator(labels, n_groups).to(inputs["input_ids"].device)
    recorders = {index: LayerRecorder(reducers=[GroupMass(groups)], block_size=block_size)
                 for index in range(len(attention_modules(model)))}
    with recording(model, recorders), injected(model, edit):
        model.base_model(**inputs, use_cache=False)
    masses = [recorder.take()[GroupMass.name][0].mean(0) for recorder in recorders.values()]  # (S, G) each
    bad = [index for index, recorder in recorders.items() if recorder.nonfinite_rows]
    if bad:
        raise FloatingPointError(f"non-finite attention scores at layer(s) {bad}; check the model's dtype")
    return torch.stack(masses).cpu().numpy().astype(np.float64)


def run_sample(model, inputs: Mapping[str, torch.Tensor], label_fn: Callable[[list[int]], np.ndarray],
               n_groups: int, *, max_new_tokens: int, block_size: int, pad_id: int | None,
               make_edit: EditFactory | None = None) -> Recorded:
    """Answer greedily, label prompt + answer with ``label_fn(answer_ids)``, record the group masses."""
    make_edit = make_edit or (lambda prompt_len: None)
    n_prompt = inputs["input_ids"].shape[1]
    answer = greedy_answer(model, inputs, max_new_tokens, pad_id, make_edit(None))
    full = _extend(inputs, torch.tensor([answer], dtype=torch.long, device=inputs["input_ids"].device))
    labels = label_fn(answer)
    if len(labels) != full["input_ids"].shape[1]:
        raise ValueError(f"dominance: {len(labels)} token labels for {full['input_ids'].shape[1]} tokens")
    mass = record_masses(model, full, labels, n_groups, block_size, make_edit(n_prompt))
    return Recorded(answer, mass, n_prompt)
