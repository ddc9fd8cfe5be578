"""A same-family student: decoder layers dropped at load (uzr/models/prune.py, ``<role>.prune``) and healed by
logit distillation from the unpruned model (uzr/models/heal.py)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace

import pytest
import torch

from uzr.config.keys import key_of
from uzr.config.model import PruneSpec, model_key
from uzr.corpus import load_run_corpus
from uzr.models import load_model
from uzr.models.heal import heal, heal_texts, layer_parameters, next_token_kl, seam_layers
from uzr.models.prune import prune_layers

from .conftest import model_spec, refusal_before_loading, resolved

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on under the old oak tree."


class Skipped(torch.nn.Module):
    """Stands in for a dropped decoder layer: returns its input, as if the layer were not there."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def pruned(name: str, layers: list[int], **heal):
    spec = model_spec(name)
    return replace(spec, prune=PruneSpec(layers=layers, **heal))


@pytest.mark.parametrize("name", ["student/tiny_gemma3", "student/tiny_llama"])
def test_pruning_equals_running_the_kept_layers(name):
    """The pruned model computes exactly what the whole model computes with the dropped layers skipped, each kept
    layer with its own attention type (Gemma 3: layer 2 stays sliding-window, layer 3 full)."""
    whole, tok = load_model(model_spec(name))
    model, _ = load_model(pruned(name, [1]))
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 8  # longer than tiny Gemma's sliding window: the window matters
    kept = [i for i in range(whole.config.num_hidden_layers) if i != 1]
    assert model.config.num_hidden_layers == len(kept) and model.config.uzr_prune == {"layers": [1], "kept": kept}
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(kept)))
    if name.endswith("gemma3"):
        assert model.config.layer_types == [whole.config.layer_types[i] for i in kept]
        assert [a.self_attn.sliding_window for a in model.model.layers] == \
               [whole.model.layers[i].self_attn.sliding_window for i in kept]
    # every kept weight is its source layer's
    for new, source in enumerate(kept):
        mine, theirs = model.model.layers[new].state_dict(), whole.model.layers[source].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    whole.model.layers[1] = Skipped()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_pruning_nothing_is_bit_identical():
    whole, tok = load_model(model_spec("student/tiny_gemma3"))
    same, _ = load_model(pruned("student/tiny_gemma3", []))
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert not hasattr(same.config, "uzr_prune")


