"""Decoder layers dropped from a loaded model: a same-family student (``<role>.prune``, DESIGN.md §8).

The damaged copy of the positive control is weaker only in attention; a pruned copy is weaker everywhere (whole
layers, their attention, MLP and norms, are gone) while it keeps the teacher's heads, tokenizer and training data.
:func:`prune_layers` removes the named layers from the decoder's ``ModuleList`` and renumbers what is left, so the
pruned model is an ordinary model of fewer layers:

- each kept layer keeps its own weights and its own attention type: per-layer config lists (Gemma 3's
  ``layer_types``, which decide sliding-window or full attention and the rotary base) keep the kept layers' entries;
- ``num_hidden_layers`` is the new depth, and every decoder layer's and attention module's ``layer_idx`` its new
  index, which is where the KV cache (built from the config's ``layer_types``) stores its keys and values.

Layer ``i`` of the pruned model is source layer ``spec.kept_layers[i]`` (:class:`uzr.config.model.ModelSpec`); the
model records both lists in ``model.config.uzr_prune``. Pruning happens after the declared sizes are checked
against the loaded source model and before any damage, whose layers count the pruned model's.
"""

from __future__ import annotations

import logging

import torch

from uzr.attention import decoder_of

log = logging.getLogger(__name__)

# Config lists with one entry per decoder layer (transformers 5): the kept layers' entries stay.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


def prune_layers(model, layers: list[int], role: str = "model") -> dict | None:
    """Drop decoder ``layers`` (0-based source indices) from ``model`` in place; return the record (None: none).

    The record ``{"layers": dropped, "kept": source layer of each remaining layer}`` is also stored in
    ``model.config.uzr_prune``.
    """
    if not layers:
        return None
    decoder = decoder_of(model)
    depth = len(decoder.layers)
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad or len(set(layers)) >= depth:
        raise ValueError(f"{role}.prune.layers={list(layers)}: the loaded model has layers 0..{depth - 1} and must keep "
                         f"one; outside: {bad}")
    kept = [i for i in range(depth) if i not in set(layers)]
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in kept)
    for new, layer in enumerate(decoder.layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    configs = {id(c): c for c in (model.config.get_text_config(), decoder.config)}  # often one object
    for config in configs.values():
        config.num_hidden_layers = len(kept)
        for name in PER_LAYER_CONFIG:
            values = getattr(config, name, None)
            if isinstance(values, list) and len(values) == depth:
                setattr(config, name, [values[i] for i in kept])
    record = {"layers": sorted(layers), "kept": kept}
    model.config.uzr_prune = record
    log.info("%s: pruned decoder layers %s; %d of %d layers kept", role, sorted(layers), len(kept), depth)
    return record
