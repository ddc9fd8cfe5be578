"""A model's attention modules (the decoder stack and each layer's ``self_attn``), and the per-layer objects
the attention function reads from them, attached one per layer at a time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def decoder_of(model) -> torch.nn.Module:
    """The text decoder stack of ``model`` (the module with ``.layers``), found through its public API.

    ``model.get_decoder()`` gives the decoder of a causal LM (``LlamaForCausalLM`` -> ``LlamaModel``) and
    the language model of a vision-language ``...ForConditionalGeneration``; a bare decoder returns itself.
    Calling it with ``input_ids`` runs the text stack without the LM head (``last_hidden_state`` is final,
    post-norm). Raises ``ValueError`` naming the model class when no decoder layers are found.
    """
    get_decoder = getattr(model, "get_decoder", None)  # absent on a plain nn.Module
    candidates = [get_decoder() if callable(get_decoder) else None, getattr(model, "model", None), model]
    for candidate in candidates:
        if isinstance(getattr(candidate, "layers", None), torch.nn.ModuleList):
            return candidate
    found = ", ".join(dict.fromkeys(type(c).__name__ for c in candidates if c is not None))
    raise ValueError(f"{type(model).__name__}: no decoder layers found (looked for .layers on {found} via "
                     "get_decoder()); uzr hooks decoder stacks with layers[i].self_attn")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer of ``model`` (see :func:`decoder_of`), in layer order."""
    layers = decoder_of(model).layers
    missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "self_attn")]
    if missing:
        raise ValueError(f"{type(model).__name__}: decoder layers {missing[:5]} have no self_attn module")
    return [layer.self_attn for layer in layers]


RECORDER = "uzr_recorder"  # the attribute the attention function reads a layer's LayerRecorder from
INJECTOR = "uzr_injector"  # ... and a layer's injector from
OBSERVER = "uzr_observer"  # ... and what reads the call's queries and keys with gradients (attention distillation)
_WHAT = {RECORDER: "a recorder", INJECTOR: "an injector", OBSERVER: "an observer"}


def attach_to_layers(attribute: str, pairs: Iterable[tuple[torch.nn.Module, Any]]) -> None:
    """Set ``module.<attribute> = value`` for every (attention module, value) pair, after checking that none of
    the modules carries one already: a second injector (or recorder) on a layer would silently replace the first
    and be deleted by the first one's removal. Raises ``RuntimeError`` naming the layers; nothing is set then."""
    pairs = list(pairs)
    taken = [getattr(module, "layer_idx", "?") for module, _ in pairs if hasattr(module, attribute)]
    if taken:
        raise RuntimeError(f"attention layer(s) {taken} already carry {_WHAT.get(attribute, attribute)} "
                           f"({attribute}): remove the first before attaching another (one per layer at a time)")
    for module, value in pairs:
        setattr(module, attribute, value)


def detach_from_layers(attribute: str, modules: Iterable[torch.nn.Module]) -> None:
    """Remove ``module.<attribute>`` from every module that :func:`attach_to_layers` set it on."""
    for module in modules:
        delattr(module, attribute)
