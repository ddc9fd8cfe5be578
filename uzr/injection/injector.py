"""Run-time injection of the controller's predicted attention into the student (DESIGN.md §6).

An :class:`Injector` attaches to the student's attention modules (the model must use the ``uzr``
attention function, see :mod:`uzr.attention`). A forward pre-hook captures the hidden state entering
each injected layer; the attention function then asks :meth:`Injector.attention_edit` for the change:

- ``bias``: scores += alpha * log softmax(controller logits) — a product of experts, scale free;
- ``mix``: output = (1 - alpha) * output + alpha * (P_ctrl @ V).

During decoding the query length is 1, so the controller's key features are cached per layer like a
KV cache; a call whose keys are exactly its queries starts a new sequence (no private keyword of the
model's code is read). A layer whose alpha is 0 for the whole run is not hooked at all. ``remove()`` detaches
everything and restores the original model exactly. One injector per layer at a time: attaching a second to a
layer that carries one raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from uzr.attention import AttentionEdit, attention_modules, causal_allowed, use_uzr_attention
from uzr.attention.layers import INJECTOR, attach_to_layers, detach_from_layers
from uzr.config.inject import MODES, SCHEDULES, AlphaSpec, validate_alpha  # noqa: F401
from uzr.hooks import ModelEdit, layer_input
from uzr.injection.priors import AttentionCall, AttentionPrior, ControllerPrior, own_logprobs
from uzr.injection.sinks import SinkSet, keep_bias, keep_mix, sink_sets
from uzr.masks import masked_log_softmax, normalised_entropy


def scheduled_alpha(spec: AlphaSpec, layer: int, steps: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Alpha of each query row before any entropy factor: value x layer weight x warm-up x gate.

    Args:
        steps: (q,) decoding step of each query row (0 for the prompt).
        gate: (B, q) or (B, 1) gate output in [0, 1] (schedule ``gated``).
    Returns:
        (B or 1, q) float32 alpha. Where it is 0 the entropy factor of :func:`alpha_rows` keeps it 0, so
        a row that is 0 here needs no controller logits.
    """
    base = layer_alpha(spec, layer)
    ramp = (steps.float() / spec.warmup_steps).clamp(max=1.0)[None]  # (1, q)
    if spec.schedule == "linear":
        alpha = base * ramp
    elif spec.schedule == "cosine":
        alpha = base * (1 - torch.cos(math.pi * ramp)) / 2
    else:
        alpha = torch.full_like(ramp, base)
    if spec.schedule == "gated":
        if gate is None:
            raise ValueError("alpha.schedule='gated' needs a trained gate; run the gate stage first")
        alpha = alpha * gate
    return alpha


def layer_alpha(spec: AlphaSpec, layer: int) -> float:
    """``alpha.value`` x the layer's weight: the most alpha the layer ever gets (0: never injected)."""
    return spec.value * spec.layer_weights.get(layer, 1.0)


def needs_entropy(spec: AlphaSpec) -> bool:
    """Whether the schedule scales alpha by (1 - the controller row's normalised entropy)."""
    return spec.schedule == "entropy_local" or (spec.schedule == "gated" and spec.entropy_local)


