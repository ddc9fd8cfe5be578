"""The harvest shows progress per text (rate, ETA) and Lightning can track its batch indices (no warning)."""

from __future__ import annotations

import warnings

from uzr.harvest.runner import HarvesterFactory, run_harvest
from uzr.harvest.store import HarvestStore, StoreLayout


def test_harvest_progress_per_text_without_batch_index_warning(tiny_models, tmp_path, capsys):
    teacher, t_tok = tiny_models["gemma3"]
    student, s_tok = tiny_models["llama"]
    texts = [(f"text number {i}, " * (2 + i), "train") for i in range(5)]
    store = HarvestStore(tmp_path / "store.partial")
    store.write_layout(StoreLayout(layers=[1], teacher_layers=[2], hidden_size=student.config.hidden_size,
                                   teacher_num_layers=4, teacher_num_heads=4, student_num_layers=3,
                                   student_num_heads=4, locality_window=8, max_dist_len=16))
    factory = HarvesterFactory(teacher, t_tok, student, s_tok, [1], [2], window=8, block_size=16, max_length=32,
                               max_dist_len=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_harvest(store, texts, factory, shard_size=2)
    assert summary == {"texts": 5, "shards": 3, "resumed_shards": 0, "skipped_nonfinite": 0}
    assert not [w for w in caught if "batch indices" in str(w.message)]
    err = capsys.readouterr().err
    assert "harvest: 100%" in err and "5/5" in err and ("text/s" in err or "s/text" in err)
    assert "Predicting" not in err  # Lightning's per-shard bar is off
    assert run_harvest(store, texts, factory, shard_size=2)["resumed_shards"] == 3
