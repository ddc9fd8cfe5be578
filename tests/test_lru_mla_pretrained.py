"""The pretrained LRU/MLA ablation (issue 27): MLA conversion of the packaged student, the cached prefix, deep-start
ACT, few-shot prompts and config refusals."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.conftest import model_spec, refusal_before_loading, share_models


@pytest.fixture(scope="module")
def smollm(converted_models, tmp_path_factory):
    """SmolLM2-135M (the packaged student, float32) and its tokenizer."""
    from uzr.models import load_model

    spec = model_spec("student/smollm2_135m")
    if importlib.util.find_spec(spec.gguf_package) is None:
        pytest.skip(f"packaged model not installed: {spec.gguf_package}")
    cache = share_models(tmp_path_factory.mktemp("smollm-cache"), converted_models)
    return load_model(spec, cache_dir=cache, role="student")


@pytest.fixture(scope="module")
def smollm_run(smollm):
    """The student's full forward (hidden states of every layer, logits) on two texts and the lower 28 layers'
    output (what the top reads)."""
    from uzr.reasoning.prefix import lower_stack, prefix_states

    model, tok = smollm
    texts = ["Q: A=1,B=12,C=3|B=A-2;C=B*3|p|r2\nA: A=1,B=12,C=3\n", "The quick brown fox jumps over the lazy dog."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        full = [model(torch.tensor([i]), output_hidden_states=True) for i in ids]
    return ids, full, prefix_states(lower_stack(model, 2), ids, batch_size=1)


def test_the_lower_stack_gives_the_students_hidden_state_below_the_top(smollm, smollm_run):
    from uzr.reasoning.prefix import lower_stack, prefix_states

    ids, full, states = smollm_run
    batched = prefix_states(lower_stack(smollm[0], 2), ids, batch_size=2)  # right-padded together
    for f, s, b in zip(full, states, batched):
        torch.testing.assert_close(s, f.hidden_states[28][0], rtol=0, atol=1e-5)  # input of layer 28 of 30
        scale = float(s.abs().max())  # ~1e4 (massive activations): padding's float noise is relative to it
        assert scale > 100 and float((b - s).abs().max()) < 1e-7 * scale


def _layer_outputs(top, states) -> list[torch.Tensor]:
    with torch.no_grad():
        return [top.layers[0](s[None], None)[0][0] for s in states]


def _attention_outputs(top, states) -> list[torch.Tensor]:
    layer = top.layers[0]
    with torch.no_grad():
        return [layer.self_attn(layer.input_layernorm(s[None]), None)[0][0] for s in states]


def _relative_error(top, reference, states) -> float:
    """||converted - original|| / ||original|| of the first layer's attention output, over both texts."""
    got, ref = torch.cat(_attention_outputs(top, states)), torch.cat(_attention_outputs(reference, states))
    return float((got - ref).norm() / ref.norm())


def test_mla_conversion_at_full_rank_reproduces_the_layer_and_the_logits(smollm, smollm_run):
    from uzr.reasoning.mla_convert import full_rank
    from uzr.reasoning.pretrained_top import convert_top, copy_top

    model, _ = smollm
    ids, full, states = smollm_run
    original = copy_top(model, 2)  # group A's copy of the top two layers reproduces the student's layer 28
    for out, f in zip(_layer_outputs(original, states), full):
        torch.testing.assert_close(out, f.hidden_states[29][0], rtol=1e-4, atol=1e-4)
    for pairs in (0, 4):
        rank = full_rank(original.layers[0].self_attn, pairs)
        assert rank == 3 * (128 - 2 * pairs)  # 3 KV heads x (key dims not kept + value dims)
        top = convert_top(copy_top(model, 2), rank, pairs)
        for got, ref in zip(_attention_outputs(top, states), _attention_outputs(original, states)):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # the attention's output itself
        for out, f in zip(_layer_outputs(top, states), full):
            torch.testing.assert_close(out, f.hidden_states[29][0], rtol=1e-4, atol=1e-4)  # the layer's
        with torch.no_grad():
            for f, s in zip(full, states):
                torch.testing.assert_close(top.logits(top(s[None]).hidden), f.logits, rtol=0, atol=1e-4)


