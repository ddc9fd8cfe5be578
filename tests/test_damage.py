"""The positive control's student: attention damage applied at load (uzr/models/damage.py, ``<role>.damage``)."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from uzr.config.model import DamageSpec, model_key
from uzr.models import load_model
from uzr.models.damage import head_permutation

from .conftest import model_spec, refusal_before_loading, resolved

TEXTS = ["The quick brown fox jumps over the lazy dog, and the dog sleeps on.", "Short one."]


def gemma(**damage):
    """The tiny Gemma 3 of the configs (sliding-window layers 0 and 2, q/k norms, its own scaling)."""
    spec = model_spec("student/tiny_gemma3")
    return replace(spec, damage=DamageSpec(**damage)) if damage else spec


def run(model, tok, eager: bool = False):
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=eager)


@pytest.fixture(scope="module")
def undamaged():
    model, tok = load_model(gemma(), attn_implementation="eager")
    return model, tok, run(model, tok, eager=True)


def test_the_tiny_student_is_the_tiny_teacher():
    assert dataclasses.asdict(model_spec("student/tiny_gemma3")) == dataclasses.asdict(model_spec("teacher/tiny_gemma3"))


def test_temperature_divides_the_logits_of_the_named_layers_only(undamaged):
    model, tok, clean = undamaged
    damaged_model, _ = load_model(gemma(layers=[2], kind="temperature", strength=4.0), attn_implementation="eager")
    out = run(damaged_model, tok, eager=True)
    # weights, values and every parameter are the teacher's: only the module's scaling changed
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in damaged_model.state_dict().items())
    modules = damaged_model.model.layers
    assert modules[2].self_attn.scaling == model.model.layers[2].self_attn.scaling / 4
    assert [m.self_attn.scaling for i, m in enumerate(modules) if i != 2] == \
           [m.self_attn.scaling for i, m in enumerate(model.model.layers) if i != 2]
    # hidden states entering layers 0..2 and the attention of layers 0, 1 are bit-identical
    for i in range(3):
        assert torch.equal(out.hidden_states[i], clean.hidden_states[i]), i
    for i in range(2):
        assert torch.equal(out.attentions[i], clean.attentions[i]), i
    # layer 2 attends like the teacher at temperature 4: softmax(log p / 4) over the same allowed keys
    expected = torch.softmax(torch.log(clean.attentions[2]) / 4, dim=-1).nan_to_num(0.0)
    torch.testing.assert_close(out.attentions[2], expected, atol=1e-6, rtol=1e-5)
    assert (out.attentions[2] - clean.attentions[2]).abs().max() > 0.05  # flatter, visibly
    assert not torch.equal(out.hidden_states[3], clean.hidden_states[3])
    assert (out.logits - clean.logits).abs().max() > 1e-3
    # the model says what was done
    assert damaged_model.config.uzr_damage["kind"] == "temperature"
    assert damaged_model.config.uzr_damage["layers"] == [2]
    assert modules[2].self_attn.uzr_damage["damaged_scaling"] == modules[2].self_attn.scaling


def test_restoring_the_damaged_attention_restores_the_teacher_exactly(undamaged):
    """What the positive control relies on: the damage lives in the attention probabilities alone."""
    model, tok, clean = undamaged
    damaged_model, _ = load_model(gemma(layers=[1, 3], strength=3.0), attn_implementation="eager")
    assert not torch.equal(run(damaged_model, tok).logits, clean.logits)
    for layer in (1, 3):
        attn = damaged_model.model.layers[layer].self_attn
        attn.scaling = attn.uzr_damage["scaling"]
    assert torch.equal(run(damaged_model, tok).logits, clean.logits)


@pytest.mark.parametrize("damage", [
    {}, {"layers": [0, 2], "kind": "temperature", "strength": 1.0}, {"layers": [1], "kind": "permute_heads", "strength": 0.0},
], ids=["none", "temperature-1", "permute-0"])
def test_no_damage_is_bit_identical(damage):
    model, tok = load_model(gemma())
    damaged_model, _ = load_model(gemma(**damage))
    assert torch.equal(run(damaged_model, tok).logits, run(model, tok).logits)
    record = getattr(damaged_model.config, "uzr_damage", None)
    assert record is None if not damage else (record["kind"], record["layers"]) == (damage["kind"], damage["layers"])


def test_permute_heads_moves_query_heads_and_nothing_else():
    # one key/value head, as in Gemma 3 270M: every head sees the same keys and values
    spec = replace(gemma(), num_kv_heads=1)
    model, tok = load_model(spec, attn_implementation="eager")
    damaged_model, _ = load_model(replace(spec, damage=DamageSpec(layers=[1], kind="permute_heads", strength=1.0,
                                                                  seed=5)), attn_implementation="eager")
    perm = damaged_model.config.uzr_damage["per_layer"][1]["permutation"]
    assert perm == head_permutation(4, 1.0, 5, 1)
    assert sorted(perm) == [0, 1, 2, 3] and all(perm[h] != h for h in range(4))  # every head moved
    changed = {k for k, v in damaged_model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {"model.layers.1.self_attn.q_proj.weight"}
    w, w0 = (m.model.layers[1].self_attn.q_proj.weight.view(4, 16, -1) for m in (damaged_model, model))
    assert all(torch.equal(w[h], w0[perm[h]]) for h in range(4))
    clean, out = run(model, tok, eager=True), run(damaged_model, tok, eager=True)
    assert torch.equal(out.hidden_states[1], clean.hidden_states[1])
    # head h attends as the teacher's head perm[h]; the head-mean attention is the teacher's
    torch.testing.assert_close(out.attentions[1], clean.attentions[1][:, perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.attentions[1].mean(1), clean.attentions[1].mean(1), atol=1e-6, rtol=1e-5)
    assert (out.logits - clean.logits).abs().max() > 1e-3


def test_head_permutation_moves_the_requested_share():
    assert head_permutation(8, 0.0, 0, 3) == list(range(8))
    perm = head_permutation(8, 0.5, 0, 3)
    moved = [h for h in range(8) if perm[h] != h]
    assert len(moved) == 4 and sorted(perm[h] for h in moved) == moved  # the moved heads cycle among themselves
    assert head_permutation(8, 0.5, 0, 3) == perm and head_permutation(8, 0.5, 1, 3) != perm  # seeded
    assert head_permutation(8, 0.5, 0, 4) != perm  # and differs per layer


@pytest.mark.parametrize(("override", "expected"), [
    ("student.damage.layers=[18]", ["student.damage.layers=[18]", "0..17"]),
    ("student.damage.layers=[-1]", ["student.damage.layers=[-1]", "0..17"]),
    ("student.damage.layers=[4,4]", ["student.damage.layers=[4, 4]", "at most once"]),
    ("student.damage.kind=noise", ["student.damage.kind='noise'", "'temperature'", "'permute_heads'"]),
    ("student.damage.strength=0", ["student.damage.strength=0", "> 0"]),
    ("student.damage.strength=-2", ["student.damage.strength=-2", "> 0"]),
    ("student.damage.strength=inf", ["student.damage.strength=inf", "finite"]),
    ("student.damage.kind=permute_heads", ["student.damage.strength=4.0", "[0, 1]"]),
    ("student.damage.kind=permute_heads student.damage.strength=0.25",
     ["student.damage.strength=0.25", "0 or >= 2 of the 4 heads"]),
])
def test_bad_damage_fails_before_any_model_loads(override, expected, monkeypatch):
    message = refusal_before_loading(monkeypatch, "+experiment=positive_control", *override.split())
    for text in expected:
        assert text in message, message


def test_load_model_validates_damage_against_the_declared_layers():
    with pytest.raises(ValueError, match=r"student\.damage\.layers=\[4\].*0\.\.3"):
        load_model(gemma(layers=[4]), role="student")


def test_gemma3_270m_is_a_student():
    run_cfg = resolved("student=gemma3_270m", "inject.layers=[4,9,14]")  # the schema's [4, 15, 26] fits 30 layers
    assert model_key(run_cfg.student) == model_key(run_cfg.teacher)  # the packaged Gemma, undamaged
    assert run_cfg.student.damage == DamageSpec()


def test_positive_control_composes_teacher_and_damaged_self():
    run_cfg = resolved("+experiment=positive_control")
    damage = run_cfg.student.damage
    assert (damage.kind, damage.effective_strength) == ("temperature", 4.0)
    assert len(damage.layers) == 3 and all(0 <= layer < 18 for layer in damage.layers)
    # injected where damaged, each layer fed by the same layer of the (undamaged) teacher
    assert run_cfg.inject.layers == damage.layers == run_cfg.inject.teacher_layers
    assert {**dataclasses.asdict(run_cfg.student), "damage": None} == {**dataclasses.asdict(run_cfg.teacher),
                                                                       "damage": None}
    assert "gate" not in run_cfg.stages
    assert run_cfg.controller.target == "per_head"  # the ceiling check is the per-head oracle
    moved = resolved("+experiment=positive_control", "student.damage.layers=[2,7]")
    assert moved.inject.layers == moved.inject.teacher_layers == [2, 7]


def test_a_damaged_student_never_shares_an_undamaged_store():
    from uzr.runner import artifact_keys

    def keys(*overrides):
        return artifact_keys(resolved("+experiment=positive_control", *overrides), ["controller"])

    damaged = keys()
    undamaged = keys("student.damage.layers=[]", "inject.layers=[4,9,14]")
    assert damaged["harvest"] != undamaged["harvest"] and damaged["controller"] != undamaged["controller"]
    assert keys("student.damage.strength=2")["harvest"] != damaged["harvest"]
    assert keys("student.damage.strength=null")["harvest"] == damaged["harvest"]  # null = the kind's default, 4
    assert keys("student.damage.kind=permute_heads", "student.damage.strength=1")["harvest"] != damaged["harvest"]
    # no damage leaves the spec's key fields as they were before damage existed (old caches stay valid)
    plain = resolved("+experiment=positive_control", "student.damage.layers=[]", "inject.layers=[4]").student
    assert "damage" not in model_key(plain)
    assert model_key(plain) == {k: v for k, v in dataclasses.asdict(plain).items() if k not in ("damage", "prune")}


def test_specs_from_plain_mappings_carry_their_damage():
    from uzr.config.model import as_spec

    plain = {**dataclasses.asdict(gemma()), "damage": {"layers": [1], "kind": "permute_heads", "strength": 0.5}}
    assert as_spec(plain).damage == DamageSpec(layers=[1], kind="permute_heads", strength=0.5)
    with pytest.raises(ValueError, match=r"damage\.strenght"):
        as_spec({**plain, "damage": {"strenght": 2.0}})
    with pytest.raises(ValueError, match=r"model\.damage\.kind='permute_heads'.*quantization='8bit'"):
        replace(as_spec(plain), quantization="8bit").validate()
    replace(gemma(layers=[1], strength=2.0), quantization="8bit").validate()  # temperature needs no weight edit
