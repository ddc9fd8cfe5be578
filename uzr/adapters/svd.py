"""The weight matrices an SVF expert adapts and their singular value decompositions (float32, cached).

A matrix is named by its path under the decoder stack (:func:`uzr.attention.decoder_of`), e.g.
``layers.3.mlp.down_proj``. ``matrices="mlp"`` picks every ``nn.Linear`` inside each chosen layer's
``mlp`` module, ``"attn"`` those inside ``self_attn``, ``"mlp+attn"`` both (Transformer² adapts MLP
matrices only by default).

``W = U diag(S) Vh`` is computed once per matrix in float32 (``torch.linalg.svd``, thin) and stored in
the artifact cache under the hash of the adapted weights (:func:`weights_hash`), so every run on the same
model reuses it; a cached file whose hash or matrix set differs is never used for another model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from uzr.attention import decoder_of
from uzr.cache import atomic_write

log = logging.getLogger(__name__)

MATRICES = ("mlp", "attn", "mlp+attn")
_PARTS = {"mlp": ("mlp",), "attn": ("self_attn",), "mlp+attn": ("mlp", "self_attn")}
SVD_VERSION = 1  # part of the cache file name: bump when the stored layout changes


def target_matrices(model, matrices: str = "mlp", layers: Sequence[int] | None = None) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` of the adapted matrices, in layer order (``layers=None``: every layer)."""
    if matrices not in MATRICES:
        raise ValueError(f"svf.matrices={matrices!r} is unknown; valid choices: {', '.join(MATRICES)}")
    stack = decoder_of(model).layers
    chosen = range(len(stack)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"svf.layers={list(chosen)}: {bad} outside the model's layers 0..{len(stack) - 1}")
    out: dict[str, nn.Linear] = {}
    for i in chosen:
        for part in _PARTS[matrices]:
            block = getattr(stack[i], part, None)
            if block is None:
                raise ValueError(f"decoder layer {i} of {type(model).__name__} has no '{part}' module")
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    out[f"layers.{i}.{part}.{name}"] = module
    if not out:
        raise ValueError(f"no nn.Linear matrices found for svf.matrices={matrices!r} in layers {list(chosen)}")
    return out


def weights_hash(linears: dict[str, nn.Linear]) -> str:
    """sha256 (hex, 16 chars) over the names, shapes, dtypes and bytes of the matrices: the model hash."""
    h = hashlib.sha256()
    for name, lin in linears.items():
        w = lin.weight.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Decomposition:
    """Thin SVD of every adapted matrix: ``W = U diag(S) Vh`` with U (out, r), S (r,), Vh (r, in)."""

    model_hash: str
    U: dict[str, Tensor]
    S: dict[str, Tensor]
    Vh: dict[str, Tensor]

    @property
    def names(self) -> list[str]:
        return list(self.S)

    def ranks(self) -> dict[str, int]:
        return {name: int(s.numel()) for name, s in self.S.items()}

    def to(self, device) -> Decomposition:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Decomposition(self.model_hash, move(self.U), move(self.S), move(self.Vh))


def decompose(linears: dict[str, nn.Linear], cache_dir: str | Path | None = None) -> Decomposition:
    """The float32 thin SVD of each matrix, read from ``cache_dir/svd/<model hash>.safetensors`` when
    present, else computed and written there (atomically). ``cache_dir=None``: computed, not stored."""
    model_hash = weights_hash(linears)
    path = Path(cache_dir) / "svd" / f"v{SVD_VERSION}-{model_hash}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            stored = load_file(path)
            if {k.rsplit(".", 1)[0] for k in stored} == set(linears):
                device = next(iter(linears.values())).weight.device
                pick = lambda part: {n: stored[f"{n}.{part}"].to(device) for n in linears}  # noqa: E731
                return Decomposition(model_hash, pick("U"), pick("S"), pick("Vh"))
            log.warning("%s holds another matrix set; recomputing", path)
        except Exception as err:  # damaged file: recompute and overwrite
            log.warning("cannot read %s (%s); recomputing the SVD", path, err)
    U, S, Vh = {}, {}, {}
    for name, lin in linears.items():
        # numpy's LAPACK: torch.linalg.svd took 12 s for one 1536 x 576 float32 matrix on the 2-core CPU
        # (numpy: 1.2 s), and SmolLM2's MLPs have 90 such matrices
        w = lin.weight.detach()
        u, s, vh = (torch.from_numpy(np.ascontiguousarray(a)).to(w.device)
                    for a in np.linalg.svd(w.float().cpu().numpy(), full_matrices=False))
        U[name], S[name], Vh[name] = u, s, vh
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{n}.{part}": t.cpu() for part, d in (("U", U), ("S", S), ("Vh", Vh)) for n, t in d.items()}
        atomic_write(path, lambda p: save_file(flat, p, metadata={"model_hash": model_hash}))
    return Decomposition(model_hash, U, S, Vh)
