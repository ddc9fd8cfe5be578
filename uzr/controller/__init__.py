"""Controller: predicts, from the student's hidden state entering an injected layer, the teacher's
head-mean attention distribution there, or one per student head (DESIGN.md §5; issue 13).

Uniform controller API (used by the injector, including during decoding with a key cache)::

    qf = ctrl.query_features(h_q)          # (B, Sq, ctrl.query_dim)
    kf = ctrl.key_features(h_k)            # (B, Sk, ctrl.key_dim); cache these per layer like K
    logits = ctrl.logits_from_features(qf, kf, q_pos, k_pos)   # (B, Sq, Sk), unmasked

``q_pos``/``k_pos`` are absolute token positions, ``(Sq,)``/``(Sk,)`` or ``(B, Sq)``/``(B, Sk)`` long.
The bilinear controller only uses their difference (so left padding shifts nothing); the seed MLP
reads absolute key positions, so with left padding pass positions counted from the first real token.
``ctrl(h)`` is the same with ``q_pos = k_pos = arange(S)``. Mask the causal triangle and padding with
:func:`masked_log_softmax` / :func:`causal_mask`. A per-head controller (``controller.target=per_head``, built
with ``heads=H``) returns ``(B, H, Sq, Sk)``: one distribution per student head.

Also here: the loss (:func:`controller_loss`), the baselines every held-out KL is reported against
(uniform causal attention, a fitted :class:`RecencyPrior`, the student's own attention), the Lightning
module that trains one controller per injected layer, and checkpoint I/O (safetensors + JSON).
"""

from __future__ import annotations

from uzr.config.controller import ARCHS, ControllerSpec, coerce_spec, validate_spec
from uzr.controller.archs import (
    BilinearController,
    Controller,
    SeedMLPController,
    build_controller,
    relative_bucket,
)
from uzr.controller.baselines import RecencyPrior
from uzr.controller.checkpoint import load_controller, save_controller
from uzr.controller.loss import controller_loss, row_kl, uniform_probs
from uzr.controller.module import ControllerModule
from uzr.masks import MASKED_LOGPROB, causal_mask, masked_log_softmax

__all__ = [
    "ARCHS",
    "MASKED_LOGPROB",
    "BilinearController",
    "Controller",
    "ControllerModule",
    "ControllerSpec",
    "RecencyPrior",
    "SeedMLPController",
    "build_controller",
    "causal_mask",
    "coerce_spec",
    "controller_loss",
    "load_controller",
    "masked_log_softmax",
    "relative_bucket",
    "row_kl",
    "save_controller",
    "uniform_probs",
    "validate_spec",
]