def test_the_pruned_model_generates_with_its_kv_cache():
    """Greedy decoding with the KV cache (sliding-window and full layers renumbered) matches decoding without it."""
    model, tok = load_model(pruned("student/tiny_gemma3", [0, 3]))
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False)
        plain = ids
        for _ in range(12):
            step = model(input_ids=plain, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            plain = torch.cat([plain, step], dim=1)
    assert torch.equal(cached, plain)


def test_the_layer_map_follows_the_kept_layers():
    cfg = resolved("+experiment=pruned_pair")
    from uzr.config.harvest import harvest_layers

    student = cfg.student
    assert student.kept_layers == [0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17] and student.loaded_layers == 15
    # each injected student layer learns from its own source layer of the (unpruned) teacher
    assert harvest_layers(cfg) == ([6, 9, 12], [9, 12, 15])
    assert {**dataclasses.asdict(student), "prune": None} == {**dataclasses.asdict(cfg.teacher), "prune": None}
    moved = resolved("+experiment=pruned_pair", "student.prune.layers=[0,17]", "inject.layers=[0,15]")
    assert harvest_layers(moved) == ([0, 15], [1, 16])
    # an unpruned student keeps the proportional map it always had
    assert harvest_layers(resolved("+experiment=positive_control", "inject.teacher_layers=null")) == \
           ([4, 9, 14], [4, 9, 14])


def test_seam_layers_are_the_kept_layers_next_to_each_cut():
    assert seam_layers([0, 1, 2, 3, 4, 5, 9, 10, 11], 12) == [5, 6]  # the cut of 6, 7, 8
    assert seam_layers([0, 1, 2, 3, 4, 5, 9, 10, 11], 13) == [5, 6, 8]  # ... and one above layer 11
    assert seam_layers([2, 3, 5], 6) == [0, 1, 2]  # cuts below 2, between 3 and 5, above 5
    assert seam_layers([0, 1, 2, 3], 4) == []


@pytest.mark.parametrize(("override", "expected"), [
    ("student.prune.layers=[18]", ["student.prune.layers=[18]", "0..17"]),
    ("student.prune.layers=[-1]", ["student.prune.layers=[-1]", "0..17"]),
    ("student.prune.layers=[6,6]", ["student.prune.layers=[6, 6]", "at most once"]),
    ("student.prune.layers=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]", ["at most 17 of the 18", "one layer"]),
    ("inject.layers=[15]", ["inject.layers=[15]", "0..14", "student.prune.layers drops 3 of its 18"]),
    ("student.prune.layers=[]", ["student.prune.heal_steps=16", "nothing is pruned", "heal_steps=0"]),
    ("student.prune.heal_steps=-1", ["student.prune.heal_steps=-1"]),
    ("student.prune.heal_lr=0", ["student.prune.heal_lr=0"]),
    ("student.prune.heal_texts=0", ["student.prune.heal_texts=0"]),
    ("student.prune.heal_max_length=1", ["student.prune.heal_max_length=1"]),
    ("student.prune.heal_scope=some", ["student.prune.heal_scope='some'", "'seam'", "'all'"]),
    ("student.damage.layers=[3]", ["student.prune.heal_steps=16", "damage"]),
    ("student.damage.layers=[15] student.prune.heal_steps=0", ["student.damage.layers=[15]", "0..14", "3 pruned"]),
    ("stages=[svf] +svf=default", ["student.prune.heal_steps=16", "data group"]),
])
def test_bad_prune_values_fail_before_any_model_loads(override, expected, monkeypatch):
    message = refusal_before_loading(monkeypatch, "+experiment=pruned_pair", *override.split())
    for text in expected:
        assert text in message, message


def test_no_pruning_leaves_every_key_as_it_was():
    whole = resolved("+experiment=positive_control", "student.damage.layers=[]", "inject.layers=[4]").student
    assert "prune" not in model_key(whole) and "prune" not in key_of(whole, "svf")
    assert model_key(whole) == {k: v for k, v in dataclasses.asdict(whole).items() if k not in ("damage", "prune")}
    cut = resolved("+experiment=pruned_pair").student
    assert model_key(cut)["prune"]["layers"] == [6, 7, 8]
    assert model_key(replace(cut, prune=replace(cut.prune, heal_steps=8))) != model_key(cut)


def test_healing_lowers_the_kl_to_the_unpruned_model():
    """Tiny Gemma with a layer that matters (its post-norms amplified: random tiny layers barely move the logits), that
    layer dropped, the two kept layers beside the cut trained: the KL to the whole model on the texts falls by half."""
    whole, tok = load_model(model_spec("student/tiny_gemma3"))
    with torch.no_grad():
        for norm in (whole.model.layers[1].post_attention_layernorm, whole.model.layers[1].post_feedforward_layernorm):
            norm.weight.fill_(20.0)
    model = copy.deepcopy(whole)
    prune_layers(model, [1])
    model.requires_grad_(False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = resolved("+experiment=smoke")
    texts = heal_texts(load_run_corpus(cfg.data, lambda: tok, cfg.harvest.max_length).train["text"], tok, 32)[:6]

    def kl() -> float:
        with torch.no_grad():
            return sum(float(next_token_kl(whole, model, ids)) for ids in texts)

    before = kl()
    history = heal(model, whole, texts, seam_layers([0, 2, 3], 4), steps=12, lr=3e-3, per_step=2)
    assert len(history) == 12 and kl() < 0.6 * before, (before, kl())
    # only the seam layers (0 and 1: source layers 0 and 2) moved; embeddings, layer 2 and the final norm did not
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and changed <= set(layer_parameters(model, [0, 1]))
    assert any(k.startswith("model.layers.0.") for k in changed) and any(k.startswith("model.layers.1.") for k in changed)
    assert not any(p.requires_grad for p in model.parameters())  # frozen again, as every loaded model


@pytest.fixture(scope="module")
def tiny_heal(tmp_path_factory):
    """The whole tiny Gemma teaching itself with layer 1 dropped, healed in a run's pool (a cached artifact)."""
    from uzr.runner import RunContext

    cache = tmp_path_factory.mktemp("heal-cache")
    cfg = resolved("+experiment=smoke", "student=tiny_gemma3", "inject.layers=[0,2]", "student.prune.layers=[1]",
                   "student.prune.heal_steps=4", "student.prune.heal_lr=0.003", "student.prune.heal_texts=2",
                   "student.prune.heal_max_length=32", f"paths.cache_dir={cache}")
    run = RunContext(cfg, tmp_path_factory.mktemp("run"))
    return cfg, run, *run.models.get("student")


def test_a_run_heals_its_pruned_student_once(tiny_heal):
    cfg, run, model, tok = tiny_heal
    record = model.config.uzr_prune["heal"]
    assert record["built"] and record["steps"] == 4 and record["layers"] == [0, 1]  # the kept layers beside the cut
    assert [k.startswith("heal/") for k in run.sub_artifacts] == [True]
    unhealed, _ = load_model(replace(cfg.student, prune=PruneSpec(layers=[1])))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, unhealed.state_dict()[k])}
    assert changed and changed <= set(layer_parameters(model, [0, 1]))


def test_the_healed_checkpoint_reloads_bit_identical(tiny_heal, monkeypatch):
    import uzr.models.heal
    from uzr.runner import RunContext

    cfg, run, model, tok = tiny_heal
    monkeypatch.setattr(uzr.models.heal, "heal", lambda *a, **k: pytest.fail("healed again"))
    again = RunContext(cfg, run.out_dir / "again")
    reloaded, _ = again.models.get("student")
    assert reloaded.config.uzr_prune["heal"]["built"] is False
    assert list(again.sub_artifacts.values())[0]["key"] == list(run.sub_artifacts.values())[0]["key"]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    # another heal setting, or other training texts, is another artifact
    key = uzr.models.heal.heal_key
    assert key(replace(cfg.student, prune=replace(cfg.student.prune, heal_steps=3)), cfg) != key(cfg.student, cfg)
    assert key(cfg.student, replace(cfg, data=replace(cfg.data, num_texts=12))) != key(cfg.student, cfg)
