"""The gate: labels, learning (signal vs noise), checkpoints, features, gated parity, the prompt set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uzr.controller import ControllerSpec, build_controller
from uzr.gate import (
    CAUTIOUS,
    CONFIDENT,
    FEATURES,
    WAFFLE,
    GateSpec,
    auroc,
    distribution_entropy,
    feature_names,
    fit_gate,
    gate_features,
    hedged,
    load_gate,
    pool_prefix,
    prompt_label,
    prompt_labels,
    save_gate,
    sequence_parts,
    teacher_uncertainty,
    token_label_threshold,
    token_labels,
    validate_gate_spec,
)
from uzr.injection.injector import AlphaSpec, Injector
from uzr.qa.prompts import PromptSet, build_prompts, format_prompt

FAST = dict(max_epochs=25, batch_size=128, hidden=32, dropout=0.0, lr=3e-3)


# ----------------------------------------------------------------------------------------- labels
def test_low_entropy_teacher_is_confident_flat_is_not():
    vocab = 50
    peaked = np.full(vocab, 0.001)
    peaked[7] = 1 - 0.001 * (vocab - 1)
    flat = np.full(vocab, 1 / vocab)
    medium = np.exp(-np.arange(vocab) / 5.0)
    ent = distribution_entropy(np.stack([peaked, flat, medium]))  # (3,)
    assert ent[0] < 0.5 and abs(ent[1] - np.log(vocab)) < 1e-9
    # quantile threshold over a training set of positions: peaked below, flat above
    threshold = token_label_threshold([ent], GateSpec(confident_quantile=0.5))
    labels = token_labels(ent, threshold)
    assert labels.tolist() == [True, False, False]
    # absolute threshold in nats
    labels = token_labels(ent, token_label_threshold([ent], GateSpec(confident_entropy=1.0)))
    assert labels[0] and not labels[1]


def test_store_row_uncertainty_is_the_next_token_entropy_never_the_attention_statistic():
    s = 5
    row = {"input_ids": np.arange(s), "teacher_entropy": np.zeros((2, 3, s)), "teacher_next_maxprob": np.full(s, 0.9)}
    with pytest.raises(KeyError, match="teacher_next_entropy.*delete the harvest folder"):
        teacher_uncertainty(row)
    row["teacher_next_entropy"] = np.arange(s, dtype=np.float32)
    values, source = teacher_uncertainty(row)
    assert source == "teacher_next_entropy" and values.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("text", [
    "I'm NOT SURE about that.", "It Depends on who you ask", "That CANNOT be known.", "i don\u2019t know",
    "Maybe Paris?", "There is no such   city.", "not\nsure",
])
def test_hedging_phrases_caught_case_insensitively(text):
    assert hedged(text)


@pytest.mark.parametrize("text", ["Paris.", "The capital is Canberra.", "Maybelline makes lipstick.",
                                  "Dependable answer: 42", "Cannotation"])
def test_plain_answers_are_not_hedged(text):
    assert not hedged(text)


def test_prompt_label_rule():
    assert prompt_label("Paris.", 0.2, confident_below=1.0, waffle_above=3.0) == CONFIDENT
    assert prompt_label("I am not sure, maybe Paris.", 0.2, 1.0, 3.0) == CAUTIOUS  # low entropy but hedged
    assert prompt_label("Paris.", 2.0, 1.0, 3.0) == CAUTIOUS  # mid entropy, no hedge
    assert prompt_label("It depends.", 2.0, 1.0, 3.0) == WAFFLE  # hedged and not low
    assert prompt_label("Paris.", 4.0, 1.0, 3.0) == WAFFLE  # high entropy
    assert prompt_label("paris", 0.2, 1.0, 3.0, phrases=["PARIS"]) == CAUTIOUS  # custom phrase list, any case
    answers = [("Paris.", 0.1), ("Rome.", 0.5), ("It depends.", 0.3), ("Lima.", 5.0), ("Oslo.", 2.0)]
    labels, thresholds = prompt_labels(answers, [True] * 5, GateSpec(confident_quantile=0.5, waffle_quantile=0.9))
    assert thresholds["confident_below"] == pytest.approx(0.5)
    assert labels == [CONFIDENT, CAUTIOUS, CAUTIOUS, WAFFLE, CAUTIOUS]


def test_bad_gate_spec_rejected():
    with pytest.raises(ValueError, match="gate.label='tokens'"):
        validate_gate_spec(GateSpec(label="tokens"))
    with pytest.raises(ValueError, match="gate.confident_quantile=1.5"):
        validate_gate_spec(GateSpec(confident_quantile=1.5))
    with pytest.raises(ValueError, match="gate.features"):
        validate_gate_spec(GateSpec(features=["hidden", "logits"]))
    with pytest.raises(ValueError, match="gate.pool"):
        validate_gate_spec(GateSpec(pool="max"))


# --------------------------------------------------------------------------------------- learning
def synthetic(n: int, seed: int, shuffle: bool = False):
    """Separable-ish data: label = sign of a linear function of 3 of 12 features, with a margin."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    score = x[:, 0] + 0.8 * x[:, 3] - 0.6 * x[:, 7]
    keep = score.abs() > 0.3
    x, y = x[keep], score[keep] > 0
    x[:, 11] = -score[keep] + 0.8 * torch.randn(int(keep.sum()), generator=g)  # a noisy "student entropy"
    if shuffle:
        y = y[torch.randperm(len(y), generator=g)]
    return x, y


