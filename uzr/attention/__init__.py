"""Attention, the platform every system shares: the registered attention function and what it records.

A model switched to ``attn_implementation="uzr"`` (:func:`use_uzr_attention`) computes exactly what ``sdpa``
computes until an attention module carries one of these attributes:

- ``module.uzr_recorder``: a :class:`LayerRecorder`; the layer then runs blocked eager attention in
  float32 and hands each block of scores to the recorder's reducers (:mod:`uzr.attention.reducers`:
  statistics, head-mean rows, or any other :class:`Reducer`) without ever materialising all layers'
  ``(B, H, S, S)`` weights;
- ``module.uzr_injector``: an object with ``attention_edit(module, query, key, mask)`` returning an
  :class:`AttentionEdit` (additive log-prior or probability mix), or ``None`` to leave the layer alone
  (:class:`uzr.injection.injector.Injector`).

Modules: :mod:`~uzr.attention.function` (the function and its blocked pass), :mod:`~uzr.attention.reducers`
(:class:`ScoreBlock`, the :class:`Reducer` protocol, the generic reducers), :mod:`~uzr.attention.stats` (the
habit statistics, DESIGN.md §4), :mod:`~uzr.attention.recorder` (:class:`LayerRecorder`, :func:`recording`),
:mod:`~uzr.attention.layers` (finding a model's attention modules; one recorder and one injector per
layer at a time).
"""

from uzr.attention.function import (
    ATTN_IMPLEMENTATION,
    AttentionEdit,
    causal_allowed,
    register,
    release_workspace,
    use_uzr_attention,
    uzr_attention,
)
from uzr.attention.layers import attention_modules, decoder_of
from uzr.attention.recorder import LayerRecorder, recording
from uzr.attention.reducers import HabitStats, HeadMeanRows, HeadRows, Reducer, ScoreBlock

__all__ = ["ATTN_IMPLEMENTATION", "AttentionEdit", "HabitStats", "HeadMeanRows", "HeadRows", "LayerRecorder",
           "Reducer", "ScoreBlock", "attention_modules", "causal_allowed", "decoder_of", "register",
           "recording", "release_workspace", "use_uzr_attention", "uzr_attention"]
