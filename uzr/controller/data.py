"""LightningDataModule over a harvest store: padded batches of hidden states and target distributions."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uzr.harvest.head_matching import matched_teacher_rows
from uzr.harvest.store import HarvestStore, StoreRows


class ControllerRows(Dataset):
    """Store rows reduced to what the controller needs at the injected layers.

    The distributions cover only the leading ``D = min(S, harvest.max_dist_len)`` positions, so every
    per-position tensor is cut to those ``D``: hidden (D, H), teacher/student dists (D, D). The controller
    scores pairs of positions by content and relative distance, so it learns the same from the block.
    ``per_head``: the dists are per student head, (H, D, D): each head's matched teacher head
    (:mod:`uzr.harvest.head_matching`) and the head's own rows.
    """

    def __init__(self, rows: StoreRows, layers: list[int], per_head: bool = False):
        self.rows, self.layers, self.per_head = rows, layers, per_head

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        n = row[f"teacher_dist_L{self.layers[0]}"].shape[-1]  # D
        item = {"length": n}
        for layer in self.layers:
            for column, cut in (("hidden", np.s_[:n]), ("teacher_dist", np.s_[:n, :n]), ("student_dist", np.s_[:n, :n])):
                item[f"{column}_L{layer}"] = torch.from_numpy(np.asarray(row[f"{column}_L{layer}"][cut], np.float32))
            if self.per_head:  # (H, D, D) in place of the head means
                item[f"teacher_dist_L{layer}"] = torch.from_numpy(
                    matched_teacher_rows(row, layer, self.rows.layout).astype(np.float32))
                item[f"student_dist_L{layer}"] = torch.from_numpy(np.asarray(row[f"student_heads_L{layer}"], np.float32))
        return item


def collate(items: list[dict], layers: list[int]) -> dict:
    """Pad to the longest item. Returns mask (B, S) and per layer hidden (B, S, H), target/student_self (B, S, S)
    (per head: (B, heads, S, S)).

    ``S`` here is the longest item's length, at most ``harvest.max_dist_len`` (see :class:`ControllerRows`).
    """
    lengths = torch.tensor([item["length"] for item in items])
    s = int(lengths.max())
    batch = {"mask": torch.arange(s)[None] < lengths[:, None], "hidden": {}, "target": {}, "student_self": {}}
    for layer in layers:
        key = str(layer)
        d = items[0][f"hidden_L{layer}"].shape[-1]
        heads = items[0][f"teacher_dist_L{layer}"].shape[:-2]  # () or (H,)
        hidden = torch.zeros(len(items), s, d)
        target, own = torch.zeros(len(items), *heads, s, s), torch.zeros(len(items), *heads, s, s)
        for b, item in enumerate(items):
            n = item["length"]
            hidden[b, :n] = item[f"hidden_L{layer}"]
            target[b, ..., :n, :n] = item[f"teacher_dist_L{layer}"]
            own[b, ..., :n, :n] = item[f"student_dist_L{layer}"]
        batch["hidden"][key], batch["target"][key], batch["student_self"][key] = hidden, target, own
    return batch


class StoreDataModule(L.LightningDataModule):
    """Train on the store's ``train`` split, validate (held-out KL) on its ``heldout`` split."""

    def __init__(self, store: HarvestStore, layers: list[int], batch_size: int = 8, seed: int = 0,
                 per_head: bool = False):
        super().__init__()
        self.store, self.layers, self.batch_size, self.seed = store, list(layers), batch_size, seed
        self.per_head = per_head
        self.splits: dict[str, ControllerRows] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            dataset, layout = self.store.dataset(), self.store.layout
            missing = [layer for layer in self.layers if layer not in layout.layers]
            if missing:
                raise ValueError(f"store {self.store.folder} was harvested for layers {layout.layers}, not {missing}")
            if self.per_head and not layout.per_head:
                raise ValueError(f"store {self.store.folder} holds head-mean targets only; controller.target=per_head "
                                 "needs a store harvested with it (its own cache key)")
            for split in ("train", "heldout"):
                self.splits[split] = ControllerRows(StoreRows(dataset, layout, split), self.layers, self.per_head)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
            collate_fn=lambda items: collate(items, self.layers),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("heldout", shuffle=False)
