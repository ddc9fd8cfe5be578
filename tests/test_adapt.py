"""The adapt stage (issue 26): LoRA trained around the teacher's attention, on tiny models in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import refusal_before_loading, resolved
from uzr.adapters.adapt_arms import train_texts
from uzr.adapters.adapt_stage import AdaptStage, adapter_plan, split_texts
from uzr.adapters.adapt_train import AdaptModule, lr_factor, step_batches
from uzr.adapters.attention_kl import AttentionDistiller
from uzr.adapters.peft_edit import BaselinePlan, PeftTrainable
from uzr.attention import HeadRows, LayerRecorder, recording
from uzr.injection.injector import Injector
from uzr.runner import RunContext, load_stages

SMOKE = ("+experiment=smoke", "+adapt=default", "stages=[harvest,adapt]", "logger=csv", "evaluate.num_texts=3",
         "evaluate.facts_qa=false", "adapt.steps=4", "adapt.checkpoint_every=2", "adapt.curve_texts=2",
         "adapt.batch_size=2")


def smoke_run(tmp_path, *overrides: str) -> RunContext:
    cfg = resolved(*SMOKE, f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    return RunContext(cfg, tmp_path / "out")


# --- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, named", [
    ("adapt.inject=oracle", "none | controller | teacher"),
    ("adapt.distill_weight=-1", "adapt.distill_weight"),
    ("adapt.matrices=qkv", "attn | mlp | mlp+attn"),
    ("adapt.distill_layers=[5]", "inject.layers"),
    ("adapt.layers=[99]", "the student's layers"),
    ("adapt.steps=0", "adapt.steps"),
    ("alpha.schedule=gated", "alpha.schedule"),
])
def test_bad_values_fail_before_models_load(monkeypatch, override, named):
    assert named in refusal_before_loading(monkeypatch, "+experiment=adapt", override)


def test_experiments_compose_and_plan_the_controller_only_for_the_controller_arm():
    from uzr.stages import plan

    for experiment in ("adapt", "adapt_positive_control"):
        cfg = resolved(f"+experiment={experiment}")
        assert [s.name for s in plan(cfg.stages, cfg)] == ["harvest", "adapt"]
        cfg = resolved(f"+experiment={experiment}", "adapt.inject=controller", "adapt.distill_weight=3")
        assert [s.name for s in plan(cfg.stages, cfg)] == ["harvest", "controller", "adapt"]


def test_gpu_sizes_compose_over_either_experiment():
    for experiment in ("adapt", "adapt_positive_control"):
        cfg = resolved(f"+experiment={experiment}", "adapt=gpu", "trainer=gpu")
        assert (cfg.adapt.rank, cfg.adapt.steps, cfg.adapt.batch_size, cfg.adapt.curve_texts) == (8, 600, 8, 24)
        assert cfg.adapt.lr == resolved(f"+experiment={experiment}").adapt.lr  # re-chosen by the user, not silently


# --- the distillation term ------------------------------------------------------------------------------------------
def own_rows(model, ids, layer) -> torch.Tensor:
    """(1, H, S, S) the model's own attention at ``layer`` (no gradients)."""
    recorder = LayerRecorder(block_size=64, reducers=[HeadRows()])
    with torch.no_grad(), recording(model, {layer: recorder}):
        model(input_ids=ids)
    return recorder.take()["heads"]


