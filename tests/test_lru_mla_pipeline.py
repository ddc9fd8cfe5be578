"""The lru_mla stage end to end through ``python -m uzr.train`` on a tiny setting (structure, not accuracy)."""

from __future__ import annotations

import json

from .test_pipeline import run_train

TINY = ["+experiment=lru_mla", "lru_mla.groups=[mla,mla_lru_act]", "lru_mla.train_items=96", "lru_mla.eval_items=40",
        "lru_mla.epochs=1", "lru_mla.d_model=32", "lru_mla.heads=2", "lru_mla.head_dim=8", "lru_mla.rope_dim=4",
        "lru_mla.kv_rank=16", "lru_mla.max_steps=3", "lru_mla.warmup_steps=2", "logger.wandb_mode=disabled"]


def test_lru_mla_stage_trains_reports_and_reuses_its_groups(tmp_path):
    done = run_train(tmp_path, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    section = metrics["lru_mla"]
    assert set(section["groups"]) == {"mla", "mla_lru_act"} and metrics["artifacts"]["lru_mla"]["built"] is True
    act = section["groups"]["mla_lru_act"]
    assert abs(act["parameters"] - section["groups"]["mla"]["parameters"]) <= 0.02 * act["parameters"]
    assert act["steps"] == 2 and 1 <= act["iterations"]["all"] <= 3 and "convergence_ratio" in act
    assert act["greedy_agreement"]["agree"] == act["greedy_agreement"]["items"]  # cache decoding = teacher forcing
    assert set(section["paired"]) == {"D-B (mla_lru_act - mla)"} and "chance" in section
    assert section["heldout_items"] == sum(section["heldout_per_level"].values())
    assert (tmp_path / "run" / "figures" / "lru_mla.png").is_file()
    again = run_train(tmp_path, *TINY, run_dir="run2")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert second["artifacts"]["lru_mla"]["built"] is False and second["lru_mla"]["groups"] == section["groups"]
