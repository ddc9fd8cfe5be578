"""LoRA / IA3 baselines (peft): matched budget, exact attach at init, training moves only the adapter, exact removal."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import model_spec
from uzr.adapters.baselines import svf_budget
from uzr.adapters.peft_edit import PeftTrainable, matched_layers, plan_baseline
from uzr.adapters.reinforce import ReinforceModule
from uzr.models import load_model

from .test_svf import logits, state  # the same probe texts and snapshots as the SVF edit's tests


def test_matched_layers_takes_the_most_evenly_spread_layers_within_budget():
    assert matched_layers([10] * 30, 80) == (0, 4, 8, 12, 17, 21, 25, 29)
    assert matched_layers([10] * 30, 300) == tuple(range(30))
    assert matched_layers([10] * 4, 5) == (3,)  # nothing fits: one layer, the last
    assert matched_layers([10, 10, 10], 20) == (0, 2)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_plan_counts_the_adapters_parameters_within_the_svf_budget(tiny_models, method):
    model, _ = tiny_models["llama"]
    budget = svf_budget(model, "mlp")
    assert budget == 3 * 3 * 48  # 3 layers x (gate, up, down), min(48, 96) singular values each
    plan = plan_baseline(model, method, "mlp", budget)
    edit = PeftTrainable(model, plan)
    per_layer = {"lora": 3 * (48 + 96), "ia3": 96 + 96 + 96}[method]  # rank-1 A+B / out, out, in (down_proj)
    assert edit.num_parameters == plan.parameters == per_layer * len(plan.layers) <= budget
    assert len(plan.layers) == budget // per_layer


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_attach_is_exact_at_init_a_trained_adapter_changes_logits_and_removal_restores_the_model(
        tiny_models, family, method):
    model, tok = tiny_models[family]
    plain, before = logits(model, tok), state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = plan_baseline(model, method, "mlp+attn", 10**6)
    edit = PeftTrainable(model, plan)
    with edit.attach(model):
        assert torch.equal(logits(model, tok), plain)  # LoRA B = 0, IA3 scales = 1
        with torch.no_grad():
            for p in edit.tensors:
                p.add_(0.5 * torch.randn_like(p))
        assert (logits(model, tok) - plain).abs().max() > 1e-4
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, tok), plain)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "peft_config")
    again = PeftTrainable(model, plan, edit.state())  # an adapter rebuilt from its state computes the same
    with edit.attach(model):
        trained = logits(model, tok)
    with again.attach(model):
        assert torch.equal(logits(model, tok), trained)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_reinforce_trains_only_the_adapter(method):
    model, tok = load_model(model_spec("student/tiny_llama"))
    before = state(model)
    plan = plan_baseline(model, method, "mlp", svf_budget(model, "mlp"))
    edit = PeftTrainable(model, plan)
    start = edit.state()
    texts = ["abc def", "ghi jkl", "mno pqr", "stu vwx"]
    L.seed_everything(0, verbose=False)
    module = ReinforceModule(model, tok, None, texts, [""] * 4, lambda pred, ans: 1.0 if "a" in pred else -1.0,
                             lr=0.05, samples_per_prompt=4, max_new_tokens=2, edit=edit)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, deterministic=True).fit(module, DataLoader(list(range(4)), batch_size=2))
    assert len(module.history) == 4
    end = edit.state()
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the adapter learned
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the student did not
    assert sorted(n for n, _ in module.named_parameters()) == sorted(f"edit.tensors.{i}" for i in range(len(start)))