NAMES = [f"x{i}" for i in range(11)] + ["cur:student_entropy"]


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.4  # many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert auroc(s, y) == pytest.approx(pairwise)
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and np.isnan(auroc([1, 2], [True, True]))


def test_gate_learns_separable_features():
    x, y = synthetic(1500, 0)
    xv, yv = synthetic(600, 1)
    gate = fit_gate(x, y, xv, yv, FAST, NAMES, seed=0)
    report = gate.report()
    assert report["gate"]["auroc"] > 0.95, report
    assert report["gate"]["accuracy"] > 0.85
    assert report["student_entropy"]["auroc"] < report["gate"]["auroc"]  # the noisy single feature is worse
    assert report["beats_majority"] and report["beats_student_entropy"] and report["clearly_above_chance"]
    assert report["verdict"].startswith("gate beats the baselines:")


def test_gate_on_shuffled_labels_stays_at_chance():
    x, y = synthetic(1500, 10, shuffle=True)
    xv, yv = synthetic(600, 50, shuffle=True)
    gate = fit_gate(x, y, xv, yv, FAST, NAMES, seed=0)
    report = gate.report()
    assert 0.35 < report["gate"]["auroc"] < 0.65, report
    assert report["gate_train"]["auroc"] > report["gate"]["auroc"]  # it memorised noise, nothing transfers
    assert not report["clearly_above_chance"]
    assert "NOT" in report["verdict"] or "within noise" in report["verdict"]


def test_one_class_labels_are_refused():
    x, _ = synthetic(200, 0)
    with pytest.raises(ValueError, match="one class only"):
        fit_gate(x, torch.ones(len(x), dtype=torch.bool), x, torch.zeros(len(x), dtype=torch.bool), FAST, NAMES)


def test_save_load_roundtrip_and_tamper_detection(tmp_path):
    x, y = synthetic(600, 0)
    gate = fit_gate(x, y, x[:200], y[:200], dict(FAST, max_epochs=3), NAMES, layers=[1, 2])
    save_gate(gate, tmp_path, {"student": "s"})
    loaded, meta = load_gate(tmp_path, expected={"layers": [1, 2], "student": "s"})
    assert torch.equal(loaded.predict_proba(x), gate.predict_proba(x))
    assert meta["feature_names"] == NAMES and loaded.report() == json.loads(json.dumps(gate.report()))
    with pytest.raises(ValueError, match="layers"):
        load_gate(tmp_path, expected={"layers": [1]})
    weights = tmp_path / "gate.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_gate(tmp_path)


# --------------------------------------------------------------------------------------- features
def random_controllers(model, layers, seed=0):
    torch.manual_seed(seed)
    ctrls = {layer: build_controller(ControllerSpec(key_dim=8, mlp_hidden=16), model.config.hidden_size).eval()
             for layer in layers}
    for ctrl in ctrls.values():
        for p in ctrl.parameters():
            p.data.normal_(0, 0.5)
    return ctrls