def test_mla_conversion_error_falls_as_the_latent_rank_grows(smollm, smollm_run):
    from uzr.reasoning.pretrained_top import convert_top, copy_top

    model, _ = smollm
    _, _, states = smollm_run
    original = copy_top(model, 1)
    errors = [_relative_error(convert_top(copy_top(model, 1), r, 4), original, states) for r in (16, 64, 256, 360)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-5 < 1e-2 < errors[2], errors


def _tiny_spec(**pretrained):
    from uzr.config.lru_mla import LRUMLASpec, PretrainedSpec

    return LRUMLASpec(max_steps=4, pretrained=PretrainedSpec(top_layers=1, latent_rank=8, rope_pairs=1, **pretrained))


def test_the_cached_prefix_gives_the_full_forwards_loss_and_gradients(tiny_models):
    """Loss and gradients of the top from states computed once per item (unbatched, no grad) equal those of one
    forward through lower and top on the padded batch."""
    from torch.nn import functional as F

    from uzr.masks import pad_sequences
    from uzr.reasoning.prefix import lower_stack, prefix_states
    from uzr.reasoning.pretrained_items import TokenItems
    from uzr.reasoning.pretrained_top import group_top
    from uzr.reasoning.pretrained_training import answer_logits, batch_of

    model, _ = tiny_models["llama"]
    top = group_top(model, _tiny_spec(), "mla_lru_act", seed=0)
    for attn in top.latent_attentions():
        attn.refiner.gate.data.fill_(0.5)  # the LRU on (at initialisation its residual is 0)
    lower = lower_stack(model, 1)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (9, 14, 6)]
    items = TokenItems(ids, [5, 10, 3], [[2, 4], [4], [1, 3]], np.array([1, 2, 3]), ["", "", ""])

    def loss_and_grads(hidden, mask):
        top.zero_grad()
        _, _, where, targets = batch_of([torch.zeros(len(i), hidden.shape[-1]) for i in ids], items, [0, 1, 2])
        logits, out = answer_logits(top, hidden, mask, where)
        loss = F.cross_entropy(logits, targets) + out.aux
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in top.named_parameters() if p.grad is not None}

    hidden, mask, _, _ = batch_of(prefix_states(lower, ids, batch_size=1), items, [0, 1, 2])
    cached = loss_and_grads(hidden, mask)
    padded, pad_mask = pad_sequences(ids)
    full = loss_and_grads(lower(input_ids=padded, attention_mask=pad_mask.long()).last_hidden_state, pad_mask)
    assert abs(cached[0] - full[0]) < 1e-5 and cached[1].keys() == full[1].keys() and len(cached[1]) > 20
    for name, grad in cached[1].items():
        torch.testing.assert_close(grad, full[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_deep_start_act_halts_later_than_bias_zero_at_initialisation(tiny_models):
    from uzr.reasoning.pretrained_top import group_top

    model, _ = tiny_models["llama"]
    hidden = torch.randn(3, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    mean_steps = {}
    for bias in (0.0, -3.0):
        spec = _tiny_spec()
        spec.halt_bias_init = bias
        top = group_top(model, spec, "mla_lru_act", seed=0)
        with torch.no_grad():
            out = top(hidden)
        mean_steps[bias] = float(torch.stack([r.halted.steps.float() for r in out.refined]).mean())
    # bias 0: p = 0.5 at every step, halts at step 2; -3: p = 0.047, runs to T_max = 4
    assert mean_steps == {0.0: 2.0, -3.0: 4.0}


def test_fewshot_prompts_put_demonstrations_first_and_never_the_question(smollm):
    from uzr.reasoning.pretrained_items import demonstrations, encode, fewshot_items
    from uzr.reasoning.training import task_texts

    _, tok = smollm
    from uzr.config.lru_mla import LRUMLASpec

    spec = LRUMLASpec()
    p, a, lv, seen = task_texts(spec, 40, seed=0)
    train = encode(tok, p, a, lv)
    p2, a2, lv2, _ = task_texts(spec, 6, seed=5, exclude=seen)
    questions = encode(tok, p2, a2, lv2)
    demos = demonstrations(train, 4, seed=0, exclude=set(questions.prompts))
    shots = fewshot_items(train, demos, questions)
    block = [t for i in demos for t in train.ids[i]]
    for i in range(len(questions)):
        assert shots.ids[i] == block + questions.ids[i]  # demonstrations, then the question and its answer
        assert shots.answer_start[i] == len(block) + questions.answer_start[i]
        text = tok.decode(shots.ids[i])
        assert text.count("Q: ") == 5 and text.rindex("Q: ") == len(tok.decode(block))
    assert not {train.prompts[i] for i in demos} & set(questions.prompts)
    # a question among the training items cannot be its own demonstration
    own = encode(tok, p[:1], a[:1], lv[:1])
    assert 0 not in demonstrations(train, 39, seed=0, exclude=set(own.prompts))
    with pytest.raises(ValueError, match="demonstration is one of the questions"):
        fewshot_items(train, [0], own)


@pytest.mark.parametrize(("override", "message"), [
    ("lru_mla.pretrained.latent_rank=0", r"lru_mla.pretrained.latent_rank=0 is invalid"),
    ("lru_mla.pretrained.fewshot_shots=[0,2,2]", r"lru_mla.pretrained.fewshot_shots=\[0, 2, 2\] is invalid"),
    ("lru_mla.objective=rl", r"lru_mla.objective='rl' is invalid"),
    ("lru_mla.pretrained.kl_exit_tol=0", r"lru_mla.pretrained.kl_exit_tol=0"),
])
def test_bad_pretrained_settings_fail_before_models_load(monkeypatch, override, message):
    import re

    assert re.search(message, refusal_before_loading(monkeypatch, "+experiment=lru_mla_pretrained", override))


def test_the_reward_objective_is_refused_for_the_from_scratch_stage(monkeypatch):
    assert "sft for stage lru_mla" in refusal_before_loading(monkeypatch, "+experiment=lru_mla", "lru_mla.objective=reward")
