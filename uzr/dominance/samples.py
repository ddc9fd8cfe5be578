"""The samples of a dominance run: model inputs plus the token labels of their key groups.

Each sample yields, per model, ``inputs`` (batch-1 tensors for ``generate`` and the forward pass) and a
``label_fn(answer_ids)`` giving the base-group label of every token of prompt + answer (see
:mod:`uzr.dominance.groups`). A *split* then names which base groups form T and O and which rows are
queries:

- text (``dominance.source=text``): base groups ``instruction``, ``passage``, ``answer``. The prompt is
  ``passage + "\\n\\n" + instruction`` (the passage first, like the image before the question of a
  vision-language prompt), inside the chat template when the tokenizer has one.
  ``instruction_passage``: T = instruction, O = passage. ``prompt_answer``: T = instruction + passage,
  O = the model's own answer (queries: always the answer rows, the prompt cannot see the answer).
- vision (``mmmu_pro`` / ``synthetic``): base groups ``text`` (the user prompt's characters), ``image``
  (the image tokens), ``answer``. ``text_image``: T = text, O = image.

Queries: ``generated`` = the answer's non-special tokens; ``prompt`` = the prompt's T tokens of the split
(the instruction; the text of a vision prompt). Template text (system prompts, "USER:"), BOS and every
special token are in no group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from uzr.dominance.groups import NEITHER, image_labels, image_token_id, span_labels, special_flags

TEXT_GROUPS = ("instruction", "passage", "answer")
VISION_GROUPS = ("text", "image", "answer")

# Instructions rotated over the passages (the passage comes first in the prompt).
INSTRUCTIONS = (
    "Summarise the passage above in one sentence.",
    "What is the main topic of the passage above? Answer briefly.",
    "Name one technical term used in the passage above and explain it.",
    "Write a short question that the passage above answers.",
)


@dataclass(frozen=True)
class Split:
    name: str
    t: tuple[str, ...]  # base groups forming T
    o: tuple[str, ...]  # base groups forming O
    prompt_queries: tuple[str, ...] | None  # query groups for queries=prompt (None: always the answer)


SPLITS = {s.name: s for s in (
    Split("instruction_passage", ("instruction",), ("passage",), ("instruction",)),
    Split("prompt_answer", ("instruction", "passage"), ("answer",), None),
    Split("text_image", ("text",), ("image",), ("text",)),
)}
TEXT_SPLITS = ("instruction_passage", "prompt_answer")
VISION_SPLITS = ("text_image",)


@dataclass
class Prepared:
    """One sample for one model."""

    inputs: dict  # batch-1 tensors (input_ids, attention_mask, pixel_values, ...)
    label_fn: Callable[[list[int]], np.ndarray]  # answer ids -> (S,) base-group labels of prompt + answer
    groups: tuple[str, ...]  # base-group names (label i = groups[i])


def _answer_labels(answer: Sequence[int], tokenizer, answer_group: int) -> np.ndarray:
    return np.array([NEITHER if sp else answer_group for sp in special_flags(answer, tokenizer)], dtype=np.int64)


def cut_passage(text: str, max_chars: int) -> str:
    """The passage, cut at the last whitespace before ``max_chars`` characters."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def format_text_prompt(tokenizer, passage: str, instruction: str) -> tuple[str, dict[str, tuple[int, int]], bool]:
    """(prompt, character spans of instruction and passage in it, add_special_tokens)."""
    content = f"{passage}\n\n{instruction}"
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        special = False  # the template writes its own BOS
    else:
        prompt, special = f"{content}\nAnswer:", True
    start = prompt.find(content)
    if start < 0:
        raise ValueError("dominance: the chat template changed the prompt's text; cannot find its character spans")
    spans = {"passage": (start, start + len(passage)),
             "instruction": (start + len(passage) + 2, start + len(content))}
    return prompt, spans, special


def text_sample(tokenizer, passage: str, instruction: str, device="cpu") -> Prepared:
    """A text sample: passage and instruction spans mapped to tokens through the tokenizer's offsets."""
    import torch

    prompt, spans, special = format_text_prompt(tokenizer, passage, instruction)
    enc = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
    ids = enc["input_ids"]
    prompt_labels = span_labels(enc["offset_mapping"], special_flags(ids, tokenizer),
                                [[spans[name]] for name in TEXT_GROUPS[:2]])
    inputs = {"input_ids": torch.tensor([ids], device=device),
              "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device)}

    def label_fn(answer: list[int]) -> np.ndarray:
        return np.concatenate([prompt_labels, _answer_labels(answer, tokenizer, 2)])

    return Prepared(inputs, label_fn, TEXT_GROUPS)


def vision_prompt_text(processor, prompt: str) -> str:
    """The formatted prompt with one image placeholder: the processor's chat template, else LLaVA-1.5's."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"USER: {processor.image_token}\n{prompt} ASSISTANT:"


def vision_sample(processor, config, image, prompt: str, device="cpu", dtype=None) -> Prepared:
    """A vision-language sample: image tokens (id from the config) vs the user prompt's text tokens.

    The processor expands the image placeholder into one token per image feature (576 for LLaVA-1.5 at
    336 px, a per-image count for Qwen2.5-VL); the text labels come from the tokenizer's offsets on the
    unexpanded prompt, then the placeholder's label is repeated over its expansion.
    """
    text = vision_prompt_text(processor, prompt)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = image_token_id(config)
    tok = processor.tokenizer
    enc = tok(text, return_offsets_mapping=True)
    start = text.find(prompt)
    base = span_labels(enc["offset_mapping"], special_flags(enc["input_ids"], tok), [[(start, start + len(prompt))]])
    labels = _expand_image_labels(enc["input_ids"], base, ids, image_id)
    specials = special_flags(ids, tok)
    check = image_labels(ids, image_id, specials)
    labels[check == 1] = 1  # every image token is O, wherever the processor put it
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and dtype is not None else v.to(device))
              for k, v in inputs.items()}

    def label_fn(answer: list[int]) -> np.ndarray:
        return np.concatenate([labels, _answer_labels(answer, tok, 2)])

    return Prepared(dict(inputs), label_fn, VISION_GROUPS)


def _expand_image_labels(short_ids: Sequence[int], short_labels: np.ndarray, ids: Sequence[int],
                         image_id: int) -> np.ndarray:
    """Labels of ``ids`` (image placeholder expanded) from those of ``short_ids`` (one placeholder per image)."""
    out = np.full(len(ids), NEITHER, dtype=np.int64)
    i = 0
    for k, token in enumerate(short_ids):
        if token == image_id:
            while i < len(ids) and ids[i] == image_id:
                out[i] = 1
                i += 1
            continue
        if i >= len(ids) or ids[i] != token:
            raise ValueError("dominance: the processor's tokens differ from the tokenizer's beyond the image "
                             f"placeholder (position {k}); cannot map the prompt's text spans")
        out[i] = short_labels[k]
        i += 1
    if i != len(ids):
        raise ValueError(f"dominance: {len(ids) - i} processor tokens left unmatched after the prompt")
    return out


def synthetic_images(n: int, size: int, seed: int) -> list:
    """``n`` seeded random RGB images (PIL), for offline runs of the vision path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
