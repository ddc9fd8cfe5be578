"""``inject.teacher_layers=auto`` (issue 13): the harvest stores every teacher layer's aligned rows, and each
injected student layer takes the teacher layer whose attention is closest to its own."""

from __future__ import annotations

import copy
import json

import numpy as np

from uzr.config import harvest_layers
from uzr.harvest.harvester import Harvester
from uzr.harvest.layer_matching import layer_kl_figure, match_layers
from uzr.harvest.store import HarvestStore, StoreLayout

from .conftest import resolved
from .test_per_head import TEXTS


def truncated(model, keep: int):
    """The model's first ``keep`` decoder layers: layer l < keep computes exactly what the full model's layer l
    does, so its attention equals the full model's there (a known best teacher layer)."""
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:keep]
    short.config.num_hidden_layers = keep
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:keep]
    return short


def test_auto_picks_the_teacher_layer_the_student_layer_copies(tiny_models, tmp_path):
    teacher, tok = tiny_models["qwen2"]  # 3 layers
    student = truncated(teacher, 2)  # proportional depth would map student layer 1 to teacher layer 2
    h = Harvester(teacher, tok, student, tok, [0, 1], None, window=4, block_size=8, max_length=64, max_dist_len=64)
    try:
        rows = [{**h(text), "split": "train" if i < 3 else "heldout"} for i, text in enumerate(TEXTS)]
    finally:
        h.close()
    assert {f"teacher_dist_T{t}" for t in range(3)} <= set(rows[0]) and "teacher_dist_L1" not in rows[0]
    matching = match_layers(rows[:3], rows[3:], [0, 1], 3)
    assert matching["teacher_layers"] == [0, 1]
    train = np.asarray(matching["train_kl"])  # (3 teacher layers, 2 student layers)
    assert train.shape == (3, 2) and abs(train[1, 1]) < 1e-9 < min(train[0, 1], train[2, 1])
    assert np.asarray(matching["heldout_kl"]).argmin(0).tolist() == [0, 1]  # the choice holds on unseen text

    # the store records the map and reads the chosen candidate under the usual name
    store = HarvestStore(tmp_path / "store")
    store.write_layout(StoreLayout(layers=[0, 1], teacher_layers=matching["teacher_layers"], hidden_size=48,
                                   teacher_num_layers=3, teacher_num_heads=4, student_num_layers=2,
                                   student_num_heads=4, locality_window=4, max_dist_len=64, layer_matching=matching))
    store.write_shard(0, rows)
    row = store.rows("train")[0]
    np.testing.assert_array_equal(row["teacher_dist_L1"], rows[0]["teacher_dist_T1"])
    assert json.loads((tmp_path / "store" / "layout.json").read_text())["teacher_layers"] == [0, 1]
    assert layer_kl_figure(tmp_path / "kl.png", matching).stat().st_size > 0


def test_auto_is_a_valid_config_that_defers_the_map_to_the_harvest():
    run = resolved("+experiment=default", "inject.teacher_layers=auto")
    assert harvest_layers(run) == ([4, 15, 26], None)
