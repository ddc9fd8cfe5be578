"""The svf and svf_eval stages end to end on a tiny random model (structure, not accuracy: it answers nonsense)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .test_pipeline import run_train

TINY = ["+experiment=svf_compare", "student=tiny_llama", "svf.train_items=4", "svf.prompts_per_step=2",
        "svf.samples_per_prompt=2", "svf.epochs=2", "svf.eval_items=3", "svf.max_new_tokens=4", "svf.cem_shots=2",
        "svf.cem_population=4", "svf.cem_elite_ratio=0.5", "svf.cem_iterations=2", "svf.classifier_epochs=5",
        "svf.baseline_lrs=[0.01,0.1]", "svf.val_items=2", "logger.wandb_mode=disabled",
        # svf_compare's attention-injection row: harvest + controller on a tiny pair, at the smoke experiment's sizes
        "teacher=tiny_gemma3", "inject.layers=[1,2]", "data.num_texts=24", "data.max_chars=400",
        "harvest.max_length=48", "harvest.shard_size=8", "controller.max_epochs=3", "controller.key_dim=16",
        "controller.mlp_hidden=32", "controller.batch_size=4"]


def test_svf_pipeline_writes_matrix_strategies_and_reuses_experts(tmp_path):
    done = run_train(tmp_path, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    section = metrics["svf_eval"]
    domains = ["arithmetic", "facts", "causal_loop"]
    assert set(section["matrix"]) == {"base", *domains}
    for row in domains:
        for d in domains:
            cell = section["matrix"][row][d]
            assert cell["n"] == 3 and "vs_base" in cell and cell["verdict"] in ("better", "worse", "no difference")
    table = section["comparison"]
    assert set(table) == {"base", *(f"expert:{d}" for d in domains), "prompt", "classifier", "cem", "oracle_domain",
                          "lora (oracle domain)", "ia3 (oracle domain)", "attention injection (controller)"}
    injection = table["attention injection (controller)"]
    assert injection["layers"] == [1, 2] and "vs_base" in injection and section["not_compared"] == {}
    weights = load_file(Path(metrics["artifacts"]["controller"]["path"]) / "controller.safetensors")
    assert injection["trainable_parameters"] == sum(t.numel() for t in weights.values()) > 0  # the controllers'
    assert metrics["artifacts"]["harvest"]["built"] is True  # built for the row, not asked for in `stages`
    params = metrics["svf"]["experts"]["facts"]["parameters"]
    assert params == 3 * (48 + 48 + 48)  # 3 layers x (gate, up, down): rank min(48, 96) each
    assert table["cem"]["trainable_parameters"] == 3 * params and table["oracle_domain"]["routing_accuracy"] == 1.0
    assert all(table[k]["n"] == 9 for k in table)
    others = [k for k in table if k != "base"]  # every two rows paired on the same items (e.g. SVF vs LoRA)
    assert len(section["pairs"]) == len(others) * (len(others) - 1) // 2
    pair = section["pairs"]["expert:arithmetic − lora (oracle domain)"]
    assert pair["estimate"] == pytest.approx(table["expert:arithmetic"]["accuracy"]
                                             - table["lora (oracle domain)"]["accuracy"])
    assert pair["low"] <= pair["estimate"] <= pair["high"] and pair["verdict"] in ("better", "worse", "no difference")
    for strategy in ("prompt", "classifier", "oracle_domain"):  # every item routed somewhere, counted by true domain
        routes = table[strategy]["routes"]
        assert set(routes) == set(domains) and all(sum(r.values()) == 3 for r in routes.values())
    assert table["oracle_domain"]["routes"] == {d: {d: 3} for d in domains}
    for method, per_layer in (("lora", 3 * (48 + 96)), ("ia3", 3 * 96)):  # rank-1 A+B; out, out, in (down_proj)
        row = table[f"{method} (oracle domain)"]
        assert row["trainable_parameters"] == per_layer * len(row["layers"]) <= params and "vs_base" in row
        for d in domains:
            trained = metrics["svf_baselines"][method][d]
            assert trained["svf_parameters"] == params and [s["lr"] for s in trained["sweep"]] == [0.01, 0.1]
            assert row["lr"][d] == trained["lr"] in (0.01, 0.1)
    assert metrics["svf"]["experts"]["arithmetic"]["steps"] == 4  # 2 epochs x 4 items / 2 per step
    assert (tmp_path / "run" / "figures" / "svf_accuracy_matrix.png").is_file()
    assert metrics["artifacts"]["svf"]["built"] is True
    again = run_train(tmp_path, *TINY, run_dir="run2")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert second["artifacts"]["svf"]["built"] is False and second["artifacts"]["svf_baselines"]["built"] is False
    assert second["artifacts"]["controller"]["built"] is False  # the injection row's controller is cached too
    assert second["svf_eval"]["matrix"] == section["matrix"]  # greedy and the same experts: the same answers
