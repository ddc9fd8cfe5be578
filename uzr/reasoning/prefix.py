"""The frozen lower layers of the pretrained student, run once per item (the pretrained LRU/MLA ablation).

Below the trained top the student is frozen, so the hidden state entering the top is a pure function of the
tokens: :func:`lower_stack` is the student's decoder cut after its first ``L - top_layers`` layers (final norm
left out), run through its ordinary forward; :func:`prefix_states` computes those states once per sequence and
every group's every step reads them. Few-shot prompts share their demonstrations: :func:`fewshot_states` runs the
demonstration block once, repeats its KV cache over the questions and runs only the questions on top of it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from uzr.attention import decoder_of
from uzr.masks import pad_sequences


def lower_stack(model, top_layers: int) -> nn.Module:
    """The student's decoder without its last ``top_layers`` layers and its final norm (sharing the weights):
    ``lower(input_ids=..., attention_mask=...).last_hidden_state`` (B, S, d) is what enters the top."""
    decoder = decoder_of(model)
    lower = copy.copy(decoder)
    lower._modules = dict(decoder._modules)  # a shallow copy shares the module dict: give it its own
    lower.layers = nn.ModuleList(list(decoder.layers)[:len(decoder.layers) - top_layers])
    lower.norm = nn.Identity()
    return lower


@torch.no_grad()
def prefix_states(lower: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                  pad_id: int = 0) -> list[Tensor]:
    """The lower stack's output for each token sequence: one (S_i, d) float32 tensor per sequence (right-padded
    batches of similar lengths; a real position never attends to the padding after it)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_sequences([list(sequences[i]) for i in rows], pad_id)
        hidden = lower(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (b, S, d)
        for b, i in enumerate(rows):
            out[i] = hidden[b, :len(sequences[i])].clone()
    return out


@torch.no_grad()
def fewshot_states(lower: nn.Module, demos: Sequence[int], questions: Sequence[Sequence[int]],
                   pad_id: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``(demonstrations (D, d), [question i (Q_i, d)])``: the lower stack's output over ``demos + question_i``,
    the demonstrations run once (their KV cache repeated for every question). No demonstrations: plain
    :func:`prefix_states`."""
    if not demos:
        return torch.zeros(0, 0), prefix_states(lower, questions, pad_id=pad_id)
    first = lower(input_ids=torch.tensor([list(demos)]), use_cache=True)
    cache = first.cache
    cache.batch_repeat_interleave(len(questions))
    ids, mask = pad_sequences([list(q) for q in questions], pad_id)
    full = torch.cat([torch.ones(len(questions), len(demos), dtype=torch.long), mask.long()], 1)
    hidden = lower(input_ids=ids, attention_mask=full, cache=cache, use_cache=True).last_hidden_state
    return first.last_hidden_state[0].float(), [hidden[b, :len(q)].float() for b, q in enumerate(questions)]