def test_features_are_causal_and_batch_independent(tiny_models):
    model, tok = tiny_models["llama"]
    layers = [1, 2]
    ctrls = random_controllers(model, layers)
    texts = ["What is the capital of France?", "Who wrote Hamlet? A longer question than the first one."]
    feats = gate_features(model, tok, ctrls, texts, layers, FEATURES, "both")
    d = model.config.hidden_size
    names = feature_names(layers, d, FEATURES, "both")
    assert feats[0].shape == (len(tok(texts[0])["input_ids"]), len(names)) == (feats[0].shape[0], 2 * (2 * d + 5))
    assert all(torch.isfinite(f).all() for f in feats)
    # batched with padding == one at a time
    alone = gate_features(model, tok, ctrls, texts[1:], layers, FEATURES, "both")[0]
    torch.testing.assert_close(alone, feats[1], atol=1e-5, rtol=1e-5)
    # causal: a prefix's features are the first rows of the whole text's
    ids = tok(texts[1])["input_ids"]
    prefix = sequence_parts(model, ctrls, [ids[:6]], layers)[0]
    whole = sequence_parts(model, ctrls, [ids], layers)[0]
    for key in prefix:
        torch.testing.assert_close(prefix[key], whole[key][:6], atol=1e-5, rtol=1e-5)
    # controller statistics are in range; row 0 has a single key
    assert (whole["ctrl_entropy"] >= 0).all() and (whole["ctrl_entropy"] <= 1 + 1e-5).all()
    assert torch.allclose(whole["ctrl_peak"][0], torch.ones(2))


def test_pool_prefix_running_mean():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    torch.testing.assert_close(pool_prefix(x, "mean"), torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]]))
    assert pool_prefix(x, "both").shape == (3, 4) and torch.equal(pool_prefix(x, "current"), x)


