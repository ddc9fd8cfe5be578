"""The ``teacher`` / ``student`` config groups: which model to load and how (torch-free)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from uzr.config.checks import is_int, is_number
from uzr.config.groups import ConfigGroup

SOURCES = ("hub", "gguf_package", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
ARCHITECTURES = ("llama", "gemma3", "qwen2", "llava")  # llava: tiny LLaVA-style VLM (CLIP + llama)
TINY_TOKENIZERS = ("bpe", "char")
# Ways to damage chosen attention layers at load (uzr/models/damage.py): both change only the attention
# probabilities of the damaged layers; weights elsewhere, values and every other layer stay the model's.
DAMAGE_KINDS = ("temperature", "permute_heads")
# Per kind: the strength used when `damage.strength` is null, and what a valid strength is.
DAMAGE_DEFAULT_STRENGTH = {"temperature": 4.0, "permute_heads": 1.0}


@dataclass
class DamageSpec:
    """Attention damage applied to the loaded model (the positive control's student); default: none.

    - ``temperature``: the damaged layers' attention logits are divided by ``strength`` (> 0; > 1
      flattens, < 1 sharpens, 1 changes nothing), by dividing the attention module's ``scaling``.
    - ``permute_heads``: in the damaged layers the query heads are permuted, so each head's query
      meets another head's keys and values; ``strength`` in [0, 1] is the fraction of heads moved
      (``round(strength * num_heads)``, never exactly 1 head), the permutation is seeded by ``seed``.
    """

    layers: list[int] = field(default_factory=list)  # 0-based layers to damage; [] = no damage
    kind: str = "temperature"  # one of DAMAGE_KINDS
    strength: float | None = None  # None = the kind's default (DAMAGE_DEFAULT_STRENGTH)
    seed: int = 0  # permute_heads only: which heads move where

    @property
    def effective_strength(self) -> float:
        return DAMAGE_DEFAULT_STRENGTH[self.kind] if self.strength is None else float(self.strength)


def moved_heads(strength: float, num_heads: int) -> int:
    """How many query heads ``permute_heads`` moves at ``strength``."""
    return round(strength * num_heads)


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
    damage: DamageSpec = field(default_factory=DamageSpec)  # attention damage applied at load; none by default

    def validate(self, role: str = "model") -> ModelSpec:
        """Raise ValueError naming the key, the bad value and the valid choices; return self."""
        validate_spec(self, role)
        return self


def model_key(spec: ModelSpec) -> dict[str, Any]:
    """The spec as the key of the model it loads (the harvest store's). ``damage`` is left out when it damages
    nothing, so the keys of undamaged models are what they were before damage existed; a damaged spec always
    differs, a null strength keyed as the kind's default. (Stages keyed before damage existed, svf and facts QA,
    key the spec as written: :func:`uzr.config.keys.key_of`.)"""
    plain = asdict(spec)
    if not spec.damage.layers:
        plain.pop("damage")
    else:  # one key per damaged model: a null strength is the kind's default
        plain["damage"]["strength"] = spec.damage.effective_strength
    return plain


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
        if not is_int(value) or value < 1:
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
    validate_damage(spec, role)


def validate_damage(spec: ModelSpec, role: str = "model") -> None:
    """Check ``spec.damage`` against the declared sizes (torch-free); keys are named ``<role>.damage.*``."""
    damage = spec.damage
    if not isinstance(damage, DamageSpec):
        raise invalid(role, "damage", damage, "a mapping with keys layers, kind, strength, seed")
    if damage.kind not in DAMAGE_KINDS:
        raise invalid(role, "damage.kind", damage.kind, f"one of {list(DAMAGE_KINDS)}")
    layers = list(damage.layers)
    if not all(is_int(layer) for layer in layers):
        raise invalid(role, "damage.layers", layers, "a list of integer layer indices")
    bad = [layer for layer in layers if not 0 <= layer < spec.num_layers]
    if bad:
        raise invalid(role, "damage.layers", layers,
                      f"layers inside 0..{spec.num_layers - 1} ({spec.name} declares num_layers={spec.num_layers}); "
                      f"outside: {bad}")
    if len(set(layers)) != len(layers):
        raise invalid(role, "damage.layers", layers, "each layer at most once")
    strength = damage.effective_strength
    if not is_number(strength):
        raise invalid(role, "damage.strength", damage.strength, "a finite number or null (the kind's default)")
    if damage.kind == "temperature" and strength <= 0:
        raise invalid(role, "damage.strength", damage.strength,
                      "a number > 0 for kind=temperature (logits are divided by it; > 1 flattens)")
    if damage.kind == "permute_heads":
        if not 0 <= strength <= 1:
            raise invalid(role, "damage.strength", damage.strength,
                          "a fraction of heads in [0, 1] for kind=permute_heads")
        if moved_heads(strength, spec.num_heads) == 1:
            raise invalid(role, "damage.strength", damage.strength,
                          f"a fraction that moves 0 or >= 2 of the {spec.num_heads} heads (one head cannot move alone)")
        if layers and spec.quantization != "none":
            raise invalid(role, "damage.kind", damage.kind,
                          f"'temperature' with quantization={spec.quantization!r} (permute_heads rewrites q_proj weights)")


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
    spec = dict(spec)
    if isinstance(spec.get("damage"), dict):
        damage_keys = {f.name for f in fields(DamageSpec)}
        unknown = sorted(set(spec["damage"]) - damage_keys)
        if unknown:
            raise ValueError(f"unknown model spec keys {[f'damage.{k}' for k in unknown]}; "
                             f"valid damage keys: {sorted(damage_keys)}")
        spec["damage"] = DamageSpec(**spec["damage"])
    return ModelSpec(**spec)


def model_group(role: str) -> ConfigGroup:
    """The ``teacher`` or ``student`` group: a :class:`ModelSpec` validated under its role's name."""
    return ConfigGroup(role, ModelSpec, lambda cfg: validate_spec(getattr(cfg, role), role))


CONFIG_GROUPS = (model_group("teacher"), model_group("student"))
