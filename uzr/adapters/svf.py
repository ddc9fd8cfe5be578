"""SVF experts (Transformer², arXiv 2501.06252): a learned scale on each singular value of chosen matrices.

For an adapted matrix ``W = U diag(S) Vh`` and a vector ``z`` (one entry per singular value),
``m = sigmoid(z)`` and ``W' = U diag(S ⊙ m) Vh · ΣS / Σ(S ⊙ m)`` (the reference code's
``compose_new_params``). The rescaling makes ``W'`` depend only on the *shape* of ``m``: a uniform mask
gives ``W' = W``. uzr computes ``W' = W + U diag(S ⊙ (m·ΣS/Σ(S⊙m) − 1)) Vh``, equal in exact arithmetic,
and leaves a matrix whose mask is uniform untouched, so the initial expert is bit-identical to the base
model. Departures from the reference, on purpose:

- initial ``z``: the reference draws ``0.1 + 0.01·N(0, 1)`` per entry (bfloat16), so its initial ``W'`` is
  already slightly off ``W``; uzr starts every entry at exactly ``0.1`` (:data:`INIT_Z`, the reference's
  ``init_val``), the issue's "initialised so that W' = W exactly";
- arithmetic in float32 (the reference composes in bfloat16), added to ``W`` as a delta (above).

:class:`SVFEdit` (a :class:`~uzr.hooks.ModelEdit`) writes the rescaled weights into the model once per
attach, so decoding with an expert costs what decoding the plain model costs, and writes the saved
originals back on :meth:`~SVFEdit.remove` (bit for bit). :class:`SVFTrainable` is the differentiable
version for training: forward hooks add ``((x Vhᵀ) ⊙ S f(z)) Uᵀ`` to each adapted ``Linear``'s output.

Experts are checkpoints (:func:`save_expert` / :func:`load_expert`): ``expert.safetensors`` (one ``z``
per matrix) + ``expert.json`` (model hash, student, matrices, layers, domain, objective), refused when
they do not fit the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uzr.adapters.svd import Decomposition
from uzr.attention import decoder_of
from uzr.checkpoint import load_checkpoint, save_checkpoint
from uzr.hooks import ModelEdit

INIT_Z = 0.1  # the reference's init_val (sigmoid(0.1) = 0.525, the same for every entry)
EXPERT_FORMAT, EXPERT_VERSION = "uzr.svf_expert", 1
WEIGHTS_FILE, META_FILE = "expert.safetensors", "expert.json"


def layer_of(name: str) -> int:
    """``layers.3.mlp.up_proj`` -> 3."""
    return int(name.split(".")[1])


def initial_z(decomp: Decomposition, value: float = INIT_Z) -> dict[str, Tensor]:
    return {name: torch.full_like(s, value) for name, s in decomp.S.items()}


def scale_factor(S: Tensor, m: Tensor) -> Tensor:
    """``f = m · ΣS / Σ(S ⊙ m) − 1`` (r,): ``W' − W = U diag(S ⊙ f) Vh``."""
    return m * (S.sum() / (S * m).sum()) - 1


def is_uniform(m: Tensor) -> bool:
    return bool((m == m.reshape(-1)[0]).all())


@dataclass
class SVFExpert:
    """One expert: ``z`` per adapted matrix and what it was made for (``meta``: model_hash, student,
    matrices, layers, domain, objective, ...)."""

    z: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def masks(self) -> dict[str, Tensor]:
        return {name: torch.sigmoid(z.float()) for name, z in self.z.items()}

    @property
    def num_parameters(self) -> int:
        return sum(int(z.numel()) for z in self.z.values())


