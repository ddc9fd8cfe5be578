"""Token alignment: move a teacher attention distribution from the teacher's token grid onto the student's.

Teacher and student may tokenize the same text differently (DESIGN.md §4). Both are aligned to the
characters of the text through the fast tokenizers' offset mappings:

- **Spans.** Every non-special token owns a half-open span of the text in character units. Tokens that
  share characters (byte tokens of one character, which byte-level BPE gives identical offsets, or a
  byte-fallback run of several characters) form a *cluster*; the cluster's UTF-8 bytes are divided
  equally among its tokens in order, so the 4 byte tokens of an emoji own a quarter of it each, and a
  byte-fallback run gets one byte per token. Characters no token covers (offsets trimmed of
  whitespace) are given to the next token, so that no teacher mass is lost in the gaps.
- **Queries.** Student query ``k`` reads the teacher row of the teacher token whose span covers the
  end of student token ``k`` (its last character, or its last byte for a byte token): the teacher
  position that has just seen what student position ``k`` has seen. ``query_map`` is monotone.
- **Keys.** Teacher key ``j``'s mass goes to student key ``k`` in proportion to the fraction of ``j``'s
  span that overlaps ``k``'s span (``key_transfer``, shape ``(T, S)``; rows of non-special tokens sum to
  1 up to the characters the student does not cover).
- **Rows.** Keys after the query on the student grid are zeroed (causality) and each row is
  renormalised to sum to 1. The mass removed is reported as ``dropped_mass_mean``. A row left with
  no mass (only degenerate cases, such as a student BOS with no teacher BOS) puts all of its mass
  on itself and is counted in ``self_fallback_rows``.

Leading block. ``TokenAligner.leading(n)`` aligns only the first ``n`` student tokens, from the
teacher's leading ``teacher_rows(n)`` rows and keys: a harvest that stores the distributions of the
first ``n`` positions needs no more of the teacher's head-mean than that block.

Special-token policy. A *special* token is one with a zero-width span (start == end), e.g. BOS or an
attention-sink token. If both sequences start with a special token (both have BOS), teacher
position 0 maps to student position 0, as a query and as a key. Otherwise teacher specials carry no
characters, so their key mass is dropped and the rows renormalised (a teacher BOS sink is not
invented on the student side); student specials receive no key mass, and as queries they read the
teacher row of the previous student token (position 0: teacher position 0). Identical tokenizations
(same offsets and specials) give exactly the identity: ``align`` returns a copy of its input.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Sequence

import numpy as np
import torch

_EPS = 1e-9  # in characters; spans are multiples of at least 1/(4 * tokens per cluster), far above this
_TINY = 1e-9  # a row keeping less mass than this is degenerate and falls back to itself


def _spans(offsets: list[tuple[int, int]], special: list[bool], text: str | None) -> np.ndarray:
    """Continuous ``[start, end)`` of every token in character units, ``(N, 2)`` float64; specials ``(0, 0)``."""
    n_chars = max([e for (_, e), sp in zip(offsets, special) if not sp], default=0)
    nbytes = [len(c.encode("utf-8")) for c in text[:n_chars]] if text is not None else []
    nbytes += [1] * (n_chars - len(nbytes))  # without the text, every character counts as one byte
    char_bytes = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.float64)  # (n_chars + 1,)
    out = np.zeros((len(offsets), 2))
    idx = [k for k, sp in enumerate(special) if not sp]
    cursor, i = 0.0, 0
    while i < len(idx):
        (s, e), j = offsets[idx[i]], i + 1
        while j < len(idx) and offsets[idx[j]][0] < e:  # overlapping (e.g. identical) spans: one cluster
            s, e, j = min(s, offsets[idx[j]][0]), max(e, offsets[idx[j]][1]), j + 1
        b0, b1, m = char_bytes[s], char_bytes[e], j - i
        cuts = [b0 + (b1 - b0) * r / m for r in range(m + 1)]  # equal rationals give equal floats
        cuts[0] = min(cuts[0], cursor)  # uncovered characters before the cluster join its first token
        out[idx[i:j], 0], out[idx[i:j], 1] = cuts[:-1], cuts[1:]
        cursor, i = b1, j
    # bytes -> characters, linear inside each character (a 4-byte emoji's bytes sit at +0, +1/4, ...)
    return np.interp(out, char_bytes, np.arange(len(char_bytes), dtype=np.float64))


class TokenAligner:
    """Maps teacher attention rows ``(..., T, T)`` onto the student token grid ``(..., S, S)``.

    ``teacher_offsets`` / ``student_offsets``: ``(start, end)`` character offsets per token (as returned
    with ``return_offsets_mapping=True``). ``*_special``: optional boolean masks of special tokens;
    zero-width tokens are always special. ``text`` (optional) lets byte tokens be weighted by the UTF-8
    length of their characters. See the module docstring for the policy.
    """

    def __init__(
        self,
        teacher_offsets: Sequence[Sequence[int]],
        student_offsets: Sequence[Sequence[int]],
        teacher_special: Sequence[bool] | None = None,
        student_special: Sequence[bool] | None = None,
        text: str | None = None,
    ):
        t_off = [(int(a), int(b)) for a, b in teacher_offsets]
        s_off = [(int(a), int(b)) for a, b in student_offsets]
        t_sp = [a == b for a, b in t_off]
        s_sp = [a == b for a, b in s_off]
        if teacher_special is not None:
            t_sp = [z or bool(x) for z, x in zip(t_sp, teacher_special)]
        if student_special is not None:
            s_sp = [z or bool(x) for z, x in zip(s_sp, student_special)]
        self.n_teacher, self.n_student = len(t_off), len(s_off)
        self.teacher_offsets, self.student_offsets = t_off, s_off
        self.identity = t_off == s_off and t_sp == s_sp
        self.teacher_input_ids: torch.Tensor | None = None  # set by from_text
        self.student_input_ids: torch.Tensor | None = None
        # one (dropped mass, fallback rows, rows) per align call, left on its device until read
        self._stats: list[torch.Tensor] = []
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.identity:
            self.query_map = torch.arange(self.n_student)
            self.key_transfer = torch.eye(self.n_teacher)
            return
        ts, ss = _spans(t_off, t_sp, text), _spans(s_off, s_sp, text)  # (T, 2), (S, 2)
        both_bos = bool(t_sp and s_sp and t_sp[0] and s_sp[0])

        # Queries: the last teacher non-special token starting before the student token's end.
        t_real = [j for j in range(self.n_teacher) if not t_sp[j]]
        t_starts = [ts[j, 0] for j in t_real]
        qmap = []
        for k in range(self.n_student):
            if s_sp[k]:
                qmap.append(qmap[-1] if k > 0 else 0)
            else:
                pos = bisect.bisect_left(t_starts, ss[k, 1] - _EPS) - 1
                qmap.append(t_real[max(pos, 0)] if t_real else 0)
        self.query_map = torch.tensor(qmap, dtype=torch.long)  # (S,)

        # Keys: fraction of teacher token j's span overlapping student token k's span.
        overlap = np.minimum(ts[:, None, 1], ss[None, :, 1]) - np.maximum(ts[:, None, 0], ss[None, :, 0])
        width = ts[:, 1] - ts[:, 0]  # (T,), 0 for specials
        kt = np.clip(overlap, 0.0, None) / np.where(width > 0, width, 1.0)[:, None]  # (T, S)
        kt[np.asarray(t_sp, dtype=bool)] = 0.0
        kt[:, np.asarray(s_sp, dtype=bool)] = 0.0
        if both_bos:
            kt[0, 0] = 1.0
        self.key_transfer = torch.from_numpy(kt).float()  # (T, S)

    @classmethod
    def from_text(cls, text: str, teacher_tokenizer, student_tokenizer, max_length: int | None = None):
        """Tokenize ``text`` with both tokenizers (special tokens added) and align them.

        ``max_length`` truncates the student to that many tokens; the teacher is then cut after its
        last token that starts inside the characters the student still covers. The token ids actually
        aligned are kept as ``teacher_input_ids`` (T,) and ``student_input_ids`` (S,).
        """
        kw = {"add_special_tokens": True, "return_offsets_mapping": True}
        st = student_tokenizer(text, **kw)
        student_truncated = max_length is not None and len(st["input_ids"]) > max_length
        if student_truncated:
            st = student_tokenizer(text, truncation=True, max_length=max_length, **kw)
        te = teacher_tokenizer(text, **kw)
        t_ids, t_off = list(te["input_ids"]), [tuple(o) for o in te["offset_mapping"]]
        if student_truncated:
            covered = max([e for s, e in st["offset_mapping"] if e > s], default=0)
            n_lead = next((j for j, (s, e) in enumerate(t_off) if e > s), len(t_off))  # leading specials
            keep = max([j + 1 for j, (s, e) in enumerate(t_off) if e > s and s < covered], default=n_lead)
            t_ids, t_off = t_ids[:keep], t_off[:keep]
        aligner = cls(t_off, st["offset_mapping"], text=text)
        aligner.teacher_input_ids = torch.tensor(t_ids, dtype=torch.long)
        aligner.student_input_ids = torch.tensor(list(st["input_ids"]), dtype=torch.long)
        return aligner

    def teacher_rows(self, n: int) -> int:
        """Teacher rows (and keys) that the first ``n`` student rows read; all of them for ``n >= n_student``.

        ``query_map`` is monotone and teacher rows are causal, so student rows ``< n`` read teacher rows
        ``<= query_map[n - 1]`` whose mass lies on teacher keys ``<= query_map[n - 1]``.
        """
        return self.n_teacher if n >= self.n_student else int(self.query_map[n - 1]) + 1

    def leading(self, n: int) -> TokenAligner:
        """The aligner of the first ``n`` student tokens and the :meth:`teacher_rows` teacher tokens.

        Its ``align`` takes the leading ``(T', T')`` teacher block and gives the leading ``(n, n)`` block
        of the full alignment (student keys ``>= n`` lie after every kept row: causality drops them
        anyway). Its ``diagnostics`` count only those rows. ``n >= n_student`` gives ``self``.
        """
        if n >= self.n_student:
            return self
        t = self.teacher_rows(n)
        block = copy.copy(self)
        block.n_student, block.n_teacher = n, t
        block.student_offsets, block.teacher_offsets = self.student_offsets[:n], self.teacher_offsets[:t]
        block.query_map, block.key_transfer = self.query_map[:n], self.key_transfer[:t, :n]
        if self.teacher_input_ids is not None:
            block.teacher_input_ids, block.student_input_ids = self.teacher_input_ids[:t], self.student_input_ids[:n]
        block._stats, block._device_cache = [], {}
        return block

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.query_map.to(device), self.key_transfer.to(device))
        return self._device_cache[device]

    def align(self, teacher_probs: torch.Tensor) -> torch.Tensor:
        """``(..., T_q, T)`` teacher rows (causal distributions) -> ``(..., S, S)`` float32 student rows."""
        p = teacher_probs.float()
        if p.shape[-1] != self.n_teacher or p.shape[-2] < self.n_teacher:
            raise ValueError(f"teacher_probs {tuple(p.shape)} does not match {self.n_teacher} teacher tokens")
        rows_n = math.prod(p.shape[:-2]) * self.n_student
        if self.identity:
            self._stats.append(torch.tensor([0.0, 0.0, float(rows_n)]))
            return p.clone()
        qmap, kt = self._on(p.device)
        rows = p.index_select(-2, qmap)  # (..., S, T)
        out = (rows @ kt).tril_()  # (..., S, S); keys after the query are the student's future
        kept = out.sum(-1, keepdim=True)  # (..., S, 1)
        empty = kept <= _TINY
        out = torch.where(empty, 0.0, out / kept.clamp_min(_TINY))
        out.diagonal(dim1=-2, dim2=-1).add_(empty.squeeze(-1).to(out.dtype))  # degenerate row: self
        dropped = (rows.sum(-1) - kept.squeeze(-1)).sum()
        self._stats.append(torch.stack([dropped, empty.sum().to(dropped), dropped.new_tensor(rows_n)]))
        return out

    def gather_query_stats(self, teacher_stats: torch.Tensor) -> torch.Tensor:
        """``(..., T)`` per-position teacher statistics -> ``(..., S)`` at the mapped teacher queries."""
        if self.identity:
            return teacher_stats.clone()
        return teacher_stats.index_select(-1, self._on(teacher_stats.device)[0])

    @property
    def diagnostics(self) -> dict:
        """Sizes, identity flag, and row statistics accumulated over all ``align`` calls so far."""
        totals = torch.stack([x.cpu() for x in self._stats]).sum(0).tolist() if self._stats else [0.0] * 3
        dropped, fallback, rows = totals
        return {
            "n_student": self.n_student,
            "n_teacher": self.n_teacher,
            "dropped_mass_mean": dropped / rows if rows else 0.0,
            "self_fallback_rows": int(fallback),
            "identity": self.identity,
        }