def test_distill_loss_is_zero_at_the_students_own_rows_and_its_gradient_reaches_only_the_adapter(tiny_models):
    model, _ = tiny_models["llama"]  # the adapter is removed exactly at the end: the shared model stays as it was
    layer, ids = 1, torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    adapter = PeftTrainable(model, BaselinePlan("lora", "attn", (0, 1), 2, 0, 0))
    with torch.no_grad():  # a non-zero B, so that the adapted model differs from the base one
        for p in adapter.tensors:
            p.normal_(0, 0.1)
    with adapter.attach(model):
        own = own_rows(model, ids, layer)  # (1, H, S, S)
        for target in (own, own.mean(1, keepdim=True)):  # per head and head mean
            distiller = AttentionDistiller({layer: target}, block_rows=5)  # blocks that cut the rows
            with distiller.attach(model):
                model(input_ids=ids)
            assert distiller.loss().abs().item() < 1e-5
        # a different target, far from the tiny model's near-uniform rows (so the KL is large and its direction
        # matters): 0.9 on the query itself, 0.1 spread causally; its KL computed directly from the recorded rows
        s = ids.shape[1]
        uniform = torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]  # (S, S)
        peaked = 0.1 * uniform + 0.9 * torch.eye(s)  # (S, S), rows sum to 1
        expected = (peaked * (peaked.clamp_min(1e-30).log() - own[0].clamp_min(1e-30).log())).sum(-1)  # (H, S)
        reverse = (own[0] * (own[0].clamp_min(1e-30).log() - peaked.clamp_min(1e-30).log())).sum(-1)
        assert abs(expected.mean() - reverse.mean()) > 0.1  # the test tells KL(target || student) from the reverse
        distiller = AttentionDistiller({layer: peaked[None, None].expand(1, own.shape[1], s, s)})
        with distiller.attach(model):
            model(input_ids=ids)
        loss = distiller.loss()
        assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)
        loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the base model stays frozen
    grads = {k: p.grad for k, p in zip(adapter.keys, adapter.tensors)}
    assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.startswith("layers.1."))
    # the loss reads layer 1's queries and keys only: its values and output projection get no gradient
    assert all(g is None or g.abs().sum() == 0 for k, g in grads.items()
               if k.startswith(("layers.1.self_attn.v_proj.", "layers.1.self_attn.o_proj.")))


# --- training through the stage -------------------------------------------------------------------------------------
def test_control_arm_equals_plain_lora_training_step_by_step(tmp_path):
    """adapt.inject=none, λ = 0: the stage's losses and adapter are a plain LoRA loop's on the same batches."""
    run = smoke_run(tmp_path, "adapt.schedule=cosine", "adapt.warmup_steps=1")
    load_stages(run, run.cfg.stages)
    arm = run.artifacts["adapt"]
    cfg, adapt = run.cfg, run.cfg.adapt
    model, _ = run.models.get("student")
    texts, _ = split_texts(train_texts(run.artifacts["harvest"], "train", 0, adapt.max_length, "cpu"),
                           adapt.curve_texts)
    torch.manual_seed(cfg.seed)
    adapter = PeftTrainable(model, adapter_plan(model, adapt))
    optimizer = torch.optim.Adam(adapter.parameters(), lr=adapt.lr)
    losses = []
    with adapter.attach(model):
        for step, batch in enumerate(step_batches(len(texts), adapt.steps, adapt.batch_size, cfg.seed)):
            for group in optimizer.param_groups:
                group["lr"] = adapt.lr * lr_factor(step, adapt.warmup_steps, adapt.steps, adapt.schedule)
            tokens = sum(texts[i].ids.shape[1] - 1 for i in batch)
            loss = sum(model(input_ids=texts[i].ids, labels=texts[i].ids).loss * (texts[i].ids.shape[1] - 1)
                       for i in batch) / tokens
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert [h["nll"] for h in arm.meta["history"]] == pytest.approx(losses, rel=1e-5)
    trained = adapter.state()
    assert all(torch.allclose(arm.state[k], trained[k], atol=1e-6) for k in trained)
    assert any(arm.state[k].abs().sum() > 0 for k in arm.state if "lora_B" in k)  # it did train