def mix_masks(masks: Sequence[Mapping[str, Tensor]], coeffs: Tensor) -> dict[str, Tensor]:
    """``m' = Σ_k a[k, layer] m_k`` per matrix (``coeffs``: (K, L) over the decoder layers of the matrices).

    Like the reference's ``WeightedCombination`` the masks (``sigmoid(z)``), not the ``z``, are mixed —
    where the issue writes ``z' = Σ a_k z_k`` (the mask of a mixed ``z`` would not be linear in ``a``)."""
    names = list(masks[0])
    if any(list(m) != names for m in masks):
        raise ValueError("experts in a mixture must adapt the same matrices")
    layers = sorted({layer_of(n) for n in names})
    col = {layer: i for i, layer in enumerate(layers)}
    if coeffs.shape != (len(masks), len(layers)):
        raise ValueError(f"mixing coefficients of shape {tuple(coeffs.shape)}; expected (experts={len(masks)}, "
                         f"layers={len(layers)})")
    out = {n: sum(float(coeffs[k, col[layer_of(n)]]) * m[n] for k, m in enumerate(masks)) for n in names}
    # all coefficients of a layer at 0: no mask to rescale; the base matrix (a uniform mask) is the limit
    return {n: m if bool((m > 0).any()) else torch.ones_like(m) for n, m in out.items()}


class SVFEdit(ModelEdit):
    """Materialise ``W'`` for every matrix whose mask is not uniform; ``remove()`` restores the originals.

    ``masks``: ``{matrix name: m (r,)}`` (an expert's :meth:`SVFExpert.masks`, or a mixture's).
    Attaching costs one ``(out, r) @ (r, in)`` product per changed matrix; decoding then runs the plain
    model code on the new weights.
    """

    def __init__(self, decomp: Decomposition, masks: Mapping[str, Tensor]):
        unknown = sorted(set(masks) - set(decomp.S))
        if unknown:
            raise ValueError(f"masks for matrices the decomposition does not hold: {unknown[:5]}")
        self.decomp, self.masks = decomp, dict(masks)
        self._saved: list[tuple[nn.Linear, Tensor]] = []

    @torch.no_grad()
    def attach(self, model) -> SVFEdit:
        if self._saved:
            raise RuntimeError("SVFEdit is already attached; remove() it first")
        stack = decoder_of(model)
        try:
            for name, m in self.masks.items():
                if is_uniform(m):
                    continue  # W' = W exactly: leave the matrix alone
                lin = stack.get_submodule(name)
                w = lin.weight
                U, S, Vh = (t.to(w.device) for t in (self.decomp.U[name], self.decomp.S[name], self.decomp.Vh[name]))
                if (U.shape[0], Vh.shape[1]) != tuple(w.shape):
                    raise ValueError(f"{name}: weight {tuple(w.shape)} does not fit the decomposition "
                                     f"{(U.shape[0], Vh.shape[1])} (an expert of another model?)")
                f = scale_factor(S, m.to(device=w.device, dtype=torch.float32))
                self._saved.append((lin, w.detach().clone()))
                w.copy_((w.float() + (U * (S * f)) @ Vh).to(w.dtype))
        except Exception:
            self.remove()
            raise
        return self

    @torch.no_grad()
    def remove(self) -> None:
        for lin, original in reversed(self._saved):
            lin.weight.copy_(original)
        self._saved = []


