"""The ``lru_mla`` stage: the four-group ablation (A attention, B MLA, C MLA + LRU fixed, D MLA + LRU + ACT).

Cached and resumable: each group is its own sub-artifact (:mod:`uzr.reasoning.groups`), copied into the stage's
artifact as ``<group>/``. The report (:mod:`uzr.reasoning.ablation_report`) compares the groups on the same
held-out items.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from uzr.config.keys import key_of
from uzr.reasoning.ablation_report import present, summarise
from uzr.reasoning.groups import GROUP_FILES, cached_group, datasets


class LRUMLAStage:
    def key_payload(self, cfg, upstream: Mapping[str, str]) -> dict:
        return {"lru_mla": key_of(cfg.lru_mla, "lru_mla"), "seed": cfg.seed, "trainer": key_of(cfg.trainer, "lru_mla")}

    def build(self, run, folder: Path) -> dict:
        spec, seed = run.cfg.lru_mla, run.cfg.seed
        train, heldout = datasets(spec, seed)
        reused = {}
        for group in spec.groups:
            done, reused[group] = cached_group(run, group, train, heldout)
            (folder / group).mkdir(parents=True, exist_ok=True)
            for name in GROUP_FILES:
                shutil.copyfile(done / name, folder / group / name)
        return {"groups": list(spec.groups), "train_items": len(train.ids), "heldout_items": len(heldout.ids),
                "groups_reused": reused}

    def load(self, run, folder: Path) -> dict:
        """Each group's ``group.json``, the held-out items and the training answers (regenerated: same seed)."""
        spec = run.cfg.lru_mla
        train, heldout = datasets(spec, run.cfg.seed)
        return {"groups": {g: json.loads((folder / g / "group.json").read_text()) for g in spec.groups},
                "heldout": heldout, "train_answers": train.answers, "folder": folder}

    def report(self, run, artifact: dict) -> dict:
        return summarise(run, artifact)

    def present(self, run, section: dict) -> None:
        present(run, section)
