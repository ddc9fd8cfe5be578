"""Attention damage applied to a loaded model: the positive control's student (DESIGN.md §8).

The positive control needs a student whose deficit is known to live in attention: the teacher itself
with chosen layers' attention damaged (``student.damage`` in the config, :class:`uzr.config.model.DamageSpec`).
Both kinds change only the attention *probabilities* of the damaged layers; every weight of every other
layer, and the damaged layers' values, output projection, MLP and norms stay the model's own. So the
damaged layer's output with the undamaged per-head probabilities put back (``mix`` at alpha 1 with the
teacher's per-head attention) is the teacher's output exactly: the gap is closable by construction.

- ``temperature``: the attention logits of each damaged layer are divided by ``strength``, by dividing
  the attention module's ``scaling`` (the factor transformers passes to the attention function, so
  sdpa, eager and uzr's own attention function all see it; with Gemma 3's logit soft-capping the
  division happens before the cap).
- ``permute_heads``: the query heads of each damaged layer are permuted (rows of ``q_proj`` in blocks of
  ``head_dim``): head ``h`` computes its scores with the query of head ``perm[h]`` against head ``h``'s
  keys, and its output still enters ``o_proj`` at slot ``h``. With one key/value head (Gemma 3 270M) this
  moves whole attention patterns between heads (head ``h`` attends like the teacher's head ``perm[h]``),
  so the *head-mean* attention is unchanged: a damage that head-mean habits cannot see and only
  per-head injection can repair. With grouped heads, a query moved to another group meets other keys.

The model reports what was done in ``model.config.uzr_damage`` (and each damaged attention module in
``module.uzr_damage``); the artifact keys see the damage through the spec (``dataclasses.asdict`` of
the student), so a damaged student never reuses an undamaged student's harvest.
"""

from __future__ import annotations

import logging

import torch

from uzr.attention import attention_modules
from uzr.config.model import DamageSpec, moved_heads

log = logging.getLogger(__name__)


def head_permutation(num_heads: int, strength: float, seed: int, layer: int) -> list[int]:
    """``perm[h]``: the query head that head ``h`` uses. ``round(strength * num_heads)`` heads, chosen by
    ``(seed, layer)``, are cycled among themselves (each chosen head moves); the rest stay."""
    count = moved_heads(strength, num_heads)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    chosen = sorted(torch.randperm(num_heads, generator=gen)[:count].tolist())
    perm = list(range(num_heads))
    for i, head in enumerate(chosen):
        perm[head] = chosen[(i + 1) % count]
    return perm


def apply_damage(model, damage: DamageSpec, role: str = "model") -> dict | None:
    """Damage ``model``'s attention in place as ``damage`` says; return the record (None: no damage).

    The record (kind, strength, layers, and per layer the old/new scaling or the head permutation) is
    also stored in ``model.config.uzr_damage`` and on each damaged attention module as ``uzr_damage``.
    """
    if not damage.layers:
        return None
    modules = attention_modules(model)
    strength = damage.effective_strength
    record = {"kind": damage.kind, "strength": strength, "layers": list(damage.layers), "per_layer": {}}
    if damage.kind == "permute_heads":
        record["seed"] = damage.seed
    for layer in damage.layers:
        if not 0 <= layer < len(modules):
            raise ValueError(f"{role}.damage.layers={list(damage.layers)}: layer {layer} outside the loaded model's "
                             f"layers 0..{len(modules) - 1}")
        module = modules[layer]
        if damage.kind == "temperature":
            done = _flatten(module, strength, role, layer)
        else:
            done = _permute_queries(model, module, strength, damage.seed, role, layer)
        module.uzr_damage = {"kind": damage.kind, "strength": strength, **done}
        record["per_layer"][layer] = done
    model.config.uzr_damage = record
    log.info("%s: %s damage (strength %s) in layers %s", role, damage.kind, strength, list(damage.layers))
    return record


def _flatten(module, strength: float, role: str, layer: int) -> dict:
    scaling = getattr(module, "scaling", None)
    if not isinstance(scaling, float):
        raise ValueError(f"{role}.damage.kind='temperature': the attention module of layer {layer} "
                         f"({type(module).__name__}) has no float `scaling` to divide")
    module.scaling = scaling / strength
    return {"scaling": scaling, "damaged_scaling": module.scaling}


def _permute_queries(model, module, strength: float, seed: int, role: str, layer: int) -> dict:
    q_proj = getattr(module, "q_proj", None)
    if not isinstance(q_proj, torch.nn.Linear):
        raise ValueError(f"{role}.damage.kind='permute_heads': the attention module of layer {layer} "
                         f"({type(module).__name__}) has no q_proj Linear to permute")
    num_heads = model.config.get_text_config().num_attention_heads
    head_dim = q_proj.out_features // num_heads
    perm = head_permutation(num_heads, strength, seed, layer)
    index = torch.tensor(perm, device=q_proj.weight.device)
    with torch.no_grad():
        weight = q_proj.weight.view(num_heads, head_dim, -1)
        weight.copy_(weight[index].clone())
        if q_proj.bias is not None:
            bias = q_proj.bias.view(num_heads, head_dim)
            bias.copy_(bias[index].clone())
    return {"permutation": perm}
