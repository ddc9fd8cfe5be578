"""A model's attention modules: the decoder stack and each layer's ``self_attn``."""

from __future__ import annotations

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
