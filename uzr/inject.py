"""Run-time injection of the controller's predicted attention into the student (DESIGN.md §6).

An :class:`Injector` attaches to the student's attention modules (the model must use the ``uzr``
attention function, see :mod:`uzr.attention`). A forward pre-hook captures the hidden state entering
each injected layer; the attention function then asks :meth:`Injector.attention_edit` for the change:

- ``bias``: scores += alpha * log softmax(controller logits) — a product of experts, scale free;
- ``mix``: output = (1 - alpha) * output + alpha * (P_ctrl @ V).

During decoding the query length is 1, so the controller's key features are cached per layer like a
KV cache. ``remove()`` detaches everything and restores the original model exactly.
"""

from __future__ import annotations

import math

import torch

from uzr.attention import AttentionEdit, attention_modules, causal_allowed, use_uzr_attention
from uzr.config.inject import MODES, SCHEDULES, AlphaSpec, validate_alpha  # noqa: F401
from uzr.hooks import ModelEdit, kv_cache, layer_input
from uzr.masks import masked_log_softmax, normalised_entropy


def alpha_rows(spec: AlphaSpec, layer: int, steps: torch.Tensor, ctrl_norm_entropy: torch.Tensor | None,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """Alpha for each query row.

    Args:
        steps: (q,) decoding step of each query row (0 for the prompt).
        ctrl_norm_entropy: (B, q) normalised entropy of the controller's rows, in [0, 1].
        gate: (B, q) or (B, 1) gate output in [0, 1] (schedule ``gated``).
    Returns:
        (B or 1, q) float32 alpha.
    """
    base = spec.value * spec.layer_weights.get(layer, 1.0)
    ramp = (steps.float() / spec.warmup_steps).clamp(max=1.0)[None]  # (1, q)
    if spec.schedule == "linear":
        alpha = base * ramp
    elif spec.schedule == "cosine":
        alpha = base * (1 - torch.cos(math.pi * ramp)) / 2
    else:
        alpha = torch.full_like(ramp, base)
    if spec.schedule == "entropy_local" or (spec.schedule == "gated" and spec.entropy_local):
        alpha = alpha * (1 - ctrl_norm_entropy)
    if spec.schedule == "gated":
        if gate is None:
            raise ValueError("alpha.schedule='gated' needs a trained gate; run the gate stage first")
        alpha = alpha * gate
    return alpha


class Injector(ModelEdit):
    """Adds the controllers' predictions to the student's attention at the chosen layers.

    Args:
        controllers: ``{layer: controller}``; each controller offers ``query_features(h)``,
            ``key_features(h)`` and ``logits_from_features(qf, kf, q_pos, k_pos)``.
        alpha: the schedule; ``mode``: ``bias`` or ``mix``.
        prompt_len: decoding steps are counted from here; ``None`` takes the length of each prefill,
            ``0`` treats a whole text as generated (how warm-up schedules apply to bits per byte).
        gate: (B, 1) or (B, q) gate output in [0, 1], read by schedule ``gated``.
    """

    def __init__(self, controllers: dict[int, torch.nn.Module], alpha: AlphaSpec, mode: str = "bias",
                 prompt_len: int | None = None, gate: torch.Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"inject.mode={mode!r} is unknown; valid choices: {', '.join(MODES)}")
        validate_alpha(alpha)
        self.controllers, self.alpha, self.mode, self.prompt_len = controllers, alpha, mode, prompt_len
        self.gate = gate  # (B, 1) or (B, q) gate output for schedule ``gated``; may be set later
        self._hidden: dict[int, torch.Tensor] = {}
        self._key_cache: dict[int, torch.Tensor] = {}
        self._prefill_len: dict[int, int] = {}
        self._handles: list = []
        self._modules: list[torch.nn.Module] = []

    # --- attaching ---------------------------------------------------------------------------
    def attach(self, model) -> Injector:
        use_uzr_attention(model)
        modules = attention_modules(model)
        for layer in self.controllers:
            if not 0 <= layer < len(modules):
                raise ValueError(f"inject.layers contains {layer}; the student has layers 0..{len(modules) - 1}")
            module = modules[layer]
            module.uzr_injector = self
            self._handles.append(module.register_forward_pre_hook(self._capture, with_kwargs=True))
            self._modules.append(module)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            del module.uzr_injector
        self._handles, self._modules = [], []
        self.reset()

    def reset(self) -> None:
        self._hidden, self._key_cache, self._prefill_len = {}, {}, {}

    def _capture(self, module, args, kwargs):
        self._hidden[module.layer_idx] = layer_input(args, kwargs)  # (B, q, D): the normalised input of the attention
        cache = kv_cache(kwargs)
        if cache is None or cache.get_seq_length(module.layer_idx) == 0:
            self._key_cache.pop(module.layer_idx, None)  # a new sequence starts
        return None

    # --- the edit ----------------------------------------------------------------------------
    def controller_logprobs(self, layer: int, q_len: int, k_len: int, mask) -> tuple[torch.Tensor, ...]:
        """Log-probabilities (B, q, k) of the controller at ``layer``, the allowed mask (B|1, q, k) and the
        queries' positions (q,) in the sequence.

        The controller's key features of every position seen so far are cached; a sliding-window
        layer's KV cache may hold only the last ``k_len`` of them, so the newest ``k_len`` are used.
        """
        ctrl = self.controllers[layer]
        hidden = self._hidden.pop(layer).float()  # (B, q, D)
        keys = ctrl.key_features(hidden)  # (B, q, dk)
        if layer in self._key_cache:
            keys = torch.cat([self._key_cache[layer], keys], 1)  # (B, seen, dk)
        else:
            self._prefill_len[layer] = q_len
        self._key_cache[layer] = keys
        seen = keys.shape[1]
        if seen < k_len:
            raise RuntimeError(
                f"injector saw {seen} positions at layer {layer} but attention has {k_len} keys: "
                "attach the injector before the prefill (before generate()), not in the middle of a sequence"
            )
        q_pos = torch.arange(seen - q_len, seen, device=hidden.device)
        k_pos = torch.arange(seen - k_len, seen, device=hidden.device)
        logits = ctrl.logits_from_features(ctrl.query_features(hidden), keys[:, seen - k_len:], q_pos, k_pos)
        allowed = causal_allowed(mask, q_len, k_len, hidden.device)[:, 0]  # (B|1, q, k)
        return masked_log_softmax(logits, allowed.expand_as(logits)), allowed, q_pos

    def attention_edit(self, module, query, key, mask) -> AttentionEdit | None:
        layer = module.layer_idx
        q_len, k_len = query.shape[2], key.shape[2]
        logp, allowed, q_pos = self.controller_logprobs(layer, q_len, k_len, mask)
        schedule = self.alpha.schedule
        needs_entropy = schedule == "entropy_local" or (schedule == "gated" and self.alpha.entropy_local)
        probs = logp.exp() * allowed if needs_entropy or self.mode == "mix" else None  # (B, q, k)
        norm_entropy = None
        if needs_entropy:  # only these schedules read it: decoding skips the work otherwise
            norm_entropy = normalised_entropy(-torch.special.xlogy(probs, probs).sum(-1), allowed.sum(-1))  # (B, q)
        prompt_len = self.prompt_len if self.prompt_len is not None else self._prefill_len[layer]
        steps = (q_pos - (prompt_len - 1)).clamp(min=0)
        alpha = alpha_rows(self.alpha, layer, steps, norm_entropy, self.gate).to(logp.device)  # (B|1, q)
        if not bool((alpha != 0).any()):
            return None  # exact parity with the plain model
        if self.mode == "mix":
            return AttentionEdit(mix_probs=probs, mix_alpha=alpha.expand(probs.shape[0], -1)[..., None])
        bias = torch.where(allowed, alpha[..., None] * logp, torch.zeros_like(logp))  # (B, q, k)
        return AttentionEdit(bias=bias[:, None])  # (B, 1, q, k)
