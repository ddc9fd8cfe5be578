"""Where a dominance run's samples come from, and the vision-language processor.

- ``text``: passages = the held-out texts of the ``data`` group (cut at ``dominance.max_passage_chars``),
  each with one of the built-in instructions (:data:`uzr.dominance.samples.INSTRUCTIONS`, rotated);
- ``mmmu_pro``: MMMU-Pro (``dominance.hub_id``/``hub_config``/``hub_split``, default the ``vision``
  config: the question and options are inside the image) through ``datasets``; the text prompt is
  ``dominance.prompt``; needs the hub or a local datasets cache;
- ``synthetic``: seeded random images with ``dominance.prompt`` (offline runs of the vision path).
"""

from __future__ import annotations

import numpy as np

from uzr.corpus import load_corpus
from uzr.dominance.samples import INSTRUCTIONS, cut_passage, synthetic_images
from uzr.models import TINY_IMAGE_SIZE, TINY_PATCH_SIZE


def text_items(cfg) -> list[tuple[str, str]]:
    """(passage, instruction) pairs from the data group's held-out split."""
    d = cfg.dominance
    texts = list(load_corpus(cfg.data).heldout["text"])
    if len(texts) < d.num_samples:
        raise ValueError(f"dominance.num_samples={d.num_samples} but data '{cfg.data.name}' has {len(texts)} held-out "
                         "texts; raise data.num_texts or lower dominance.num_samples")
    order = np.random.default_rng(d.seed).permutation(len(texts))[: d.num_samples]
    return [(cut_passage(texts[i], d.max_passage_chars), INSTRUCTIONS[k % len(INSTRUCTIONS)])
            for k, i in enumerate(order)]


def vision_items(d) -> list[tuple[object, str]]:
    """(PIL image, prompt) pairs."""
    if d.source == "synthetic":
        return [(image, d.prompt) for image in synthetic_images(d.num_samples, d.image_size, d.seed)]
    import datasets

    try:
        data = datasets.load_dataset(d.hub_id, d.hub_config, split=d.hub_split)
    except Exception as err:  # offline without a cache, unknown config, ...
        raise RuntimeError(f"dominance.source=mmmu_pro: cannot load {d.hub_id} ({d.hub_config}, {d.hub_split}): {err}. "
                           "It needs the hub or a local datasets cache; dominance.source=synthetic runs offline") from err
    if len(data) < d.num_samples:
        raise ValueError(f"dominance.num_samples={d.num_samples} but {d.hub_id}/{d.hub_config} has {len(data)} rows")
    data = data.shuffle(seed=d.seed).select(range(d.num_samples))
    return [(row["image"].convert("RGB"), d.prompt) for row in data]


def load_processor(spec, tokenizer):
    """The processor of a vision-language model spec: the hub's, or for the tiny LLaVA one built offline
    around its tokenizer (CLIP preprocessing, one token per patch)."""
    if spec.source == "tiny":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # no torchvision

        size = TINY_IMAGE_SIZE
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=TINY_PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(spec.hub_id, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