class SVFTrainable(nn.Module, ModelEdit):
    """Differentiable SVF for training: ``z`` parameters and forward hooks on the adapted ``Linear``s.

    Each hook adds ``((x Vhᵀ) ⊙ (S ⊙ f(z))) Uᵀ`` to the layer's output, i.e. computes ``x W'ᵀ`` without
    forming ``W'`` (cheaper than recomposing every matrix at every step for short sequences). The model's
    own weights are never modified.
    """

    def __init__(self, decomp: Decomposition, z: Mapping[str, Tensor] | None = None):
        nn.Module.__init__(self)
        self.decomp = decomp
        start = dict(z) if z is not None else initial_z(decomp)
        self.names = list(decomp.S)
        self.z = nn.ParameterList([nn.Parameter(start[n].detach().clone().float()) for n in self.names])
        self.fixed: dict[str, Tensor] | None = None  # masks that replace sigmoid(z) (e.g. a mixture being scored)
        self._handles: list = []

    def set_masks(self, masks: Mapping[str, Tensor] | None) -> None:
        """Use fixed ``masks`` instead of ``sigmoid(z)`` (None: back to ``z``); no weight is written."""
        self.fixed = None if masks is None else {n: masks[n].float() for n in self.names}

    def z_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.z)}

    def masks(self) -> dict[str, Tensor]:
        return {n: torch.sigmoid(p.detach().float()) for n, p in zip(self.names, self.z)}

    def frozen(self) -> SVFEdit:
        """The current expert as an :class:`SVFEdit` (weights materialised once): what sampling uses, since
        decoding through the hooks runs at about half the plain model's speed (``benchmarks/svf.py``)."""
        return SVFEdit(self.decomp, self.fixed if self.fixed is not None else self.masks())

    def attach(self, model) -> SVFTrainable:
        if self._handles:
            raise RuntimeError("SVFTrainable is already attached; remove() it first")
        stack = decoder_of(model)
        for i, name in enumerate(self.names):
            lin = stack.get_submodule(name)
            dev = lin.weight.device
            factors = tuple(t.to(dev) for t in (self.decomp.U[name], self.decomp.S[name], self.decomp.Vh[name]))
            self._handles.append(lin.register_forward_hook(self._hook(i, factors)))
        return self

    def _hook(self, i: int, factors: tuple[Tensor, Tensor, Tensor]):
        U, S, Vh = factors
        name = self.names[i]

        def hook(module, args, output):
            m = self.fixed[name].to(S.device) if self.fixed is not None else torch.sigmoid(self.z[i].to(S.device))
            if self.fixed is not None and is_uniform(m):
                return output
            f = scale_factor(S, m)
            x = args[0]
            delta = ((x.float() @ Vh.T) * (S * f)) @ U.T
            return output + delta.to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------------------- checkpoints
def expert_meta(decomp: Decomposition, student: str, matrices: str, layers: Sequence[int] | None, domain: str,
                objective: str, **extra) -> dict[str, Any]:
    return {"model_hash": decomp.model_hash, "student": student, "matrices": matrices,
            "layers": sorted({layer_of(n) for n in decomp.names}) if layers is None else sorted(layers),
            "domain": domain, "objective": objective, "ranks": decomp.ranks(), **extra}


def save_expert(folder: str | os.PathLike, expert: SVFExpert) -> Path:
    """``expert.safetensors`` (``z`` per matrix) + ``expert.json`` into ``folder``, each atomically."""
    missing = [k for k in ("model_hash", "student", "matrices", "layers", "domain", "objective") if k not in expert.meta]
    if missing:
        raise ValueError(f"expert metadata lacks {missing}: an expert records what it was made for")
    return save_checkpoint(folder, WEIGHTS_FILE, META_FILE, expert.z, expert.meta, EXPERT_FORMAT, EXPERT_VERSION)


def load_expert(folder: str | os.PathLike, expected: Mapping[str, Any] | None = None,
                decomp: Decomposition | None = None) -> SVFExpert:
    """An expert written by :func:`save_expert`. ``expected`` (e.g. ``model_hash``, ``matrices``, ``layers``)
    must match its metadata (the error names the field); with ``decomp``, every ``z`` must fit its matrix."""
    d = Path(folder)
    hint = f"train the expert for this model/config again (delete {d}) or point to the right one"
    tensors, meta = load_checkpoint(d, WEIGHTS_FILE, META_FILE, EXPERT_FORMAT, EXPERT_VERSION, expected, hint)
    if decomp is not None:
        if meta["model_hash"] != decomp.model_hash:
            raise ValueError(f"svf expert {d} does not match this model: model_hash={meta['model_hash']!r} in the "
                             f"expert, {decomp.model_hash!r} for the loaded weights; {hint}")
        wrong = [n for n in decomp.names if n not in tensors or tensors[n].shape != decomp.S[n].shape]
        if wrong or set(tensors) != set(decomp.names):
            raise ValueError(f"svf expert {d} does not fit the adapted matrices (e.g. {(wrong or sorted(tensors))[:3]}); "
                             f"{hint}")
    return SVFExpert(dict(tensors), meta)
