"""Token groups for the dominance indices: which keys count as T ("text") and which as O ("other").

A token's group is a label: 0 = T, 1 = O, -1 = neither. Special tokens (BOS, padding, end of turn, the
tokenizer's special ids such as chat markers) and tokens outside every span are in neither group.

- Text groups come from character spans of the formatted prompt (instruction, passage, ...), mapped
  through the fast tokenizer's offsets: a token joins the group whose spans cover most of its
  characters (a tie, or no overlap, leaves it in neither).
- Image groups come from the model's image-token id (``image_token_index`` of LLaVA-style configs,
  ``image_token_id`` of Qwen2.5-VL-style ones; the processor expands one placeholder into as many
  tokens as the image has features, so the count is per sample).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEITHER = -1


def span_labels(offsets: Sequence[tuple[int, int]], special: Sequence[bool],
                spans: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray:
    """(S,) labels: for each token, the index of the group (in ``spans`` order) whose character spans cover
    most of it; ``NEITHER`` for specials, zero-width tokens, ties and tokens outside every span."""
    labels = np.full(len(offsets), NEITHER, dtype=np.int64)
    for k, ((s, e), sp) in enumerate(zip(offsets, special)):
        if sp or e <= s:
            continue
        cover = [sum(max(0, min(e, b) - max(s, a)) for a, b in group) for group in spans]
        best = max(cover)
        if best > 0 and cover.count(best) == 1:
            labels[k] = cover.index(best)
    return labels


def special_flags(ids: Sequence[int], tokenizer) -> list[bool]:
    """True for the tokenizer's special ids (BOS, EOS, padding, chat markers, image placeholders)."""
    specials = set(tokenizer.all_special_ids)
    return [int(i) in specials for i in ids]


def image_token_id(config) -> int:
    """The id of the image placeholder token of a vision-language config (LLaVA: ``image_token_index``,
    Qwen2.5-VL: ``image_token_id``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} has neither image_token_id nor image_token_index: not a "
                     "vision-language model uzr knows how to split into image and text tokens")


def image_labels(ids: Sequence[int], image_id: int, special: Sequence[bool]) -> np.ndarray:
    """(S,) labels: image tokens O (1), other non-special tokens T (0), specials neither."""
    ids = np.asarray(ids)
    labels = np.where(ids == image_id, 1, 0)
    labels[np.asarray(special, dtype=bool) & (ids != image_id)] = NEITHER
    return labels


def require_groups(labels: np.ndarray, names: Sequence[str], where: str) -> None:
    """Raise a ValueError naming every group with no token (an index over an empty group is undefined)."""
    empty = [name for g, name in enumerate(names) if not (labels == g).any()]
    if empty:
        raise ValueError(f"dominance: group {' and '.join(repr(n) for n in empty)} has no tokens in {where} "
                         f"(groups {list(names)}; special tokens belong to neither group)")


def indicator(labels: np.ndarray, n_groups: int = 2):
    """(1, S, G) float32 torch indicator of the labelled keys (the :class:`GroupMass` input)."""
    import torch

    labels = torch.as_tensor(labels)
    onehot = torch.zeros(labels.shape[0], n_groups)
    keep = labels >= 0
    onehot[keep, labels[keep]] = 1.0
    return onehot[None]
