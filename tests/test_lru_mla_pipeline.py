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


PRETRAINED = ["+experiment=lru_mla_pretrained", "student=tiny_llama", "lru_mla.groups=[mla,mla_lru_act]",
              "lru_mla.pretrained.top_layers=1", "lru_mla.pretrained.latent_rank=8", "lru_mla.pretrained.rope_pairs=2",
              "lru_mla.pretrained.conversion_ranks=[4]", "lru_mla.pretrained.train_items=24",
              "lru_mla.pretrained.eval_items=16", "lru_mla.pretrained.steps=3", "lru_mla.pretrained.batch_size=4",
              "lru_mla.pretrained.fewshot_items=6", "lru_mla.pretrained.fewshot_shots=[0,2]",
              "lru_mla.pretrained.bpb_texts=2", "lru_mla.pretrained.bpb_max_tokens=40", "lru_mla.max_steps=3",
              "logger.wandb_mode=disabled"]


def test_pretrained_stage_trains_reports_and_starts_the_reward_objective_from_its_sft_groups(tmp_path):
    """Structure on a tiny random Llama: SFT groups, conversion cost, few-shot and KL exit in the report; the reward
    objective reuses the SFT artifacts and adds its REINFORCE steps."""
    done = run_train(tmp_path, *PRETRAINED)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    section = metrics["lru_mla_pretrained"]
    act, mla = section["groups"]["mla_lru_act"], section["groups"]["mla"]
    assert act["steps"] == mla["steps"] == 3 and act["trainable_parameters"] > mla["trainable_parameters"]
    assert 1 <= act["iterations"]["all"] <= 3 and "kl_exit" in act and "iterations" not in mla
    ranks = section["conversion"]["ranks"]
    assert set(ranks) == {"original", "rank_4", "rank_8", "rank_40"} and ranks["rank_40"]["full_rank"]
    assert abs(ranks["rank_40"]["bits_per_byte"] - ranks["original"]["bits_per_byte"]) < 1e-3
    assert set(section["fewshot"]["groups"]["mla"]) == {"0", "2"} and section["fewshot"]["groups"]["mla"]["2"]["n"] == 6
    assert set(section["paired"]) == {"D-B (mla_lru_act - mla)"} == set(section["fewshot"]["paired"])
    assert (tmp_path / "run" / "figures" / "lru_mla_pretrained_fewshot.png").is_file()
    reward = run_train(tmp_path, *PRETRAINED, "lru_mla.objective=reward", "lru_mla.pretrained.reward_steps=1",
                       "lru_mla.pretrained.reward_samples=2", run_dir="run2")
    assert reward.returncode == 0, reward.stderr[-3000:]
    second = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    built = {k.split("/")[0]: [] for k in second["artifacts"]}
    for k, v in second["artifacts"].items():
        built[k.split("/")[0]].append(v["built"])
    assert sorted(built["lru_mla_pretrained_group"]) == [False, False, True, True]  # SFT reused, REINFORCE built
    assert built["lru_mla_prefix"] == [False]
