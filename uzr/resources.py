"""Resource checks that run before a long stage starts, so it fails at once instead of hours in.

:func:`estimate_store_bytes` sizes a harvest store from the columns documented in
:mod:`uzr.harvest.store` (an upper bound: every text is taken at ``max_length`` student tokens);
:func:`check_free_disk` compares an estimate with the free space where it will be written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from uzr.attention.stats import STAT_NAMES

F16, F32, I32 = 2, 4, 4
# Safety margin on top of the estimate: Arrow metadata, dataset_info/state JSON, the manifest.
MARGIN = 1.05
# UTF-8 bytes of the row's text per student token (the tiny char tokenizer has 1 char per token,
# subword tokenizers about 4; CJK and emoji take 3-4 bytes a character).
TEXT_BYTES_PER_TOKEN = 8


class InsufficientDiskSpace(OSError):
    """The estimated artifact does not fit in the free space of its folder."""


def estimate_store_bytes(num_texts: int, max_length: int, hidden_size: int, n_layers_stored: int,
                         teacher_L: int, teacher_H: int, student_L: int, student_H: int,
                         text_bytes_per_token: int = TEXT_BYTES_PER_TOKEN, max_dist_len: int | None = None,
                         per_head: bool = False, teacher_candidates: int = 0) -> int:
    """Bytes a harvest store of ``num_texts`` texts takes at most (each text at ``max_length`` tokens).

    Per row with ``S = max_length`` and ``N = min(S, max_dist_len)`` (see the column table in
    :mod:`uzr.harvest.store`): ``input_ids`` S int32; per stored layer ``hidden_L`` S*D,
    ``teacher_dist_L`` and ``student_dist_L`` N*N each (float16); teacher and student statistics
    ``len(STAT_NAMES)`` * L * H * S each (float16); ``teacher_next_entropy``/``teacher_next_maxprob`` S
    float32 each; the text itself. ``max_dist_len=None``: the distributions cover all S positions.
``per_head``: per stored layer also ``teacher_heads_L`` and ``student_heads_L``, (H_t + H_s)*N*N float16.
    ``teacher_candidates`` (``inject.teacher_layers=auto``: every teacher layer): ``teacher_dist_T`` N*N each, per
    head also ``teacher_heads_T`` H_t*N*N (an upper bound: the ``teacher_*_L`` columns are then not written).
    """
    S = int(max_length)
    N = S if max_dist_len is None else min(S, int(max_dist_len))
    per_row = (
        S * I32  # input_ids
        + n_layers_stored * (S * hidden_size + 2 * N * N) * F16  # hidden, teacher_dist, student_dist
        + (n_layers_stored * (teacher_H + student_H) * N * N * F16 if per_head else 0)  # *_heads
        + len(STAT_NAMES) * (teacher_L * teacher_H + student_L * student_H) * S * F16  # statistics
        + teacher_candidates * (1 + (teacher_H if per_head else 0)) * N * N * F16  # teacher_dist_T, teacher_heads_T
        + 2 * S * F32  # teacher next-token entropy and max probability
        + S * text_bytes_per_token  # the text
        + 64  # scalars (split, alignment diagnostics, teacher_len, nll, bytes) and list offsets
    )
    return int(num_texts * per_row * MARGIN)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (the artifact folder may not exist yet)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_free_disk(folder: str | Path, needed_bytes: int, what: str = "harvest store") -> int:
    """Raise :class:`InsufficientDiskSpace` if ``needed_bytes`` exceeds the free space at ``folder``.

    Returns the free bytes. The message gives the estimate, the free space and the folder, and how to
    make the artifact smaller or put it elsewhere.
    """
    where = _existing(Path(folder))
    free = shutil.disk_usage(where).free
    if needed_bytes > free:
        raise InsufficientDiskSpace(
            f"the {what} needs about {human_bytes(needed_bytes)} ({needed_bytes} bytes, estimated) but only "
            f"{human_bytes(free)} ({free} bytes) is free in {where}; stopping before starting. Free some space, "
            f"point cache_dir= at a bigger disk, or lower data.num_texts / harvest.max_length / the stored layers."
        )
    return free


__all__ = ["InsufficientDiskSpace", "check_free_disk", "estimate_store_bytes", "human_bytes"]