@pytest.mark.parametrize("arm", ["controller", "teacher"])
def test_injector_is_attached_in_training_and_evaluation_of_inject_arms_and_absent_in_the_control(
        tmp_path, monkeypatch, arm):
    attaches = {"train": 0, "other": 0}
    phase = {"now": "other"}
    attach, step = Injector.attach, AdaptModule.training_step

    def counted_attach(self, model):
        attaches[phase["now"]] += 1
        return attach(self, model)

    def counted_step(self, batch, batch_idx):
        phase["now"] = "train"
        try:
            return step(self, batch, batch_idx)
        finally:
            phase["now"] = "other"

    monkeypatch.setattr(Injector, "attach", counted_attach)
    monkeypatch.setattr(AdaptModule, "training_step", counted_step)
    control = smoke_run(tmp_path / "control")
    impls = load_stages(control, control.cfg.stages)
    section = impls["adapt"].report(control, control.artifacts["adapt"])
    assert attaches == {"train": 0, "other": 0}
    assert set(section["training"]) == {"adapted"}  # the control compares with the frozen student only

    run = smoke_run(tmp_path / "arm", f"adapt.inject={arm}")
    impls = load_stages(run, run.cfg.stages)
    adapt = run.cfg.adapt
    assert attaches["train"] == adapt.steps * adapt.batch_size  # one injector per training text
    before = attaches["other"]
    section = impls["adapt"].report(run, run.artifacts["adapt"])
    assert attaches["train"] == adapt.steps * adapt.batch_size  # the control arm trained in the report: none
    assert attaches["other"] - before >= run.cfg.evaluate.num_texts  # the adapted role's held-out texts
    assert set(section["training"]) == {"adapted", "control"}
    bpb = section["domains"]["pydoc"]["bits_per_byte"]
    assert {"adapted_minus_control", "adapted_minus_student", "control_minus_student"} <= set(bpb)
    assert bpb["adapted"] != bpb["control"]


def test_an_interrupted_arm_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    overrides = ("adapt.inject=teacher", "adapt.distill_weight=1", "adapt.steps=6")
    whole = smoke_run(tmp_path / "whole", *overrides)
    load_stages(whole, whole.cfg.stages)
    step = AdaptModule.training_step

    def crash_after_the_first_checkpoint(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(AdaptModule, "training_step", crash_after_the_first_checkpoint)
    cut = smoke_run(tmp_path / "cut", *overrides)
    with pytest.raises(RuntimeError, match="killed"):
        load_stages(cut, cut.cfg.stages)
    monkeypatch.setattr(AdaptModule, "training_step", step)
    resumed = smoke_run(tmp_path / "cut", *overrides)
    load_stages(resumed, resumed.cfg.stages)
    a, b = whole.artifacts["adapt"], resumed.artifacts["adapt"]
    assert b.meta["training"]["resumed"] and not a.meta["training"]["resumed"]
    assert a.meta["history"] == b.meta["history"] and a.meta["curve"] == b.meta["curve"]
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_a_damaged_adapter_is_refused(tmp_path):
    run = smoke_run(tmp_path)
    load_stages(run, run.cfg.stages)
    folder = Path(run.info["adapt"]["path"])
    weights = folder / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        AdaptStage().load(run, folder)


def test_a_sweep_over_the_arms_trains_the_control_arm_once_and_compares_every_arm_with_it(tmp_path):
    """``-m adapt.inject=none,controller adapt.distill_weight=0,1``: four jobs, one control artifact (the first job's
    own), which the other three compare against."""
    from tests.test_sweep import artifacts, job_dirs, multirun

    proc = multirun(tmp_path, *SMOKE, "adapt.inject=none,controller", "adapt.distill_weight=0,1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = [json.loads((job / "metrics.json").read_text())["adapt"] for job in job_dirs(tmp_path / "sweep")]
    assert [s["arm"] for s in sections] == ["control", "distill λ=1", "controller", "controller + distill λ=1"]
    control_key = sections[0]["training"]["adapted"]["key"]
    assert all(s["training"]["control"]["key"] == control_key for s in sections[1:])
    assert len(artifacts(tmp_path / "cache", "adapt")) == 4  # the control once, three arms
