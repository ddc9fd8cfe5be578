"""HarvestStore: the harvest's Arrow dataset, one row per text, written in resumable shards.

Each shard is a ``datasets`` folder (``save_to_disk``) renamed into place when complete, so a killed
harvest resumes from its last complete shard. Reading concatenates the shards memory-mapped.

Arrays are stored flat (float16 unless noted) and reshaped on read from ``layout.json``. ``S`` is the
text's student token count, ``D = min(S, max_dist_len)``: the distributions cover the leading ``D`` query
rows and keys only (a causal row ``< D`` sees no key ``>= D``, so each stored row is whole), everything
else covers all ``S`` positions.

=========================  ==================  =====================================================
column                     shape               meaning
=========================  ==================  =====================================================
input_ids                  (S,) int32          student tokens
hidden_L{l}                (S, D)              student hidden state entering attention of layer l
teacher_dist_L{l}          (D, D)              head-mean teacher attention (mapped layer) on the student grid
student_dist_L{l}          (D, D)              the student's own head-mean attention (baseline)
teacher_heads_L{l}         (H_t, D, D)         every teacher head (mapped layer) on the student grid (per_head)
teacher_dist_T{t}          (D, D)              ``teacher_layers=auto`` only: teacher layer t's head mean (a
                                               candidate); ``teacher_dist_L{l}`` is then read as the chosen one
teacher_heads_T{t}         (H_t, D, D)         ``teacher_layers=auto`` with per_head: teacher layer t's heads
student_heads_L{l}         (H_s, D, D)         every student head's own attention (per_head)
teacher_{stat}             (L_t, H_t, S)       teacher statistics gathered at the mapped query positions
student_{stat}             (L_s, H_s, S)       student statistics
teacher_next_entropy       (S,) float32        teacher next-token entropy (nats) at the mapped position
teacher_next_maxprob       (S,) float32        teacher next-token max probability
=========================  ==================  =====================================================

A store harvested with ``inject.teacher_layers=auto`` records the chosen map in ``teacher_layers`` and the
evidence in ``layer_matching`` (:mod:`uzr.harvest.layer_matching`); its rows expose the chosen candidate
under the usual ``teacher_dist_L{l}`` / ``teacher_heads_L{l}`` names, so readers need not know.

A ``per_head`` store also records, in ``layout.json``, which teacher head each student head learns from
(``head_matching``, chosen on the training texts by :mod:`uzr.harvest.head_matching`).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from uzr.attention.stats import STAT_NAMES

LAYOUT = "layout.json"


@dataclass
class StoreLayout:
    """Everything needed to reshape a row, plus what the store was harvested for."""

    layers: list[int]  # injected student layers
    teacher_layers: list[int]  # teacher layer mapped to each injected layer
    hidden_size: int
    teacher_num_layers: int
    teacher_num_heads: int
    student_num_layers: int
    student_num_heads: int
    locality_window: int
    max_dist_len: int | None = None  # distributions cover min(S, this) leading positions; None: all S
    per_head: bool = False  # each head's rows are stored too (controller.target=per_head)
    # per_head: {"L{layer}": {"teacher_heads": [teacher head per student head], "cost": (H_t, H_s) mean KL,
    # "method": ...}}, written once the harvest is complete (uzr.harvest.head_matching)
    head_matching: dict | None = None
    # teacher_layers=auto: {"teacher_layers": [...], "train_kl"/"heldout_kl": (L_t, n_layers) mean row KL, ...};
    # until it is written (during the harvest) teacher_layers is empty
    layer_matching: dict | None = None

    def dist_len(self, seq_len: int) -> int:
        """``D``: rows and keys of the stored distributions of a text of ``seq_len`` tokens."""
        return seq_len if self.max_dist_len is None else min(seq_len, self.max_dist_len)

    def shape(self, column: str, seq_len: int) -> tuple[int, ...]:
        if column.startswith("hidden_"):
            return (seq_len, self.hidden_size)
        if column.startswith(("teacher_dist_", "student_dist_")):  # teacher_dist_T{t} included
            return (self.dist_len(seq_len),) * 2
        if column.startswith("teacher_heads_"):
            return (self.teacher_num_heads, *(self.dist_len(seq_len),) * 2)
        if column.startswith("student_heads_"):
            return (self.student_num_heads, *(self.dist_len(seq_len),) * 2)
        if column.startswith("teacher_") and column.removeprefix("teacher_") in STAT_NAMES:
            return (self.teacher_num_layers, self.teacher_num_heads, seq_len)
        if column.startswith("student_") and column.removeprefix("student_") in STAT_NAMES:
            return (self.student_num_layers, self.student_num_heads, seq_len)
        return (seq_len,)


class HarvestStore:
    """A folder of Arrow shards plus ``layout.json``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**json.loads((self.folder / LAYOUT).read_text()))

    def write_layout(self, layout: StoreLayout) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / LAYOUT).write_text(json.dumps(asdict(layout), indent=2))

    def shard_dir(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}"

    def done_shards(self) -> list[int]:
        """Indices of complete shards (a folder without its ``state.json`` or data files is not one)."""
        return sorted(int(p.name.split("-")[1]) for p in self.folder.glob("shard-[0-9]*") if shard_complete(p))

    def write_shard(self, index: int, rows: list[dict]) -> None:
        """Write rows (dicts of numpy arrays / scalars / strings) atomically as shard ``index``."""
        columns = {key: [flatten(row[key]) for row in rows] for key in rows[0]}
        tmp = self.folder / f".tmp-shard-{index:05d}-{os.getpid()}"
        with quiet_datasets():
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp))
        final = self.shard_dir(index)
        if final.exists() and not shard_complete(final):
            shutil.rmtree(final)  # an incomplete folder (copied in, damaged): never keep it over new data
        try:
            os.replace(tmp, final)
        except OSError:  # another rank finished this shard first (DDP pads with repeated shards)
            shutil.rmtree(tmp)

    def dataset(self) -> datasets.Dataset:
        shards = []
        for i in self.done_shards():
            try:
                shards.append(datasets.load_from_disk(str(self.shard_dir(i))))
            except Exception as err:  # pyarrow.ArrowInvalid, OSError, JSON errors on damaged files
                raise CorruptStore(
                    f"harvest store shard {self.shard_dir(i)} cannot be read ({type(err).__name__}: {err}); the "
                    f"store is damaged. Delete {self.folder} and run again with 'harvest' in stages to rebuild it."
                ) from err
        if not shards:
            raise FileNotFoundError(f"harvest store {self.folder} has no shards")
        return datasets.concatenate_datasets(shards).with_format("numpy")

    def rows(self, split: str | None = None) -> StoreRows:
        return StoreRows(self.dataset(), self.layout, split)


