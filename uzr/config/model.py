"""The ``teacher`` / ``student`` config groups: which model to load and how (torch-free)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from uzr.config.checks import check_float, check_int, is_int, is_number
from uzr.config.groups import ConfigGroup
from uzr.config.keys import KEYED_UNLESS_DEFAULT

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
# Which layers of a pruned model a heal trains (uzr/models/heal.py): those next to each cut, or every decoder layer.
HEAL_SCOPES = ("seam", "all")


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


@dataclass
class PruneSpec:
    """Decoder layers dropped from the loaded model (a same-family student, DESIGN.md §8); default: none.

    The pruned model keeps the other layers in order (its layer ``i`` is the source layer ``kept_layers[i]``), each
    with its own weights and attention type (uzr/models/prune.py). ``heal_steps`` > 0 heals it: that many Adam steps
    of logit distillation from the unpruned model (KL of the next-token distributions, same tokenizer) on the run's
    training texts, ``heal_texts`` texts of at most ``heal_max_length`` tokens per step, training the kept layers next
    to each cut (``heal_scope=seam``) or every decoder layer (``all``); embeddings and the final norm stay the
    model's. The healed weights are a cached artifact (uzr/models/heal.py).
    """

    layers: list[int] = field(default_factory=list)  # 0-based source layers to drop; [] = none
    heal_steps: int = 0  # 0 = no healing
    heal_lr: float = 1e-4
    heal_texts: int = 4  # training texts per step (each run on its own: no padding)
    heal_max_length: int = 128  # tokens per text
    heal_scope: str = "seam"  # one of HEAL_SCOPES


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
    # decoder layers dropped at load (before any damage); none by default, and then out of every key
    prune: PruneSpec = field(default_factory=PruneSpec, metadata=KEYED_UNLESS_DEFAULT)

    @property
    def kept_layers(self) -> list[int]:
        """The source layer behind each layer of the loaded model (all of them unless ``prune.layers``)."""
        dropped = set(self.prune.layers)
        return [layer for layer in range(self.num_layers) if layer not in dropped]

    @property
    def loaded_layers(self) -> int:
        """How many decoder layers the loaded model has: ``num_layers`` (the source model's, checked against it at
        load) less the pruned ones. Layer indices of every other group (inject, harvest, damage) count these."""
        return self.num_layers - len(set(self.prune.layers))

    def validate(self, role: str = "model") -> ModelSpec:
        """Raise ValueError naming the key, the bad value and the valid choices; return self."""
        validate_spec(self, role)
        return self


def model_key(spec: ModelSpec) -> dict[str, Any]:
    """The spec as the key of the model it loads (the harvest store's). ``damage`` and ``prune`` are left out when
    they change nothing, so the keys of whole, undamaged models are what they were before either existed; a damaged
    spec always differs, a null strength keyed as the kind's default. (Stages keyed before damage existed, svf and
    facts QA, key the spec as written: :func:`uzr.config.keys.key_of`, which leaves out a default ``prune``.)"""
    plain = asdict(spec)
    if not spec.prune.layers:
        plain.pop("prune")
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
    validate_prune(spec, role)
    validate_damage(spec, role)


def validate_prune(spec: ModelSpec, role: str = "model") -> None:
    """Check ``spec.prune`` against the declared ``num_layers`` (torch-free); keys are named ``<role>.prune.*``."""
    prune = spec.prune
    if not isinstance(prune, PruneSpec):
        raise invalid(role, "prune", prune, f"a mapping with keys {[f.name for f in fields(PruneSpec)]}")
    layers = list(prune.layers)
    if not all(is_int(layer) for layer in layers):
        raise invalid(role, "prune.layers", layers, "a list of integer layer indices")
    bad = [layer for layer in layers if not 0 <= layer < spec.num_layers]
    if bad:
        raise invalid(role, "prune.layers", layers,
                      f"layers inside 0..{spec.num_layers - 1} ({spec.name} declares num_layers={spec.num_layers}); "
                      f"outside: {bad}")
    if len(set(layers)) != len(layers):
        raise invalid(role, "prune.layers", layers, "each layer at most once")
    if len(layers) == spec.num_layers:
        raise invalid(role, "prune.layers", layers, f"at most {spec.num_layers - 1} of the {spec.num_layers} layers "
                                                    "(a model needs one layer left)")
    check_int(f"{role}.prune.heal_steps", prune.heal_steps, 0)
    if prune.heal_steps and not layers:
        raise invalid(role, "prune.heal_steps", prune.heal_steps,
                      f"0 when nothing is pruned (nothing to heal): set {role}.prune.heal_steps=0 or name "
                      f"{role}.prune.layers")
    check_float(f"{role}.prune.heal_lr", prune.heal_lr, 0.0, open_low=True)
    check_int(f"{role}.prune.heal_texts", prune.heal_texts, 1)
    check_int(f"{role}.prune.heal_max_length", prune.heal_max_length, 2,
              valid="an integer >= 2 (a text needs a token to predict)")
    if prune.heal_scope not in HEAL_SCOPES:
        raise invalid(role, "prune.heal_scope", prune.heal_scope, f"one of {list(HEAL_SCOPES)}")
    if prune.heal_steps and spec.damage.layers:
        raise invalid(role, "prune.heal_steps", prune.heal_steps,
                      f"0 with {role}.damage.layers (a heal trains toward the unpruned model, which has no damage "
                      "to match): heal without damage, or damage without healing")
    if prune.heal_steps and spec.quantization != "none":
        raise invalid(role, "prune.heal_steps", prune.heal_steps,
                      f"0 with quantization={spec.quantization!r} (healing trains float weights)")


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
    depth = spec.loaded_layers  # damage acts on the loaded model: after pruning
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        pruned = f" less {len(spec.prune.layers)} pruned" if spec.prune.layers else ""
        raise invalid(role, "damage.layers", layers,
                      f"layers inside 0..{depth - 1} ({spec.name} declares num_layers={spec.num_layers}{pruned}); "
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
    for name, nested in (("damage", DamageSpec), ("prune", PruneSpec)):
        if isinstance(spec.get(name), dict):
            nested_keys = {f.name for f in fields(nested)}
            unknown = sorted(set(spec[name]) - nested_keys)
            if unknown:
                raise ValueError(f"unknown model spec keys {[f'{name}.{k}' for k in unknown]}; "
                                 f"valid {name} keys: {sorted(nested_keys)}")
            spec[name] = nested(**spec[name])
    return ModelSpec(**spec)


def validate_model(cfg, role: str) -> None:
    """The ``role`` group's spec, and what a heal reads: the run's training texts (the ``data`` group, which the
    heal's cache key holds), so a healed model only loads in runs whose stages read that group."""
    spec = getattr(cfg, role)
    validate_spec(spec, role)
    if spec.prune.heal_steps and cfg.data is None:
        raise invalid(role, "prune.heal_steps", spec.prune.heal_steps,
                      "0 in a run whose stages read no data group (a heal trains on the data group's training "
                      f"texts): select a stage that reads it (harvest) or set {role}.prune.heal_steps=0")


def model_group(role: str) -> ConfigGroup:
    """The ``teacher`` or ``student`` group: a :class:`ModelSpec` validated under its role's name."""
    return ConfigGroup(role, ModelSpec, lambda cfg: validate_model(cfg, role))


CONFIG_GROUPS = (model_group("teacher"), model_group("student"))
