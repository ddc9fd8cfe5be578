"""The ``teacher`` / ``student`` config groups: which model to load and how (torch-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

SOURCES = ("hub", "gguf_package", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
ARCHITECTURES = ("llama", "gemma3", "qwen2", "llava")  # llava: tiny LLaVA-style VLM (CLIP + llama)
TINY_TOKENIZERS = ("bpe", "char")


@dataclass
class ModelSpec:
    """What model to load and how; a Hydra structured-config node (plain types only).

    ``num_layers``/``num_heads``/``num_kv_heads``/``hidden_size`` are declared so that configs (layer
    mappings, controller sizes) can be validated before any model loads; for ``hub`` and
    ``gguf_package`` they are checked against the loaded model, for ``tiny`` they define it.
    """

    name: str
    source: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    hub_id: str | None = None
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    architecture: str | None = None
    tokenizer: str | None = None
    intermediate_size: int = 0  # tiny only; 0 means 4 * hidden_size
    dtype: str = "float32"
    quantization: str = "none"
    trust_remote_code: bool = False
    seed: int = 0
    sliding_window: int | None = None  # tiny gemma3 only; None means 8

    def validate(self, role: str = "model") -> ModelSpec:
        """Raise ValueError naming the key, the bad value and the valid choices; return self."""
        validate_spec(self, role)
        return self


def invalid(role: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{role}.{key}={value!r} is invalid: expected {expected}")


def validate_spec(spec: ModelSpec, role: str = "model") -> None:
    """Check a spec without loading anything; ``role`` (e.g. "teacher") prefixes the key in messages."""

    def choice(key: str, choices: tuple[str, ...]) -> None:
        value = getattr(spec, key)
        if value not in choices:
            raise invalid(role, key, value, f"one of {list(choices)}")

    def required(key: str, why: str) -> None:
        if not getattr(spec, key):
            raise invalid(role, key, getattr(spec, key), f"a non-empty value ({why})")

    # The name becomes part of cache folder names.
    if not isinstance(spec.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise invalid(role, "name", spec.name, "letters, digits, '.', '_' or '-' (it names cache folders)")
    choice("source", SOURCES)
    choice("dtype", DTYPES)
    choice("quantization", QUANTIZATIONS)
    for key in ("num_layers", "num_heads", "num_kv_heads", "hidden_size"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise invalid(role, key, value, "a positive integer")
    if spec.num_heads % spec.num_kv_heads:
        raise invalid(role, "num_kv_heads", spec.num_kv_heads, f"a divisor of num_heads={spec.num_heads}")

    if spec.source == "hub":
        required("hub_id", "source=hub")
    elif spec.source == "gguf_package":
        required("gguf_package", "source=gguf_package; the Python module that ships the GGUF file")
    else:
        choice("architecture", ARCHITECTURES)
        choice("tokenizer", TINY_TOKENIZERS)
        if spec.hidden_size % spec.num_heads:
            raise invalid(role, "hidden_size", spec.hidden_size, f"a multiple of num_heads={spec.num_heads}")
        if spec.intermediate_size < 0:
            raise invalid(role, "intermediate_size", spec.intermediate_size, "0 (auto) or a positive integer")
        if spec.sliding_window is not None:
            if spec.architecture != "gemma3":
                raise invalid(role, "sliding_window", spec.sliding_window, "null unless architecture=gemma3")
            if spec.sliding_window < 1:
                raise invalid(role, "sliding_window", spec.sliding_window, "a positive integer or null")


def as_spec(spec: Any) -> ModelSpec:
    """Accept a `ModelSpec`, a Hydra/OmegaConf node or a plain mapping; return a `ModelSpec`."""
    if isinstance(spec, ModelSpec):
        return spec
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            spec = OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # omegaconf is a dependency, but plain dicts must not need it
        pass
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"unknown model spec keys {unknown}; valid keys: {sorted(known)}")
    return ModelSpec(**spec)
