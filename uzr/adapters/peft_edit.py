"""LoRA and IA3 baselines through ``peft``, as :class:`~uzr.hooks.ModelEdit`s at a parameter budget matched to an SVF
expert.

:class:`PeftTrainable` holds the adapter's tensors as its own parameters (so a LightningModule trains and
checkpoints them like an SVF expert's ``z``); :meth:`~PeftTrainable.attach` injects the adapter with peft's tuner
(``LoraModel`` / ``IA3Model``) into the model in place and points the injected modules at those parameters;
:meth:`~PeftTrainable.remove` unloads it (peft puts the original ``nn.Linear`` objects back, whose weights it never
wrote), so the model computes exactly what it computed before. LoRA starts with ``B = 0`` and IA3 with scales of 1,
so the freshly attached adapter is the base model.

The budget: an SVF expert on ``svf.matrices`` of every layer has ``Σ min(out, in)`` parameters. LoRA of rank
``r`` on a matrix has ``r (in + out)``, IA3 one scale per output (per input for ``down_proj``/``fc2``, peft's
"feed-forward" modules). Rank 1 on every layer already exceeds the SVF budget on SmolLM2 (``2112`` vs ``576`` per
MLP matrix), so :func:`matched_layers` adapts the same matrices on fewer layers, evenly spread, the most that fit
in the SVF budget (:func:`plan_baseline` reports both counts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from uzr.adapters.svd import target_matrices
from uzr.attention import decoder_of
from uzr.hooks import ModelEdit

PEFT_METHODS = ("lora", "ia3")
FEEDFORWARD = ("down_proj", "fc2", "c_proj")  # IA3 scales these matrices' inputs (peft's feedforward_modules)


@dataclass(frozen=True)
class BaselinePlan:
    method: str  # lora | ia3
    matrices: str  # the svf.matrices group: mlp | attn | mlp+attn
    layers: tuple[int, ...]  # decoder layers adapted
    rank: int  # LoRA rank (1 for IA3, unused)
    parameters: int  # trainable parameters of the adapter
    budget: int  # the SVF expert's parameters it is matched to


def _per_matrix(method: str, name: str, lin: nn.Linear, rank: int) -> int:
    if method == "lora":
        return rank * (lin.in_features + lin.out_features)
    return lin.in_features if name.rsplit(".", 1)[-1] in FEEDFORWARD else lin.out_features


def matched_layers(per_layer: Sequence[int], budget: int) -> tuple[int, ...]:
    """The most decoder layers (evenly spread over the stack) whose ``per_layer`` parameter counts sum to at most
    ``budget``; at least one layer."""
    n = len(per_layer)
    for k in range(n, 0, -1):
        chosen = tuple(sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})) if k > 1 else (n - 1,)
        if sum(per_layer[i] for i in chosen) <= budget:
            return chosen
    return (n - 1,)


def plan_baseline(model, method: str, matrices: str, budget: int, rank: int = 1) -> BaselinePlan:
    """The LoRA / IA3 adapter on ``matrices`` with the most layers that fit in ``budget`` parameters."""
    if method not in PEFT_METHODS:
        raise ValueError(f"baseline method {method!r}; valid: {', '.join(PEFT_METHODS)}")
    n_layers = len(decoder_of(model).layers)
    per_layer = [sum(_per_matrix(method, n, lin, rank) for n, lin in target_matrices(model, matrices, [i]).items())
                 for i in range(n_layers)]
    layers = matched_layers(per_layer, budget)
    return BaselinePlan(method, matrices, layers, rank, sum(per_layer[i] for i in layers), budget)


def _config(plan: BaselinePlan, names: Sequence[str], lora_alpha: float | None = None):
    from peft import IA3Config, LoraConfig

    # a regex over the model's full module names: exactly the chosen matrices (peft full-matches it)
    pattern = "|".join(rf"(.*\.)?{re.escape(n)}" for n in names)
    if plan.method == "lora":  # lora_alpha None: alpha = rank, a scale of 1
        return LoraConfig(r=plan.rank, lora_alpha=plan.rank if lora_alpha is None else lora_alpha, lora_dropout=0.0,
                          target_modules=pattern, bias="none")
    ff = [n for n in names if n.rsplit(".", 1)[-1] in FEEDFORWARD]
    ff_pattern = "|".join(rf"(.*\.)?{re.escape(n)}" for n in ff) or "^$"
    return IA3Config(target_modules=pattern, feedforward_modules=ff_pattern)


class PeftTrainable(nn.Module, ModelEdit):
    """A LoRA or IA3 adapter (``plan``) whose tensors live here; attach injects it, remove unloads it exactly.

    ``state``: adapter tensors by name (``layers.3.mlp.up_proj.lora_A``...), e.g. a trained adapter; None = peft's
    initial adapter (the base model). ``lora_alpha``: LoRA's alpha (its update is scaled by alpha / rank); None = the
    rank."""

    def __init__(self, model, plan: BaselinePlan, state: Mapping[str, Tensor] | None = None,
                 lora_alpha: float | None = None):
        nn.Module.__init__(self)
        self.plan = plan
        self.names = list(target_matrices(model, plan.matrices, list(plan.layers)))
        self.config = _config(plan, self.names, lora_alpha)
        self.keys: list[str] = []  # adapter tensor names, relative to the decoder stack
        self.tensors = nn.ParameterList()
        self._tuner = None
        self._flags: dict[str, bool] = {}
        self.attach(model)  # peft initialises the adapter; keep its tensors (or the given state) as ours
        try:
            for key, p in self._injected(model):
                start = state[key] if state is not None else p.detach()
                self.keys.append(key)
                self.tensors.append(nn.Parameter(start.detach().clone().float()))
        finally:
            self.remove()
        if state is not None and set(state) != set(self.keys):
            raise ValueError(f"{plan.method} adapter tensors {sorted(set(state) ^ set(self.keys))[:3]} do not fit "
                             f"this model's {plan.matrices} matrices of layers {list(plan.layers)}")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.tensors)

    def _injected(self, model) -> list[tuple[str, nn.Parameter]]:
        stack = decoder_of(model)
        marker = "lora_" if self.plan.method == "lora" else "ia3_"
        return [(n, p) for n, p in stack.named_parameters() if marker in n]

    def state(self) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in zip(self.keys, self.tensors)}

    def attach(self, model) -> PeftTrainable:
        from peft.tuners.ia3 import IA3Model
        from peft.tuners.lora import LoraModel

        if self._tuner is not None:
            raise RuntimeError("the adapter is already attached; remove() it first")
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._had_config = hasattr(model, "peft_config")
        tuner_cls = LoraModel if self.plan.method == "lora" else IA3Model
        self._tuner = tuner_cls(model, self.config, "default")
        if self.keys:  # point the injected modules at our tensors (gradients reach them; nothing is copied)
            stack = decoder_of(model)
            for key, p in zip(self.keys, self.tensors):
                parent, leaf = key.rsplit(".", 1)
                module = stack.get_submodule(parent)
                delattr(module, leaf)
                module.register_parameter(leaf, p)
        return self

    def remove(self) -> None:
        if self._tuner is None:
            return
        model = self._tuner.unload()  # the original nn.Linear modules back in place
        for n, p in model.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
        if not self._had_config and hasattr(model, "peft_config"):
            del model.peft_config
        self._tuner = None
