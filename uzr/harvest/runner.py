"""The harvest as ``Trainer.predict``: one prediction step per shard, a writer that stores each shard.

Shards are fixed ranges of the corpus (``shard_size`` texts), so their contents do not depend on how
many processes share the work: with ``strategy=ddp`` each rank gets whole shards from Lightning's
distributed sampler and writes them into the same store folder, and the merged store equals the
single-process one. Shards already on disk are skipped, so a killed harvest resumes where it stopped.
Progress is shown per text (rate and ETA, rank 0's share), not per shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from uzr.harvest.harvester import Harvester, row_is_finite
from uzr.harvest.store import HarvestStore

log = logging.getLogger(__name__)


@dataclass
class HarvesterFactory:
    """Builds the :class:`Harvester` inside each process (picklable, so ``ddp_spawn`` can ship it)."""

    teacher: torch.nn.Module
    teacher_tok: object
    student: torch.nn.Module
    student_tok: object
    layers: list[int]
    teacher_layers: list[int]
    window: int
    block_size: int
    max_length: int
    max_dist_len: int
    per_head: bool = False

    def __call__(self, device) -> Harvester:
        return Harvester(self.teacher.to(device), self.teacher_tok, self.student.to(device), self.student_tok,
                         self.layers, self.teacher_layers, self.window, self.block_size, self.max_length,
                         self.max_dist_len, self.per_head)


class ShardDataset(Dataset):
    """Items are whole shards: ``(shard index, [(text, split), ...])``."""

    def __init__(self, shards: list[tuple[int, list[tuple[str, str]]]]):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        return self.shards[i]


def _one_shard(items: list):
    """``collate_fn`` of batches of one shard: the shard itself (module level, so ``ddp_spawn`` can pickle it).

    Batches of one (rather than ``batch_size=None``) give the loader a batch sampler, which Lightning's
    predict loop wraps to track the batch indices it hands to the prediction writer.
    """
    (shard,) = items
    return shard


class HarvestTask(L.LightningModule):
    """Runs the :class:`Harvester` on each shard; returns ``(shard index, rows, bad text indices)``.

    The frozen models are kept outside the module's parameters (Lightning would otherwise wrap and
    broadcast hundreds of MB per rank); a one-element anchor parameter keeps DDP content.
    """

    def __init__(self, make_harvester, shard_size: int):
        super().__init__()
        self._make_harvester, self.shard_size = make_harvester, shard_size
        self._harvester: Harvester | None = None
        self._progress = None
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def _texts_of_this_rank(self) -> int | None:
        """Texts in the shards this process will predict (its sampler's share), None if unknown."""
        loader = self.trainer.predict_dataloaders
        try:
            return sum(len(loader.dataset[i][1]) for i in loader.batch_sampler.sampler)
        except (AttributeError, TypeError):
            return None

    def on_predict_start(self) -> None:
        self._harvester = self._make_harvester(self.device)
        self._progress = tqdm(total=self._texts_of_this_rank(), desc="harvest", unit="text", dynamic_ncols=True,
                              disable=not self.trainer.is_global_zero)

    def on_predict_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._harvester is not None:
            self._harvester.close()
            self._harvester = None

    def predict_step(self, batch, batch_idx):
        index, texts = batch
        rows, bad = [], []
        for offset, (text, split) in enumerate(texts):
            row = self._harvester(text)
            if row_is_finite(row):
                rows.append({**row, "split": split})
            else:
                bad.append(index * self.shard_size + offset)
            self._progress.update(1)
        return index, rows, bad


class ShardWriter(BasePredictionWriter):
    """Writes each predicted shard into the store as soon as it is done; counts skipped texts."""

    def __init__(self, store: HarvestStore, total_texts: int, max_bad_fraction: float):
        super().__init__(write_interval="batch")
        self.store, self.total, self.max_bad_fraction = store, total_texts, max_bad_fraction
        self.bad: list[int] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        index, rows, bad = prediction
        self.bad.extend(bad)
        if len(self.bad) > self.max_bad_fraction * self.total:
            raise FloatingPointError(
                f"{len(self.bad)} of {self.total} texts gave non-finite attention statistics (more than "
                f"harvest.max_bad_fraction={self.max_bad_fraction}); check the model dtype (try float32)"
            )
        if rows:
            self.store.write_shard(index, rows)


def run_harvest(store: HarvestStore, texts: list[tuple[str, str]], make_harvester, shard_size: int,
                max_bad_fraction: float = 0.05, trainer_kwargs: dict | None = None) -> dict:
    """Harvest ``texts`` ((text, split) pairs) into ``store``, skipping shards already written.

    ``make_harvester(device)`` builds the :class:`Harvester` inside each process.
    Returns ``{"texts", "shards", "resumed_shards", "skipped_nonfinite"}``.
    """
    shards = [(i, texts[start:start + shard_size]) for i, start in enumerate(range(0, len(texts), shard_size))]
    done = set(store.done_shards())
    todo = [shard for shard in shards if shard[0] not in done]
    if done:
        log.info("harvest resumes: %d of %d shards already in %s", len(shards) - len(todo), len(shards), store.folder)
    writer = ShardWriter(store, len(texts), max_bad_fraction)
    if todo:
        # Lightning's own bar would tick once per shard: the task shows progress per text instead
        trainer = L.Trainer(**{
            "logger": False, "enable_checkpointing": False, "enable_model_summary": False, "enable_progress_bar": False,
            "callbacks": [writer], **(trainer_kwargs or {"accelerator": "cpu", "devices": 1}),
        })
        loader = torch.utils.data.DataLoader(ShardDataset(todo), batch_size=1, shuffle=False, collate_fn=_one_shard)
        trainer.predict(HarvestTask(make_harvester, shard_size), loader, return_predictions=False)
    if writer.bad:
        log.warning("harvest skipped %d texts with non-finite statistics: %s", len(writer.bad), writer.bad[:20])
    return {"texts": len(texts), "shards": len(shards), "resumed_shards": len(shards) - len(todo),
            "skipped_nonfinite": len(writer.bad)}