# ------------------------------------------------------------------------------------ gated parity
@pytest.mark.parametrize("mode", ["bias", "mix"])
@pytest.mark.parametrize("entropy_local", [False, True])
def test_gated_schedule_with_gate_zero_is_the_uninjected_student(tiny_models, mode, entropy_local):
    model, tok = tiny_models["llama"]
    model.set_attn_implementation("sdpa")  # what an injector without an edit runs (an earlier test may leave eager)
    tok.padding_side = "left"
    enc = tok(["Attention habits of a small model", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**enc).logits
    ctrls = random_controllers(model, [0, 1, 2])
    alpha = AlphaSpec("gated", 2.0, entropy_local=entropy_local)
    for gate in (torch.zeros(2, 1), torch.zeros(2, enc["input_ids"].shape[1])):
        injector = Injector(ctrls, alpha, mode)
        injector.gate = gate
        with injector.attach(model), torch.no_grad():
            assert torch.equal(model(**enc).logits, plain)  # bit-equal
    injector = Injector(ctrls, alpha, mode)
    injector.gate = torch.ones(2, 1)
    with injector.attach(model), torch.no_grad():
        assert (model(**enc).logits - plain)[enc["attention_mask"].bool()].abs().max() > 1e-3  # the gate matters


# ------------------------------------------------------------------------------------- prompt set
def test_prompt_set_size_split_and_classes():
    prompts = PromptSet(seed=0)
    assert len(prompts.all) >= 400
    assert len({p.question for p in prompts.all}) == len(prompts.all)
    for split in (prompts.train, prompts.heldout):
        kinds = {p.kind for p in split}
        assert kinds == {"answerable", "unanswerable"}
    assert 0.15 < len(prompts.heldout) / len(prompts.all) < 0.35
    assert len({p.category for p in prompts.all}) >= 10
    for p in prompts.all:
        if p.answerable:
            assert len(p.candidates) == 4 and len(set(p.candidates)) == 4 and p.answer in p.candidates
        else:
            assert p.answer is None and not p.candidates
    by_question = {p.question: p for p in prompts.all}
    assert by_question["What is the capital of France?"].answer == "Paris"
    assert by_question["What is the capital of Mars?"].kind == "unanswerable"


def test_prompt_split_is_deterministic_and_seeded():
    a, b = build_prompts(seed=0), build_prompts(seed=0)
    assert [(p.question, p.split, p.candidates) for p in a] == [(p.question, p.split, p.candidates) for p in b]
    c = build_prompts(seed=1)
    assert [p.split for p in a] != [p.split for p in c]


def test_generate_answers_entropy_and_tokenizer_restored(tiny_models):
    """The recorded mean entropy is the entropy of the greedy steps; padding settings are restored."""
    from uzr.generation import generate_answers
    from uzr.models.tokenizers import build_tiny_tokenizer

    model, _ = tiny_models["llama"]
    tok = build_tiny_tokenizer("char")
    tok.pad_token = None  # like GGUF tokenizers without a pad token
    texts = [format_prompt("Who wrote Hamlet?"), format_prompt("What is 2 plus 2?")]
    results = generate_answers(model, tok, texts, max_new_tokens=5, batch_size=2)
    assert tok.pad_token is None and tok.padding_side == "right"
    assert len(results) == 2 and all(1 <= r["tokens"] <= 5 for r in results)
    alone = generate_answers(model, tok, texts[:1], max_new_tokens=5, batch_size=1)[0]
    ids = tok(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=alone["tokens"], do_sample=False, pad_token_id=tok.eos_token_id)
        logp = torch.log_softmax(model(out).logits[0, ids.shape[1] - 1:-1].float(), -1)
    assert alone["content_tokens"] in (alone["tokens"], alone["tokens"] - 1)
    manual = float(-(logp.exp() * logp).sum(-1)[: alone["content_tokens"]].mean())
    assert alone["mean_entropy"] == pytest.approx(manual, rel=1e-4)


def test_gate_positions_shape_and_prompt_value(tiny_models):
    from uzr.gate import GateModule, gate_positions

    model, tok = tiny_models["llama"]
    layers = [1, 2]
    ctrls = random_controllers(model, layers)
    names = feature_names(layers, model.config.hidden_size, FEATURES, "both")
    gate = GateModule(len(names), GateSpec(), names, "token", layers).eval()
    ids = tok("What is the capital of Mars?")["input_ids"]
    values = gate_positions(gate, model, ctrls, ids, layers)
    assert values.shape == (1, len(ids)) and bool(((values >= 0) & (values <= 1)).all())
    parts = sequence_parts(model, ctrls, [ids], layers)[0]
    assert float(values[0, -1]) == pytest.approx(gate.prompt_value(parts))


def test_hidden_columns_are_projected_and_saved(tmp_path):
    """Hidden-state columns go through a PCA fitted on the training split; the projection is saved."""
    g = torch.Generator().manual_seed(0)
    n, h = 800, 40
    hidden = torch.randn(n, 3, generator=g) @ torch.randn(3, h, generator=g) + 0.1 * torch.randn(n, h, generator=g)
    y = hidden[:, :5].sum(1) > 0
    ent = torch.randn(n, 1, generator=g)
    x = torch.cat([hidden, ent], 1)
    names = [f"cur:hidden_L1[{i}]" for i in range(h)] + ["cur:student_entropy"]
    gate = fit_gate(x[:600], y[:600], x[600:], y[600:], dict(FAST, hidden_pca=4), names)
    assert gate.net.width == 4 + 1 and gate.net.proj.shape == (h, 4)
    assert gate.report()["gate"]["auroc"] > 0.9  # three latent directions carry the label: 4 components suffice
    save_gate(gate, tmp_path)
    loaded, _ = load_gate(tmp_path)
    assert torch.equal(loaded.net.proj, gate.net.proj)
    assert torch.equal(loaded.predict_proba(x), gate.predict_proba(x))


def test_prompt_format_auto_uses_the_chat_template_when_there_is_one():
    from uzr.models.tokenizers import build_tiny_tokenizer
    from uzr.qa.prompts import adds_special_tokens, answer_prefix, resolve_format

    tok = build_tiny_tokenizer("bpe")
    assert resolve_format(tok, "auto") == "qa" and format_prompt("Q?", tok, "auto") == "Question: Q?\nAnswer:"
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert resolve_format(tok, "auto") == "chat"
    assert format_prompt("Q?", tok, "auto") == "<u>Q?</u><a>"
    assert answer_prefix("chat") == "" and not adds_special_tokens("chat") and adds_special_tokens("qa")
    with pytest.raises(ValueError, match="prompt format"):
        resolve_format(tok, "markdown")


def test_balanced_accuracy_is_what_beats_the_majority_class_on_rare_positives():
    import numpy as np

    from uzr.gate.model import _accuracies

    y = np.array([True] * 2 + [False] * 18)
    majority = _accuracies(np.zeros(20, bool), y)
    assert majority == {"accuracy": 0.9, "balanced_accuracy": 0.5}
    gate = _accuracies(np.array([True, True] + [True] * 4 + [False] * 14), y)  # finds both, 4 false alarms
    assert gate["accuracy"] == pytest.approx(0.8) and gate["balanced_accuracy"] == pytest.approx((1 + 14 / 18) / 2)
