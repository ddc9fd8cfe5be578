"""attention_modules finds the text decoder through the model's own API, also in vision-language models."""

from __future__ import annotations

import pytest
import torch

from uzr.attention import LayerRecorder, attention_modules, decoder_of, use_uzr_attention
from uzr.attention.stats import STAT_NAMES, BlockGeometry, attention_stats

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)


def tiny_vlm(family: str):
    """A randomly initialised vision-language model with a 3-layer text decoder, built offline."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "qwen2_vl":  # multimodal rotary positions (mrope)
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
        config = tf.Qwen2VLConfig(
            text_config=dict(**TEXT, rope_parameters=rope),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, in_channels=3))
        model = tf.Qwen2VLForConditionalGeneration(config)
    elif family == "gemma3":  # sliding-window text layers
        config = tf.Gemma3Config(
            text_config=dict(**TEXT, head_dim=8, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4)
        model = tf.Gemma3ForConditionalGeneration(config)
    else:
        config = tf.LlavaConfig(
            text_config=tf.LlamaConfig(**TEXT),
            vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32))
        model = tf.LlavaForConditionalGeneration(config)
    return model.eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llava"])
def test_vlm_text_decoder_is_hooked_and_records_eager_statistics(family):
    model = tiny_vlm(family)
    text = model.config.text_config
    decoder = decoder_of(model)
    assert decoder is model.get_decoder() and decoder is not model.model  # the language model, not the wrapper
    modules = attention_modules(model)
    assert len(modules) == text.num_hidden_layers
    assert all(a is layer.self_attn for a, layer in zip(modules, decoder.layers))
    vision = {id(m) for name, child in model.model.named_children() if name != "language_model"
              for m in child.modules()}
    assert not any(id(m) in vision for m in modules)

    ids = torch.randint(1, text.vocab_size, (1, 13), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True)
    use_uzr_attention(model)
    for module in modules:
        module.uzr_recorder = LayerRecorder(4, keep_head_mean=True, block_size=5)
    try:
        with torch.no_grad():
            recorded = model(input_ids=ids)
        results = [module.uzr_recorder.result() for module in modules]
    finally:
        for module in modules:
            del module.uzr_recorder
    torch.testing.assert_close(recorded.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert len(eager.attentions) == len(results)
    s = ids.shape[1]
    i = torch.arange(s)
    geometry = BlockGeometry.for_block(0, s, s, s, "cpu")
    for layer, (stats, head_mean) in enumerate(results):
        probs = eager.attentions[layer].float()  # (1, H, S, S)
        allowed = i[None, :] <= i[:, None]
        if getattr(text, "layer_types", None) and text.layer_types[layer] == "sliding_attention":
            allowed = allowed & (i[:, None] - i[None, :] < text.sliding_window)
        ref = attention_stats(probs, allowed, geometry, window=4)
        for name in STAT_NAMES:
            torch.testing.assert_close(stats[name], ref[name], atol=2e-4, rtol=1e-4, msg=f"{family} L{layer} {name}")
        torch.testing.assert_close(head_mean, probs.mean(1), atol=1e-5, rtol=1e-4)


def test_causal_lm_decoder_and_clear_error(tiny_models):
    model, _ = tiny_models["llama"]
    assert decoder_of(model) is model.model and decoder_of(model.model) is model.model
    assert len(attention_modules(model)) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="Linear: no decoder layers found"):
        attention_modules(torch.nn.Linear(2, 2))
