"""The harvest stage: teacher and student run over the corpus; their attention habits go to an Arrow store."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from uzr.config import RunConfig, harvest_layers
from uzr.config.controller import per_head_targets
from uzr.config.keys import key_of
from uzr.config.model import model_key
from uzr.corpus import load_run_corpus
from uzr.harvest.effect_matching import match_effects
from uzr.harvest.head_matching import match_outputs, match_store
from uzr.harvest.layer_matching import layer_kl_figure, match_layers
from uzr.harvest.runner import HarvesterFactory, run_harvest
from uzr.harvest.store import HarvestStore, StoreLayout
from uzr.resources import check_free_disk, estimate_store_bytes

log = logging.getLogger(__name__)


def head_matching(h, teacher, student, store: HarvestStore, layers: list[int], teacher_layers: list[int]) -> dict:
    """``layout.head_matching`` of a complete per-head store, by ``harvest.head_matching`` (``h``: the harvest spec)."""
    if h.head_matching == "output":
        return match_outputs(teacher, student, layers, teacher_layers)
    if h.head_matching == "effect":
        return match_effects(student, store.rows("train"), layers, h.effect_texts)
    return match_store(store.rows("train"), layers)


class HarvestStage:
    def key_payload(self, cfg: RunConfig, upstream: Mapping[str, str]) -> dict:
        payload = {
            # the model specs without an empty damage: damaged students never share an undamaged store
            "teacher": model_key(cfg.teacher), "student": model_key(cfg.student),
            "data": key_of(cfg.data, "harvest"), "harvest": key_of(cfg.harvest, "harvest"),
            "layers": harvest_layers(cfg),  # the effective set (harvest.layers itself is not keyed)
        }
        if per_head_targets(cfg):  # a head-mean store lacks the per-head rows: never reuse it (head-mean keys unchanged)
            payload["target"] = cfg.controller.target
        return payload

    def build(self, run, folder: Path) -> dict:
        """Harvest every corpus text into shards under ``folder``; resumes after the last complete shard."""
        cfg, h = run.cfg, run.cfg.harvest
        per_head = per_head_targets(cfg)
        corpus = load_run_corpus(cfg.data, lambda: run.models.get("student")[1], h.max_length)
        texts = [(t, "train") for t in corpus.train["text"]] + [(t, "heldout") for t in corpus.heldout["text"]]
        store = HarvestStore(folder)
        layers, mapping = harvest_layers(cfg)
        check_free_disk(folder, estimate_store_bytes(  # before any model loads
            len(texts), h.max_length, cfg.student.hidden_size, len(layers), cfg.teacher.loaded_layers,
            cfg.teacher.num_heads, cfg.student.loaded_layers, cfg.student.num_heads, max_dist_len=h.max_dist_len,
            per_head=per_head, teacher_candidates=cfg.teacher.loaded_layers if mapping is None else 0,
        ))
        teacher, teacher_tok = run.models.get("teacher")
        student, student_tok = run.models.get("student")
        store.write_layout(StoreLayout(
            layers=layers, teacher_layers=mapping or [], hidden_size=student.config.hidden_size,
            teacher_num_layers=teacher.config.num_hidden_layers, teacher_num_heads=teacher.config.num_attention_heads,
            student_num_layers=student.config.num_hidden_layers, student_num_heads=student.config.num_attention_heads,
            locality_window=h.locality_window, max_dist_len=h.max_dist_len, per_head=per_head,
        ))
        make_harvester = HarvesterFactory(teacher, teacher_tok, student, student_tok, layers, mapping,
                                          h.locality_window, h.block_size, h.max_length, h.max_dist_len,
                                          per_head)
        trainer_kwargs = {"accelerator": cfg.trainer.accelerator, "devices": h.devices, "strategy": h.strategy}
        summary = run_harvest(store, texts, make_harvester, h.shard_size, h.max_bad_fraction, trainer_kwargs)
        truncated = int(sum(store.dataset().with_format(None)["truncated_tokens"]))
        if truncated:
            log.info("harvest: %d of %d texts were cut at harvest.max_length=%d tokens", truncated, len(texts),
                     h.max_length)
        out = {**summary, "truncated_at_max_length": truncated, "corpus_stats": corpus.stats}
        if mapping is None:  # teacher_layers=auto, after the last shard: before the head matching, which reads the map
            layout = store.layout
            layout.layer_matching = match_layers(store.rows("train"), store.rows("heldout"), layers,
                                                 layout.teacher_num_layers)
            layout.teacher_layers = layout.layer_matching["teacher_layers"]
            store.write_layout(layout)
            out["teacher_layers"] = layout.teacher_layers
            log.info("harvest: teacher_layers=auto chose %s for student layers %s", layout.teacher_layers, layers)
        if per_head:  # after the last shard: the map is chosen on every training text
            layout = store.layout
            layout.head_matching = head_matching(h, teacher, student, store, layers, layout.teacher_layers)
            store.write_layout(layout)
            out["head_matching"] = {k: {key: v[key] for key in ("teacher_heads", "method", "kind") if key in v}
                                    for k, v in layout.head_matching.items()}
            log.info("harvest: head matching (student head -> teacher head) %s", out["head_matching"])
        return out

    def load(self, run, folder: Path) -> HarvestStore:
        return HarvestStore(folder)

    def report(self, run, store: HarvestStore) -> dict | None:
        # the store's key and path are in metrics.json -> artifacts; a per-head store adds its head matching,
        # an auto layer map its choice, its KL matrices and their figure
        layout, out = store.layout, {}
        if layout.head_matching:
            out["head_matching"] = layout.head_matching
        if layout.layer_matching:
            out["layer_matching"] = layout.layer_matching
            run.images["teacher_layers"] = layer_kl_figure(run.out_dir / "figures" / "teacher_layers_kl.png",
                                                           layout.layer_matching)
        return out or None
