"""The live teacher oracle: ``inject.source=teacher`` where no harvest row exists (facts QA, generation).

For held-out texts the oracle reads the harvest's stored rows (:mod:`uzr.evaluate.sources`). A facts-QA
candidate or a sequence being generated has no row, so :class:`TeacherPrior` lets the teacher read the
student's text itself: the student's token ids are decoded to text (special tokens left out, as zero-width
positions), the teacher tokenises that text and runs, and its attention at the mapped layers is aligned to the
student's tokens by the harvest's own :class:`~uzr.harvest.align.TokenAligner` — the same rows a harvest of
that text would store (float32 here, float16 there).

- **Whole sequences** (facts QA): one teacher pass per batch row, its full ``(T, T)`` rows aligned to the
  row's real tokens (right padding is read off the attention mask).
- **Generation** (a growing prefix): the teacher keeps its own KV cache and runs only the teacher tokens that
  the new text adds. When the new text re-tokenises earlier teacher tokens (a word the teacher spells as one
  token grows by a student token), the teacher re-runs the whole prefix with a fresh cache (cropping a cache
  is not uniform across transformers' layer kinds: sliding-window layers refuse it). Every query row is then
  aligned from the teacher's rows of the current text, so a row equals a whole-sequence pass's.

The prior needs the whole sequence's token ids (``needs_ids``). It sets ``continues_rows = False``: it cannot follow
a KV cache whose batch rows a caller rearranges (facts QA's prefix sharing); callers run full sequences for it.

Student text from ids: the non-special tokens are decoded; when the student tokenizer re-encodes that text to the
same ids, their offsets are used; otherwise (a non-canonical tokenisation, e.g. from greedy decoding) each
token's span is read off the growing decoded prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache

from uzr.attention import HeadRows, LayerRecorder, decoder_of, recording, use_uzr_attention
from uzr.harvest.align import TokenAligner
from uzr.injection.priors import AttentionPrior

ORACLE_FLOOR = 1e-6  # probability given to keys the aligned teacher row leaves at 0


def student_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]], list[bool]]:
    """The text the student's ``ids`` spell (specials left out), each token's character span, and which are
    special (zero-width)."""
    ids = [int(i) for i in ids]
    specials = set(tokenizer.all_special_ids)
    special = [i in specials for i in ids]
    plain = [i for i, sp in zip(ids, special) if not sp]
    text = tokenizer.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == plain:
        spans = iter([tuple(o) for o in enc["offset_mapping"]])
    else:  # non-canonical: the span of token k is what decoding it adds to the decoded prefix
        ends, end = [], 0
        for k in range(1, len(plain) + 1):
            end = max(end, len(tokenizer.decode(plain[:k], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)))
            ends.append(end)
        spans = iter(zip([0, *ends[:-1]], ends))
    out, last = [], 0
    for sp in special:
        if sp:
            out.append((last, last))
        else:
            out.append(next(spans))
            last = out[-1][1]
    return text, out, special


class _TeacherText:
    """The teacher reading one growing text: its token ids, KV cache and attention rows at the mapped layers."""

    def __init__(self):
        self.ids: list[int] = []
        self.cache = DynamicCache()
        self.rows: dict[int, torch.Tensor] = {}  # teacher layer -> (H, T, T) float32


class TeacherPrior(AttentionPrior):
    """``inject.source=teacher`` computed live: the teacher's aligned attention at the mapped layers.

    Args:
        teacher, teacher_tok, student_tok: the models' tokenizers must be fast (offsets).
        teacher_layers: ``{student layer: teacher layer}`` (the store's map).
        heads_of: per-head targets, ``{student layer: teacher head of each student head}``; None: head mean.
        floor: probability given to keys the aligned row leaves at 0 (as the stored oracle does).
    """

    continues_rows = False
    needs_ids = True

    def __init__(self, teacher, teacher_tok, student_tok, teacher_layers: Mapping[int, int],
                 heads_of: Mapping[int, Sequence[int]] | None = None, floor: float = 1e-6, block_size: int = 64):
        super().__init__(teacher_layers)
        self.teacher, self.teacher_tok, self.student_tok = teacher, teacher_tok, student_tok
        self.teacher_layers, self.heads_of = dict(teacher_layers), heads_of
        self.floor, self.block_size = floor, block_size
        self._texts: dict[int, _TeacherText] = {}  # batch row -> the teacher's state for it
        self._aligned: dict[tuple, dict[int, torch.Tensor]] = {}  # (row, student ids) -> {layer: (1|H, S, S) log}
        self.teacher_tokens_run = 0  # teacher positions computed (a cost: a pass per step would be sum of lengths)
        self.restarts = 0  # times re-tokenisation sent the teacher back to the start
        self._real: torch.Tensor | None = None  # (B|1, seen) real (unpadded) positions of the current sequences
        use_uzr_attention(teacher)

    # --- the teacher's pass -----------------------------------------------------------------
    @torch.no_grad()
    def _teacher_rows(self, state: _TeacherText, t_ids: list[int]) -> dict[int, torch.Tensor]:
        """Advance ``state`` to the teacher tokens ``t_ids``: run only what its cache lacks (from scratch when
        earlier tokens changed). Returns {teacher layer: (H, T, T)}."""
        common = 0
        for a, b in zip(state.ids, t_ids):
            if a != b:
                break
            common += 1
        if common < len(state.ids):  # earlier teacher tokens were re-tokenised: restart
            state.__init__()
            self.restarts += 1
        new = t_ids[len(state.ids):]
        if new:
            layers = sorted(set(self.teacher_layers.values()))
            recorders = {t: LayerRecorder(block_size=self.block_size, reducers=[HeadRows()]) for t in layers}
            device = next(self.teacher.parameters()).device
            with recording(self.teacher, recorders):
                decoder_of(self.teacher)(input_ids=torch.tensor([new], device=device), cache=state.cache,
                                         use_cache=True)
            fresh = {t: recorders[t].take()["heads"][0].float() for t in layers}  # (H, n, k)
            total = len(t_ids)
            for t, part in fresh.items():
                rows = torch.zeros(part.shape[0], total, total, device=part.device)
                if t in state.rows:
                    old = state.rows[t]
                    rows[:, :old.shape[1], :old.shape[2]] = old
                # a sliding-window layer's cache holds only its window: its keys are the last ones
                rows[:, total - part.shape[1]:, total - part.shape[2]:] = part
                state.rows[t] = rows
            state.ids = list(t_ids)
            self.teacher_tokens_run += len(new)
        return state.rows

    def _aligned_rows(self, row: int, ids: list[int]) -> dict[int, torch.Tensor]:
        """{student layer: (1|H, S, S) floored log-probabilities} of the teacher on the text of ``ids``."""
        key = (row, tuple(ids))
        if key not in self._aligned:
            text, spans, special = student_spans(self.student_tok, ids)
            enc = self.teacher_tok(text, add_special_tokens=True, return_offsets_mapping=True)
            aligner = TokenAligner([tuple(o) for o in enc["offset_mapping"]], spans, student_special=special, text=text)
            rows = self._teacher_rows(self._texts.setdefault(row, _TeacherText()), list(enc["input_ids"]))
            out = {}
            for layer, t in self.teacher_layers.items():
                # the head mean is aligned as the harvest aligns it (renormalising rows does not commute with the mean)
                chosen = (aligner.align(rows[t].mean(0, keepdim=True)) if self.heads_of is None
                          else aligner.align(rows[t])[list(self.heads_of[layer])])  # (1|H_s, S, S)
                out[layer] = chosen.clamp_min(self.floor).log()
            self._aligned = {k: v for k, v in self._aligned.items() if k[0] != row}  # only the newest per row
            self._aligned[key] = out
        return self._aligned[key]

    # --- the prior ----------------------------------------------------------------------------
    def scores(self, layer, call, keys):
        if call.ids is None:
            raise ValueError("inject.source=teacher (live): the injector must hand the prior the token ids")
        seen = call.ids.shape[1]
        real = self._real_tokens(call)  # (B|1, seen)
        out = []
        for b in range(call.ids.shape[0]):
            where = real[min(b, real.shape[0] - 1)].nonzero()[:, 0]  # (n,) positions of the row's real tokens
            rows = self._aligned_rows(b, call.ids[b, where].tolist())[layer].to(call.hidden.device)  # (P, n, n)
            padded = rows.new_zeros(rows.shape[0], seen, seen)
            padded[:, where[:, None], where[None, :]] = rows
            out.append(padded[:, call.q_pos][..., call.k_pos])
        return torch.stack(out)  # (B, 1|H, q, k)

    def _real_tokens(self, call) -> torch.Tensor:
        """(B|1, seen) bool: which positions hold real tokens. A whole-sequence call reads padding (left or right)
        off the mask (a padded key is allowed to no query); a decoding call extends the last one's with its new,
        real, tokens."""
        seen = call.ids.shape[1]
        if call.q_pos.numel() == seen and call.k_pos.numel() == seen:
            self._real = call.allowed.any(-2)
        else:
            known = getattr(self, "_real", None)
            known = known if known is not None and known.shape[1] <= seen else None
            new = torch.ones(1 if known is None else known.shape[0], seen - (0 if known is None else known.shape[1]),
                             dtype=torch.bool, device=call.ids.device)
            self._real = new if known is None else torch.cat([known, new], 1)
        return self._real


def run_teacher_prior(run, layout, layers: Sequence[int], heads_of: Mapping[int, Sequence[int]] | None) -> TeacherPrior:
    """The run's teacher oracle for texts without store rows (QA prompts): the teacher reads each text itself, at the
    harvest store's layer map (``layout``: its layout, so ``teacher_layers=auto`` holds) and head matching."""
    teacher, teacher_tok = run.models.get("teacher")
    _, student_tok = run.models.get("student")
    mapping = dict(zip(layout.layers, layout.teacher_layers))
    return TeacherPrior(teacher, teacher_tok, student_tok, {layer: mapping[layer] for layer in layers}, heads_of,
                        ORACLE_FLOOR, run.cfg.harvest.block_size)
