"""Bits per byte by token position on long texts (``evaluate.position_buckets``): does a model get worse, or better,
the further into a text it reads, and past its trained context (``max_position_embeddings``)?

**Texts.** Texts the controllers never trained on — the run's own data outside its train split (its held-out texts
and those beyond ``data.num_texts``), or every text of ``evaluate.position_data`` (a ``conf/data`` option or
``file:PATH``) — in document order (a document's pieces stay adjacent), joined by blank lines into
``evaluate.position_texts`` texts of ``position_buckets[-1]`` student tokens each (the join is cut at the end of
that token; re-tokenised on its own, a text may come out a token shorter or longer).

**Buckets** are the student's token positions ``[edges[i], edges[i+1])`` (the last bucket also takes any token past
the last edge). A student token's loss and bytes go to the bucket of its position. The teacher tokenises the same
text its own way: each teacher token goes to the bucket holding the character where it *ends* (the student token
that starts a bucket starts it at a character; a teacher token that straddles that character is counted where it
is completed). Each token predicts the bytes from the previous token's end to its own
(:func:`uzr.text_bytes.token_bytes`), so a bucket's bytes are a contiguous stretch of the text and the buckets'
bytes add up to the whole text's predicted bytes, for either tokenizer: total bits over total bytes of the buckets
is the whole text's bits per byte. Bits per byte of a bucket = its tokens' bits / their bytes.

**Settings**: teacher, student, and the injected student of the run's ``inject.source``: the controller reads the
student's own hidden states; the oracle (``teacher``) has no stored rows for these texts, so the teacher reads each
text live (:class:`~uzr.injection.oracle.TeacherPrior`); ``shuffled`` needs stored rows: not measured.
The paired interval of injected − student per bucket is over the texts (:func:`uzr.intervals.bits_per_byte_difference`).

No pass records attention. The plain passes use sdpa and the LM head in blocks (:mod:`uzr.next_token`); an injected
layer computes its attention and the controller's scores in query blocks (:mod:`uzr.attention.function`), so memory
grows about linearly with the length. The live oracle is the exception: it keeps the teacher's (H, T, T) rows of
each mapped layer and their aligned (1|H, S, S) rows, about 64 MiB per head and layer at 4,096 tokens in float32
(and 16 times that at 16k).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from uzr.config.corpus import domain_spec
from uzr.corpus import load_run_corpus
from uzr.evaluate.domains import evaluation_corpus
from uzr.evaluate.passes import student_pass
from uzr.hooks import ModelEdit
from uzr.intervals import bits_per_byte_difference
from uzr.next_token import token_nll
from uzr.text_bytes import token_bytes

SEPARATOR = "\n\n"  # between joined pieces: a paragraph break
_SOURCE_ID = re.compile(r"^(.*):(\d+)(?:\+w(\d+))?$")  # uzr.corpus ids: "<document>:<paragraph>[+w<window>]"


# --------------------------------------------------------------------------- buckets of one text


@dataclass
class BucketSums:
    """One model on one text, summed per bucket: (B,) arrays."""

    nll: np.ndarray  # nats
    bytes: np.ndarray  # predicted UTF-8 bytes
    tokens: np.ndarray  # predicted tokens

    def as_dict(self) -> dict:
        return {"nll": self.nll.tolist(), "bytes": self.bytes.tolist(), "tokens": self.tokens.tolist()}


def bucket_sums(nll: Sequence[float], offsets: Sequence[tuple[int, int]], text: str, buckets: np.ndarray,
                n_buckets: int) -> BucketSums:
    """Per bucket: the summed loss, predicted bytes and count of tokens 1..S-1 (``nll``: (S-1,) nats;
    ``offsets``: the S tokens' character spans; ``buckets``: (S-1,) bucket of each predicted token)."""
    nbytes = np.asarray(token_bytes(text, list(offsets))[1:], dtype=np.float64)
    return BucketSums(np.bincount(buckets, weights=np.asarray(nll, dtype=np.float64), minlength=n_buckets),
                      np.bincount(buckets, weights=nbytes, minlength=n_buckets).astype(np.int64),
                      np.bincount(buckets, minlength=n_buckets))


def position_buckets(n_tokens: int, edges: Sequence[int]) -> np.ndarray:
    """(S-1,) bucket of each predicted token position 1..S-1: ``i`` for ``edges[i] <= p < edges[i+1]``; a position
    past the last edge joins the last bucket."""
    positions = np.arange(1, n_tokens)
    return np.minimum(np.searchsorted(np.asarray(edges), positions, side="right") - 1, len(edges) - 2)


def edge_characters(offsets: Sequence[tuple[int, int]], edges: Sequence[int]) -> list[float]:
    """The character where each inner edge's student token starts (inf for an edge past the text's last token)."""
    return [offsets[e][0] if e < len(offsets) else math.inf for e in edges[1:-1]]


def buckets_by_end(offsets: Sequence[tuple[int, int]], characters: Sequence[float]) -> np.ndarray:
    """(T-1,) bucket of each predicted token 1..T-1 of another tokenisation of the text: the bucket holding the
    character where it ends (``characters``: :func:`edge_characters`; a token ending exactly at an edge's character
    is complete before the bucket the edge starts)."""
    ends = np.asarray([end for _, end in offsets[1:]], dtype=np.float64)
    return np.searchsorted(np.asarray(characters, dtype=np.float64), ends, side="left")


# --------------------------------------------------------------------------- long texts


def document_order(source_ids: Sequence[str]) -> list[int]:
    """Indices of ``source_ids`` (``uzr.corpus`` ids) sorted so that a document's pieces are adjacent and in order."""
    def key(index: int):
        match = _SOURCE_ID.match(source_ids[index])
        return (source_ids[index], 0, 0) if match is None else (match[1], int(match[2]), int(match[3] or 0))

    return sorted(range(len(source_ids)), key=key)


def long_texts(pieces: Iterable[str], tokenizer, length: int, count: int) -> list[str]:
    """Consecutive ``pieces`` joined by blank lines into at most ``count`` texts of ``length`` tokens (special
    tokens included), each cut at the end of its ``length``-th token; pieces left over are dropped."""
    out, joined, tokens = [], [], 0
    for piece in pieces:
        joined.append(piece)
        tokens += len(tokenizer(piece + SEPARATOR, add_special_tokens=False)["input_ids"])
        if tokens < length:
            continue
        text = SEPARATOR.join(joined)
        enc = tokenizer(text, truncation=True, max_length=length, return_offsets_mapping=True)
        out.append(text[:max(end for _, end in enc["offset_mapping"])])
        joined, tokens = [], 0
        if len(out) == count:
            break
    return out


def unseen_pieces(run) -> tuple[list[str], str]:
    """Texts of ``evaluate.position_data`` (the run's own data when empty, without its train split), in document
    order, and a description of where they come from."""
    cfg = run.cfg
    name = cfg.evaluate.position_data
    _, tokenizer = run.models.get("student")
    spec = domain_spec(name, "evaluate.position_data") if name else cfg.data
    if spec is None:
        raise ValueError("evaluate.position_buckets: this run has no data; name a text source in "
                         "evaluate.position_data (a conf/data option or file:PATH)")
    every = load_run_corpus(evaluation_corpus(spec, 0) if name else dataclasses.replace(spec, num_texts=0),
                            lambda: tokenizer, cfg.harvest.max_length).splits
    trained = set() if name else set(load_run_corpus(spec, lambda: tokenizer, cfg.harvest.max_length).train["text"])
    texts = [t for split in every.values() for t in split["text"]]
    ids = [i for split in every.values() for i in split["source_id"]]
    kept = [i for i in document_order(ids) if texts[i] not in trained]
    where = f"{name}: all texts" if name else f"{spec.name}: texts outside the run's train split"
    return [texts[i] for i in kept], where


# --------------------------------------------------------------------------- passes


def teacher_nll(teacher, ids: torch.Tensor) -> torch.Tensor:
    """(T-1,) the teacher's loss (nats) on tokens 1..T-1 of ``ids`` (1, T); the LM head runs in blocks."""
    return token_nll(teacher, ids.to(next(teacher.parameters()).device))[0]


def student_nll(student, ids: torch.Tensor, window: int, edit: ModelEdit | None) -> torch.Tensor:
    """(S-1,) the student's loss (nats) on tokens 1..S-1, edited by ``edit`` (None: plain); records no attention."""
    return student_pass(student, ids.to(next(student.parameters()).device), [], window, edit).nll


def score_positions(texts: Sequence[str], edges: Sequence[int], student, student_tok, teacher, teacher_tok,
                    window: int, edit: Callable[[], ModelEdit] | None) -> dict:
    """Per role (``teacher``, ``student``, ``injected`` when ``edit`` gives the injected student's fresh edit): one
    :class:`BucketSums` per text, and the wall-clock seconds each role took."""
    n = len(edges) - 1
    out: dict[str, list[BucketSums]] = {"teacher": [], "student": [], **({"injected": []} if edit else {})}
    seconds = dict.fromkeys(out, 0.0)
    for text in tqdm(texts, desc="evaluate position buckets", unit="text"):
        s_enc = student_tok(text, return_offsets_mapping=True)
        t_enc = teacher_tok(text, return_offsets_mapping=True)
        s_ids, t_ids = (torch.tensor([enc["input_ids"]]) for enc in (s_enc, t_enc))
        s_offsets, t_offsets = ([tuple(o) for o in enc["offset_mapping"]] for enc in (s_enc, t_enc))
        s_buckets = position_buckets(len(s_offsets), edges)
        t_buckets = buckets_by_end(t_offsets, edge_characters(s_offsets, edges))
        for role in out:
            start = time.perf_counter()
            if role == "teacher":
                nll, offsets, buckets = teacher_nll(teacher, t_ids), t_offsets, t_buckets
            else:
                edited = edit() if role == "injected" else None
                nll, offsets, buckets = student_nll(student, s_ids, window, edited), s_offsets, s_buckets
            out[role].append(bucket_sums(nll.double().cpu().numpy(), offsets, text, buckets, n))
            seconds[role] += time.perf_counter() - start
    return {"sums": out, "seconds": seconds}


# --------------------------------------------------------------------------- the section


def _bpb(nll: float, nbytes: float) -> float | None:
    return nll / (math.log(2) * nbytes) if nbytes else None


def bucket_label(low: int, high: int) -> str:
    return f"{low}-{high}"


def position_section(sums: dict[str, list[BucketSums]], edges: Sequence[int], student_context: int | None,
                     teacher_context: int | None) -> dict:
    """The ``position_buckets`` section of ``metrics.json`` from :func:`score_positions`' sums: per bucket the
    student's tokens and bytes, each role's bits per byte, teacher − student, and injected − student with its
    paired interval over texts; the whole texts' numbers; and per text the sums, for pairing runs afterwards."""
    roles = list(sums)
    buckets = {}
    for b, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        nll = {role: [s.nll[b] for s in sums[role]] for role in roles}
        nbytes = {role: [s.bytes[b] for s in sums[role]] for role in roles}
        bpb = {role: _bpb(sum(nll[role]), sum(nbytes[role])) for role in roles}
        entry = {"n_tokens": int(sum(s.tokens[b] for s in sums["student"])), "bytes": int(sum(nbytes["student"])),
                 "teacher_tokens": int(sum(s.tokens[b] for s in sums["teacher"])),
                 "teacher_bytes": int(sum(nbytes["teacher"])),
                 "beyond_student_context": bool(student_context is not None and high > student_context),
                 "bits_per_byte": bpb,
                 "teacher_minus_student": (None if None in (bpb["teacher"], bpb["student"])
                                           else bpb["teacher"] - bpb["student"])}
        if "injected" in roles and sum(nbytes["student"]):
            entry["injected_minus_student"] = _injected_minus_student(nll, nbytes["student"])
        buckets[bucket_label(low, high)] = entry
    whole = {role: _bpb(sum(float(s.nll.sum()) for s in sums[role]), sum(int(s.bytes.sum()) for s in sums[role]))
             for role in roles}
    return {"edges": list(edges), "num_texts": len(sums["student"]), "student_context": student_context,
            "teacher_context": teacher_context, "buckets": buckets, "whole_bits_per_byte": whole,
            "per_text": {role: [s.as_dict() for s in sums[role]] for role in roles}}


def _injected_minus_student(nll: dict[str, list[float]], nbytes: list[int]) -> dict:
    """Injected − student bits per byte of one bucket with its paired interval over the texts; one text has no
    interval (resampling one text gives its own value every time, a zero-width interval that would read as a
    difference)."""
    difference = bits_per_byte_difference(nll["injected"], nll["student"], nbytes)
    if difference.n < 2:
        return {"estimate": difference.estimate, "n": difference.n,
                "verdict": "no interval: one text (evaluate.position_texts >= 2 gives one)"}
    return {**difference.as_dict(), "verdict": difference.verdict(higher_is_better=False)}


def position_metrics(run, edit: Callable[[], ModelEdit] | None, note: str | None = None) -> dict:
    """``evaluate.position_buckets`` for the run: long texts (:func:`unseen_pieces`, :func:`long_texts`) scored by
    teacher, student and — when ``edit`` is given (a fresh edit of the injected student per text) — the injected
    student; ``note`` says why the injected student is not measured otherwise."""
    cfg = run.cfg
    ev = cfg.evaluate
    edges = list(ev.position_buckets)
    student, student_tok = run.models.get("student")
    teacher, teacher_tok = run.models.get("teacher")
    pieces, where = unseen_pieces(run)
    texts = long_texts(pieces, student_tok, edges[-1], ev.position_texts)
    if not texts:
        raise ValueError(f"evaluate.position_buckets={edges}: {where} hold fewer than {edges[-1]} student tokens; "
                         "lower the last edge or name a larger text source in evaluate.position_data")
    scored = score_positions(texts, edges, student, student_tok, teacher, teacher_tok, cfg.harvest.locality_window,
                             edit)
    section = position_section(scored["sums"], edges, _context(student), _context(teacher))
    section.update(texts=where, seconds=scored["seconds"])
    if edit is None:
        section["injected_note"] = note
    return section


def _context(model) -> int | None:
    """The model's trained context, ``max_position_embeddings`` of its (text) config."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)
