"""Harvester: one text -> one store row of teacher and student attention habits on the student's grid.

Both models run with the ``uzr`` attention function and a :class:`~uzr.attention.LayerRecorder` on every
layer, so statistics come from the scores inside the attention call (float32, query blocks) and the
full ``(H, S, S)`` weights are never kept. Only the mapped teacher layers and the injected student
layers keep a head-mean distribution, and only for the leading ``D = min(S, max_dist_len)`` positions
(a dense ``(D, D)`` block per layer: the store would otherwise grow with ``S^2``). With ``per_head`` those
layers also keep each head's rows of the same block (``(H, D, D)``), for per-head targets.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

from uzr.attention import LayerRecorder, attention_modules, decoder_of, recording
from uzr.attention.reducers import HabitStats, HeadMeanRows, HeadRows
from uzr.attention.stats import STAT_NAMES
from uzr.harvest.align import TokenAligner
from uzr.hooks import capture_inputs
from uzr.next_token import next_token_stats
from uzr.text_bytes import predicted_bytes


class RecordedModel:
    """A frozen model whose layers record attention statistics during ``forward`` (until :meth:`detach`)."""

    def __init__(self, model, window: int, block_size: int, keep_head_mean: list[int],
                 capture_hidden: list[int] = (), per_head: bool = False):
        self.model = model
        self.decoder = decoder_of(model)  # the text stack: LM head applied only where needed
        modules = attention_modules(model)
        self.keep_head_mean = list(keep_head_mean)
        self.kept = [HeadMeanRows.name, HeadRows.name] if per_head else [HeadMeanRows.name]
        recorders = {}
        for index in range(len(modules)):
            reducers = [HabitStats(window)]
            if index in self.keep_head_mean:
                reducers += [HeadMeanRows(), HeadRows()] if per_head else [HeadMeanRows()]
            recorders[index] = LayerRecorder(block_size=block_size, reducers=reducers)
        self._attached = ExitStack()  # the recorders and input hooks, for the harvester's lifetime
        self.recorders = self._attached.enter_context(recording(model, recorders))
        self.hidden = self._attached.enter_context(
            capture_inputs({layer: modules[layer] for layer in capture_hidden}, detach=True))  # {layer: (1, S, D)}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, dist_rows: int | None = None) -> dict:
        """Returns stats {name: (L, H, S)}, head_mean {layer: (S', S')}, heads {layer: (H, S', S')} (``per_head``
        only), hidden {layer: (S, D)}, final (1, S, D).

        ``dist_rows``: head-mean (and per-head) rows and keys kept, ``S' = min(S, dist_rows)``; None: all.
        """
        for index in self.keep_head_mean:
            for name in self.kept:
                self.recorders[index][name].dist_rows = dist_rows
        # use_cache=False: nothing decodes after a harvest pass, and the KV cache is ~150 MB at S=4096
        out = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in STAT_NAMES}
        kept: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.kept}
        for index, recorder in self.recorders.items():
            results = recorder.take()
            layer_stats = HabitStats.named(results[HabitStats.name])
            for name in STAT_NAMES:
                stats[name].append(layer_stats[name][0])  # (H, S)
            for name in self.kept:
                if name in results:
                    kept[name][index] = results[name][0]
        return {
            "stats": {name: torch.stack(values) for name, values in stats.items()},  # (L, H, S)
            **kept,
            "hidden": {layer: h[0] for layer, h in self.hidden.items()},
            "final": out.last_hidden_state,
        }

    def detach(self) -> None:
        self._attached.close()


class Harvester:
    """Turns texts into store rows for a teacher/student pair.

    Args:
        layers: injected student layers; ``teacher_layers``: the teacher layer mapped to each, or None
            (``inject.teacher_layers=auto``): every teacher layer's rows are stored as candidates
            (``teacher_dist_T{t}``, per head ``teacher_heads_T{t}``) and the map is chosen after the harvest
            (:mod:`uzr.harvest.layer_matching`).
        window: locality window (``harvest.locality_window``); ``block_size``: query rows per block
            (``harvest.block_size``).
        max_length: student tokens per text; the teacher sees the same characters.
        max_dist_len: the distributions cover the leading ``min(S, max_dist_len)`` student positions.
        per_head: also store each head's rows (``teacher_heads_L{l}``, ``student_heads_L{l}``).
    """

    def __init__(self, teacher, teacher_tok, student, student_tok, layers: list[int], teacher_layers: list[int] | None,
                 window: int, block_size: int, max_length: int = 256, max_dist_len: int = 512,
                 per_head: bool = False):
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.layers, self.max_length = list(layers), max_length
        self.teacher_layers = None if teacher_layers is None else list(teacher_layers)
        self.max_dist_len, self.per_head = max_dist_len, per_head
        kept = range(len(attention_modules(teacher))) if teacher_layers is None else sorted(set(teacher_layers))
        self.teacher = RecordedModel(teacher, window, block_size, keep_head_mean=list(kept), per_head=per_head)
        self.student = RecordedModel(student, window, block_size, keep_head_mean=layers, capture_hidden=layers,
                                     per_head=per_head)
        self.device = next(student.parameters()).device

    def close(self) -> None:
        self.teacher.detach()
        self.student.detach()

    def __call__(self, text: str) -> dict:
        """One store row (numpy arrays, see :mod:`uzr.harvest.store`)."""
        aligner = TokenAligner.from_text(text, self.teacher_tok, self.student_tok, self.max_length)
        t_ids = aligner.teacher_input_ids[None].to(self.teacher.model.device)  # (1, T)
        s_ids = aligner.student_input_ids[None].to(self.device)  # (1, S)
        # the stored distributions: leading D student rows, from the teacher rows those read
        block = aligner.leading(min(s_ids.shape[1], self.max_dist_len))
        t_out = self.teacher.forward(t_ids, dist_rows=block.n_teacher)
        s_out = self.student.forward(s_ids, dist_rows=block.n_student)
        next_ids = torch.roll(t_ids, -1, 1)  # token predicted at each position (last one unused)
        confidence = next_token_stats(self.teacher.model, t_out["final"], next_ids)  # (1, T) each
        qmap = aligner.query_map.to(confidence["entropy"].device)
        row = {
            "text": text,
            "input_ids": s_ids[0].cpu().numpy().astype(np.int32),
            # "next": the teacher's next-token distribution (teacher_entropy is an attention statistic)
            "teacher_next_entropy": confidence["entropy"][0, qmap].cpu().numpy().astype(np.float32),
            "teacher_next_maxprob": confidence["maxprob"][0, qmap].cpu().numpy().astype(np.float32),
        }
        for name, value in t_out["stats"].items():
            row[f"teacher_{name}"] = f16(aligner.gather_query_stats(value))  # (Lt, Ht, S)
        for name, value in s_out["stats"].items():
            row[f"student_{name}"] = f16(value)  # (Ls, Hs, S)
        # the teacher's aligned rows: per injected layer (its mapped teacher layer), or per teacher layer (auto)
        targets = ({f"L{layer}": t for layer, t in zip(self.layers, self.teacher_layers)}
                   if self.teacher_layers is not None else {f"T{t}": t for t in sorted(t_out["head_mean"])})
        for suffix, t_layer in targets.items():
            row[f"teacher_dist_{suffix}"] = f16(block.align(t_out["head_mean"][t_layer]))  # (D, D)
            if self.per_head:  # every teacher head aligned: the head matching picks among them after the harvest
                row[f"teacher_heads_{suffix}"] = f16(block.align(t_out["heads"][t_layer]))  # (Ht, D, D)
        for layer in self.layers:
            row[f"hidden_L{layer}"] = f16(s_out["hidden"][layer])
            row[f"student_dist_L{layer}"] = f16(s_out["head_mean"][layer])  # (D, D)
            if self.per_head:
                row[f"student_heads_L{layer}"] = f16(s_out["heads"][layer])  # (Hs, D, D)
        diag = block.diagnostics  # over the aligned (stored) rows
        row["align_dropped_mass"] = float(diag["dropped_mass_mean"])
        row["align_self_fallback_rows"] = int(diag["self_fallback_rows"])
        row["teacher_len"] = int(t_ids.shape[1])
        covered = max(end for _, end in aligner.student_offsets)
        row["truncated_tokens"] = int(len(text[covered:].strip()) > 0)  # cut at max_length tokens
        # The teacher's own bits per byte on the same text, for the evaluation table.
        row["teacher_nll_sum"] = float(confidence["nll"][0, :-1].sum())
        row["teacher_bytes"] = predicted_bytes(text, aligner.teacher_offsets)
        return row


def f16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().astype(np.float16)


def row_is_finite(row: dict) -> bool:
    return all(np.isfinite(v).all() for v in row.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")
