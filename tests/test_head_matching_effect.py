"""Head matching by measured effect (``harvest.head_matching=effect``): on a permuted copy of the teacher the
student's own loss says which teacher head does each head's job, where attention similarity says which it resembles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from uzr.config.model import DamageSpec
from uzr.evaluate.sources import text_prior
from uzr.harvest.effect_matching import match_effects
from uzr.harvest.head_matching import match_heads, match_store
from uzr.injection.injector import AlphaSpec, Injector
from uzr.models import load_model
from uzr.models.damage import apply_damage

from .conftest import model_spec, resolved
from .test_per_head import TEXTS, harvest, logits

LAYER = 0  # the damaged layer: the first, so no damage above it blurs the measured effects


@pytest.fixture(scope="module")
def trained_teacher():
    """Tiny Gemma 3 (4 heads, 2 key/value heads) fitted to ``TEXTS`` for 40 Adam steps (3 s): a random model's loss
    does not care which head does what (its effects are ~1e-3 nats per token, noise), a fitted one's does."""
    torch.manual_seed(0)
    model, tok = load_model(model_spec("teacher/tiny_gemma3"))
    model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = [tok(text, return_tensors="pt")["input_ids"] for text in TEXTS]
    for _ in range(40):
        loss = sum(model(input_ids=ids, labels=ids).loss for ids in batch) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False).eval(), tok


def test_effect_matching_repairs_permuted_heads(trained_teacher):
    """``student.damage.kind=permute_heads``: head h scores with head perm[h]'s query but writes into slot h.
    Attention matching hands each head the pattern it has; effect matching finds the teacher head whose rows lower
    the student's loss most in slot h (h itself), and its per-head oracle (mix, alpha 1) restores the teacher."""
    teacher, tok = trained_teacher
    student = copy.deepcopy(teacher)
    perm = apply_damage(student, DamageSpec(layers=[LAYER], kind="permute_heads", strength=1.0))[
        "per_layer"][LAYER]["permutation"]
    assert perm == [1, 2, 3, 0]
    rows = harvest(teacher, student, tok, [LAYER])  # float16 rows, as a store keeps them
    by_attention = match_store(rows, [LAYER])[f"L{LAYER}"]["teacher_heads"]
    matching = match_effects(student, rows, [LAYER], texts=3)[f"L{LAYER}"]
    assert by_attention == perm and matching["teacher_heads"] == [0, 1, 2, 3]
    assert (matching["kind"], matching["method"], matching["texts"]) == ("effect", "hungarian", 3)
    cost = np.asarray(matching["cost"])  # (H_t, H_s) loss change, nats per token
    assert cost.shape == (4, 4)
    assert all(cost[h, h] < -0.05 for h in range(4))  # each head's own teacher rows lower the loss
    # heads whose moved query stays in its key/value group attend as teacher head perm[h] already: ~no change
    assert abs(cost[perm[0], 0]) < 1e-3 and abs(cost[perm[2], 2]) < 1e-3
    assert cost[range(4), range(4)].sum() < cost[perm, range(4)].sum() - 1
    ids = torch.as_tensor(rows[0]["input_ids"], dtype=torch.long)[None]
    target, damaged = logits(teacher, ids), logits(student, ids)
    for heads, restores in ((matching["teacher_heads"], True), (by_attention, False)):
        oracle = text_prior("teacher", {LAYER: None}, rows, "cpu", {LAYER: heads})
        out = logits(student, ids, Injector(oracle(ids, rows[0]), AlphaSpec(value=1.0), "mix", prompt_len=0))
        # float16 rows: near the teacher, not exact
        assert bool((out - target).abs().max() < 0.05 * (damaged - target).abs().max()) == restores


def test_effect_matching_measures_the_first_training_texts_only(trained_teacher):
    """``texts`` caps the measured texts (and their tokens); fewer training texts than that: all of them. The
    undamaged model's own head rows change its loss by ~nothing (float16 rows)."""
    teacher, tok = trained_teacher
    rows = harvest(teacher, copy.deepcopy(teacher), tok, [LAYER])  # one module cannot carry two recorders
    one = match_effects(teacher, rows, [LAYER], texts=1)[f"L{LAYER}"]
    assert (one["texts"], one["tokens"]) == (1, len(rows[0]["input_ids"]) - 1)
    every = match_effects(teacher, rows, [LAYER], texts=100)[f"L{LAYER}"]
    assert every["texts"] == len(rows) and every["tokens"] == sum(len(r["input_ids"]) - 1 for r in rows)
    assert np.abs(np.diag(np.asarray(every["cost"]))).max() < 1e-3
    with pytest.raises(ValueError, match="train split is empty"):
        match_effects(teacher, [], [LAYER], texts=8)


def test_fewer_teacher_heads_take_the_least_cost_head_by_name():
    cost = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1]])  # 2 teacher heads, 3 student heads
    assert match_heads(cost, nearest="min_effect_many_to_one") == ([0, 1, 1], "min_effect_many_to_one")


def test_effect_matching_is_keyed_and_validated_before_models_load():
    """Keyed only when chosen (stores of the other kinds keep their keys); a bad text count fails in the config."""
    from uzr.harvest.stage import HarvestStage

    payload = HarvestStage().key_payload(resolved("+experiment=positive_control"), {})
    effect = HarvestStage().key_payload(resolved("+experiment=positive_control", "harvest.head_matching=effect"), {})
    assert "head_matching" not in payload["harvest"] and "effect_texts" not in payload["harvest"]
    assert effect["harvest"]["head_matching"] == "effect" and effect != payload
    with pytest.raises(ValueError, match=r"harvest.effect_texts=0 must be >= 1"):
        resolved("+experiment=positive_control", "harvest.head_matching=effect", "harvest.effect_texts=0")