def alpha_rows(spec: AlphaSpec, layer: int, steps: torch.Tensor, ctrl_norm_entropy: torch.Tensor | None,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """Alpha for each query row: :func:`scheduled_alpha`, times (1 - entropy) where the schedule asks.

    Args:
        steps: (q,) decoding step of each query row (0 for the prompt).
        ctrl_norm_entropy: (B, q) normalised entropy of the controller's rows, in [0, 1].
        gate: (B, q) or (B, 1) gate output in [0, 1] (schedule ``gated``).
    Returns:
        (B or 1, q) float32 alpha.
    """
    alpha = scheduled_alpha(spec, layer, steps, gate)
    return alpha * (1 - ctrl_norm_entropy) if needs_entropy(spec) else alpha


@dataclass(frozen=True)
class InjectorState:
    """What an injector has seen of its sequences, like a KV cache's rows: per injected layer the key features
    of every position so far (``{layer: (B, seen, dk)}``) and the length of the call that started them."""

    keys: Mapping[int, torch.Tensor]
    prefill_len: Mapping[int, int]
    ids: Mapping[int, torch.Tensor]  # {layer: (B, seen)} token ids, where sinks or the prior read them

    def rows(self, index: torch.Tensor) -> InjectorState:
        """The state of batch rows ``index`` (long (b,); repeats allowed: one sequence continued several ways)."""
        return InjectorState({layer: keys[index] for layer, keys in self.keys.items()}, dict(self.prefill_len),
                             {layer: ids[index] for layer, ids in self.ids.items()})


class Injector(ModelEdit):
    """Adds a prior over keys (by default the controllers' predictions) to the student's attention at the
    chosen layers.

    Args:
        source: ``{layer: controller}`` (each offers ``query_features(h)``, ``key_features(h)`` and
            ``logits_from_features(qf, kf, q_pos, k_pos)``), or any :class:`~uzr.injection.priors.AttentionPrior`
            (the teacher oracle and the controls of ``inject.source``).
        alpha: the schedule; ``mode``: ``bias`` or ``mix``.
        prompt_len: decoding steps are counted from here; ``None`` takes the length of each prefill,
            ``0`` treats a whole text as generated (how warm-up schedules apply to bits per byte).
        gate: (B, 1) or (B, q) gate output in [0, 1], read by schedule ``gated``.
        sinks: ``inject.sinks=keep``: ``{layer: SinkSet}`` (:func:`uzr.injection.sinks.detect_sinks`): the student's own mass
            on those keys stays and the prior shapes only the rest; None (``replace``): the prior shapes every key.
        heads: ``inject.heads``: ``{layer: heads}``, the only heads injected (a layer not in it is not hooked); the
            other heads' attention stays exactly the model's. None: every head of every layer.
    """

    def __init__(self, source: Mapping[int, torch.nn.Module] | AttentionPrior, alpha: AlphaSpec, mode: str = "bias",
                 prompt_len: int | None = None, gate: torch.Tensor | None = None,
                 sinks: Mapping[int, SinkSet] | None = None, heads: Mapping[int, Sequence[int]] | None = None):
        if mode not in MODES:
            raise ValueError(f"inject.mode={mode!r} is unknown; valid choices: {', '.join(MODES)}")
        validate_alpha(alpha)
        self.prior = source if isinstance(source, AttentionPrior) else ControllerPrior(source)
        self.alpha, self.mode, self.prompt_len = alpha, mode, prompt_len
        self.gate = gate  # (B, 1) or (B, q) gate output for schedule ``gated``; may be set later
        self.sinks = {layer: s for layer in self.prior.layers if (s := sink_sets(sinks, layer)) is not None}
        self.heads = None if heads is None else {int(layer): tuple(h) for layer, h in heads.items()}
        # token ids of the sequence so far, per layer like the key cache: sink keys and priors that read the text
        self.needs_ids = bool(self.sinks) or self.prior.needs_ids
        self._new_ids: torch.Tensor | None = None
        self._id_cache: dict[int, torch.Tensor] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._key_cache: dict[int, torch.Tensor] = {}
        self._prefill_len: dict[int, int] = {}
        self._handles: list = []
        self._modules: list[torch.nn.Module] = []

    # --- continuing sequences in other batches (shared prompt prefixes) ------------------------
    @property
    def continues_rows(self) -> bool:
        """Whether a sequence's positions can run in separate calls with other batch rows (:meth:`for_rows`): the
        prior depends only on each sequence's own positions (not on a fixed batch of stored rows), and the gate
        holds one value per sequence rather than one per position."""
        return self.prior.continues_rows and (self.gate is None or self.gate.shape[-1] == 1)

    def rows_alike(self, length: int) -> bool:
        """Whether every batch row is injected alike on positions before ``length`` (gate and prior), so a prefix
        that all rows share may run once for all of them."""
        return (self.gate is None or bool((self.gate == self.gate[:1]).all())) and self.prior.alike(length)

    def state(self) -> InjectorState:
        """The key features seen so far (read it before :meth:`remove`, which resets them)."""
        return InjectorState(dict(self._key_cache), dict(self._prefill_len), dict(self._id_cache))

    def for_rows(self, rows: torch.Tensor, state: InjectorState | None = None) -> Injector:
        """A fresh injector like this one for its batch rows ``rows`` (long (b,): their gate values), continuing
        ``state`` (one row per new row) when given: the KV cache's counterpart of a row selection."""
        gate = None if self.gate is None else self.gate[rows.to(self.gate.device)]
        out = Injector(self.prior.for_rows(rows), self.alpha, self.mode, self.prompt_len, gate, self.sinks, self.heads)
        if state is not None:
            out._key_cache, out._prefill_len, out._id_cache = dict(state.keys), dict(state.prefill_len), dict(state.ids)
        return out

    # --- attaching ---------------------------------------------------------------------------
    def attach(self, model) -> Injector:
        use_uzr_attention(model)
        modules = attention_modules(model)
        for layer in self.prior.layers:
            if not 0 <= layer < len(modules):
                raise ValueError(f"inject.layers contains {layer}; the student has layers 0..{len(modules) - 1}")
        # A layer whose alpha is 0 for the whole run, or none of whose heads is injected, is left untouched: its
        # controller never runs.
        hooked = [modules[layer] for layer in self.prior.layers if layer_alpha(self.alpha, layer) != 0
                  and (self.heads is None or self.heads.get(layer))]
        attach_to_layers(INJECTOR, [(module, self) for module in hooked])  # raises if another injector is there
        for module in hooked:
            self._handles.append(module.register_forward_pre_hook(self._capture, with_kwargs=True))
            self._modules.append(module)
        if self.needs_ids:
            self._handles.append(model.get_input_embeddings().register_forward_pre_hook(self._capture_ids))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        detach_from_layers(INJECTOR, self._modules)
        self._handles, self._modules = [], []
        self.reset()

    def reset(self) -> None:
        self._hidden, self._key_cache, self._prefill_len, self._id_cache = {}, {}, {}, {}
        self._new_ids = None

    def _capture(self, module, args, kwargs):
        self._hidden[module.layer_idx] = layer_input(args, kwargs)  # (B, q, D): the normalised input of the attention
        return None

    def _capture_ids(self, module, args):
        self._new_ids = args[0]  # (B, q) the token ids this forward embeds
        return None

    def _advance_ids(self, layer: int, q_len: int, k_len: int) -> torch.Tensor | None:
        """(B, seen) token ids of the sequence so far at ``layer`` (None when nothing reads them)."""
        if not self.needs_ids:
            return None
        if self._new_ids is None:
            raise RuntimeError("inject.sinks=keep (and the teacher oracle) read the token ids: call the model with "
                               "input_ids, not inputs_embeds")
        ids = self._new_ids
        if k_len != q_len and layer in self._id_cache:
            ids = torch.cat([self._id_cache[layer], ids], 1)
        self._id_cache[layer] = ids
        return ids

    # --- the edit ----------------------------------------------------------------------------
    def _advance(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extends the layer's cache of controller key features by this call's rows.

        Where a sequence starts is read off the attention call itself, not off the model's private
        keyword arguments: a call whose keys are exactly its queries (``k_len == q_len``) has nothing
        before it, so it is a prefill or a pass without a KV cache; a call with more keys than queries
        continues the sequence whose keys are cached here. Returns the hidden state (B, q, D) float32,
        the keys seen so far (B, seen, dk) and the queries' positions (q,) in the sequence.
        """
        hidden = self._hidden.pop(layer).float()  # (B, q, D)
        keys = self.prior.key_features(layer, hidden)  # (B, q, dk); dk = 0 for priors without key features
        if k_len == q_len:
            self._prefill_len[layer] = q_len
        elif layer in self._key_cache:
            keys = torch.cat([self._key_cache[layer], keys], 1)  # (B, seen, dk)
        self._key_cache[layer] = keys
        seen = keys.shape[1]
        if seen < k_len:
            raise RuntimeError(
                f"injector saw {seen} positions at layer {layer} but attention has {k_len} keys: "
                "attach the injector before the prefill (before generate()), not in the middle of a sequence, "
                "and use a dynamic KV cache (a static cache's keys include empty slots)"
            )
        return hidden, keys, torch.arange(seen - q_len, seen, device=hidden.device)

    def prior_logprobs(self, module, query, key, mask, hidden: torch.Tensor, keys: torch.Tensor,
                       q_pos: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, AttentionCall]:
        """Log-probabilities (B, 1|H, q, k) of the prior at ``module``'s layer and the call it saw (its ``allowed``:
        (B|1, q, k)).

        A sliding-window layer's KV cache may hold only the last ``k_len`` keys, so the newest ``k_len``
        of the cached key features are used.
        """
        seen, q_len, k_len = keys.shape[1], hidden.shape[1], key.shape[2]
        allowed = causal_allowed(mask, q_len, k_len, hidden.device)[:, 0]  # (B|1, q, k)
        call = AttentionCall(module, hidden, query, key, allowed, q_pos,
                             torch.arange(seen - k_len, seen, device=hidden.device), ids)
        scores = self.prior.scores(module.layer_idx, call, keys[:, seen - k_len:])  # (B, 1|H, q, k)
        scores = scores.expand(hidden.shape[0], *scores.shape[1:])
        return masked_log_softmax(scores, allowed[:, None].expand_as(scores)), call

    def attention_edit(self, module, query, key, mask) -> AttentionEdit | None:
        edit = self._edit(module, query, key, mask)
        heads = None if self.heads is None else self.heads.get(module.layer_idx)
        return edit if edit is None or heads is None else only_heads(edit, heads, query.shape[1])

    def _edit(self, module, query, key, mask) -> AttentionEdit | None:
        layer = module.layer_idx
        q_len, k_len = query.shape[2], key.shape[2]
        hidden, keys, q_pos = self._advance(layer, q_len, k_len)
        ids = self._advance_ids(layer, q_len, k_len)  # (B, seen) or None
        prompt_len = self.prompt_len if self.prompt_len is not None else self._prefill_len[layer]
        steps = (q_pos - (prompt_len - 1)).clamp(min=0)
        alpha = scheduled_alpha(self.alpha, layer, steps, self.gate).to(hidden.device)  # (B|1, q)
        if self.prior.row_weights is not None:  # rows the prior leaves alone (emphasis without a marked span)
            alpha = alpha * self.prior.row_weights.to(hidden.device)[:, None]  # (B, q)
        if not bool((alpha != 0).any()):
            return None  # e.g. a warm-up's prompt: keys are cached for later steps, no logits are needed
        logp, call = self.prior_logprobs(module, query, key, mask, hidden, keys, q_pos, ids)  # (B, P, q, k), P = 1|H
        allowed = call.allowed[:, None]  # (B|1, 1, q, k)
        probs = logp.exp() * allowed if needs_entropy(self.alpha) or self.mode == "mix" else None  # (B, P, q, k)
        if needs_entropy(self.alpha):  # of the head-mean row: one alpha per query row
            mean = probs.mean(1)  # (B, q, k)
            alpha = alpha * (1 - normalised_entropy(-torch.special.xlogy(mean, mean).sum(-1), allowed[:, 0].sum(-1)))
            if not bool((alpha != 0).any()):
                return None  # exact parity with the plain model
        if layer in self.sinks:  # inject.sinks=keep: the student's own sink mass stays (uzr.injection.sinks)
            sink = self.sinks[layer].flags(ids[:, -k_len:], call.k_pos)[:, None, None]  # (B, 1, 1, k)
            own = own_logprobs(call)  # (B, H, q, k)
            if self.mode == "mix":
                return AttentionEdit(mix_probs=keep_mix(probs, own, sink, allowed),
                                     mix_alpha=alpha.expand(probs.shape[0], -1)[..., None])
            return AttentionEdit(bias=keep_bias(logp, own, alpha, sink, allowed))
        if self.mode == "mix":
            mix = probs[:, 0] if probs.shape[1] == 1 else probs  # (B, q, k) shared, or (B, H, q, k) per head
            return AttentionEdit(mix_probs=mix, mix_alpha=alpha.expand(probs.shape[0], -1)[..., None])
        return AttentionEdit(bias=torch.where(allowed, alpha[:, None, :, None] * logp, torch.zeros_like(logp)))


def only_heads(edit: AttentionEdit, heads: Sequence[int], n_heads: int) -> AttentionEdit:
    """``edit`` on ``heads`` only: the other heads get a zero bias and a zero mix weight, so their attention and output
    are exactly the model's (adding 0 to a score, or mixing with weight 0, changes no bit)."""
    on = torch.zeros(n_heads, dtype=torch.bool)
    on[list(heads)] = True
    if edit.bias is not None:
        bias = edit.bias.expand(-1, n_heads, -1, -1)  # (B, H, q, k)
        return AttentionEdit(bias=torch.where(on.to(bias.device)[None, :, None, None], bias, torch.zeros_like(bias)))
    weight = on.to(edit.mix_alpha.device, edit.mix_alpha.dtype)  # (H,)
    return AttentionEdit(mix_probs=edit.mix_probs, mix_alpha=edit.mix_alpha * weight)  # (B, q, 1) -> (B, q, H)