class StoreRows:
    """Row access with arrays reshaped; optionally restricted to one split ("train" / "heldout")."""

    def __init__(self, dataset: datasets.Dataset, layout: StoreLayout, split: str | None):
        self.dataset, self.layout = dataset, layout
        splits = dataset.with_format(None)["split"]
        self.indices = [i for i, s in enumerate(splits) if split is None or s == split]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = self.dataset[self.indices[i]]
        seq_len = len(row["input_ids"])
        out = {
            key: value.reshape(self.layout.shape(key, seq_len)) if isinstance(value, np.ndarray) else value
            for key, value in row.items()
        }
        if self.layout.layer_matching:  # teacher_layers=auto: the chosen candidate under the mapped name
            for layer, t in zip(self.layout.layers, self.layout.teacher_layers):
                for kind in ("dist", "heads"):
                    if f"teacher_{kind}_T{t}" in out:
                        out[f"teacher_{kind}_L{layer}"] = out[f"teacher_{kind}_T{t}"]
        return out


class CorruptStore(RuntimeError):
    """A store shard that cannot be read."""


def shard_complete(path: Path) -> bool:
    """A shard folder as ``save_to_disk`` leaves it: ``state.json`` naming data files that all exist."""
    state = path / "state.json"
    if not (path.is_dir() and state.is_file() and (path / "dataset_info.json").is_file()):
        return False
    try:
        files = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(files) and all((path / name).is_file() for name in files)


@contextmanager
def quiet_datasets():
    """A per-shard "Saving the dataset" bar would drown the harvest's own progress bar."""
    enabled = datasets.utils.is_progress_bar_enabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.enable_progress_bars()


def flatten(value):
    if isinstance(value, np.ndarray):
        return value.reshape(-1)
    return value
