"""Text corpora for harvest and evaluation, as HF ``datasets`` splits, offline by default.

A corpus is described by a :class:`CorpusSpec` (a Hydra structured config) and loaded with
:func:`load_corpus`, which returns a :class:`Corpus`: a ``DatasetDict`` with splits ``train`` and
``heldout`` (columns ``text`` and ``source_id``) plus counts of what was skipped, truncated or
windowed on the way.

Every source goes through the same grouping: a document is a sequence of lines; blank
(empty or whitespace-only) lines separate paragraphs and are counted as ``skipped_empty``;
consecutive paragraphs of one document are merged (joined by a blank line) until the text holds at
least ``min_chars`` characters; a text longer than ``max_chars`` is truncated, or cut into
windows, at a whitespace boundary (``long_text``: ``truncate`` | ``window``). With ``long_text=tokens`` the
cut is by the student's tokens instead (:func:`token_windows`): a text longer than ``harvest.max_length``
student tokens becomes consecutive windows of at most that many tokens, cut after a paragraph break, else
after a sentence end, else after whitespace, else between tokens, into windows of about equal size; the
windows join back to the whole text
(the separator stays at the end of the window before the cut), so every byte is harvested and evaluated,
and ``max_chars`` plays no part. What is left of a document that never reaches ``min_chars`` is
dropped and counted as ``too_short``; exact duplicate texts are dropped and counted as ``duplicates``. Text is otherwise kept exactly as read (only the ends of each
text are stripped), so accents, emoji, CJK and right-to-left scripts round-trip unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from uzr.config.corpus import (  # noqa: F401  (re-exported)
    LONG_TEXT,
    PACKAGED,
    SOURCES,
    CorpusSpec,
    invalid,
    resolve_paths,
    source_paths,
    validate_corpus_spec,
)

log = logging.getLogger(__name__)

_NEWLINE = re.compile(r"\r\n|\r|\n")
_SPACE = re.compile(r"\s+")


class CorpusNotAvailableError(RuntimeError):
    """A hub corpus that cannot be loaded here (offline and not cached, or unknown)."""


@dataclass
class Corpus:
    """A loaded corpus: ``splits`` ("train", "heldout") and ``stats`` (counts from the grouping)."""

    splits: datasets.DatasetDict
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def train(self) -> datasets.Dataset:
        return self.splits["train"]

    @property
    def heldout(self) -> datasets.Dataset:
        return self.splits["heldout"]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8: byte {data[e.start]:#04x} at byte offset {e.start} ({e.reason})"
        ) from None


def _lines(text: str) -> list[str]:
    # Only \n, \r\n and \r end lines: str.splitlines() also splits on U+2028, U+0085 etc.,
    # which would change texts that contain them.
    return _NEWLINE.split(text)


def _pydoc_docs() -> Iterator[tuple[str, list[str]]]:
    from pydoc_data.topics import topics  # ships with CPython: always available offline

    for topic in sorted(topics):
        yield f"pydoc:{topic}", _lines(topics[topic])


def _text_file_docs(spec: CorpusSpec) -> Iterator[tuple[str, list[str]]]:
    for f in source_paths(spec):
        yield (f"packaged:{f.relative_to(PACKAGED)}" if spec.source == "packaged" else str(f)), _lines(_read_utf8(f))


def _jsonl_docs(path: str, text_field: str, stats: dict[str, int]) -> Iterator[tuple[str, list[str]]]:
    for f in resolve_paths(path):
        for n, line in enumerate(_lines(_read_utf8(f)), 1):
            if not line.strip():
                stats["skipped_empty"] += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{f}:{n}: line {n} has no field {text_field!r} (corpus.text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{f}:{n}: line {n} field {text_field!r} is {type(text).__name__}, not a string")
            yield f"{f}:{n}", _lines(text)


def _hub_docs(spec: CorpusSpec) -> Iterator[tuple[str, list[str]]]:
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), ...
        raise CorpusNotAvailableError(
            f"hub dataset {spec.hub_id!r} (config {spec.hub_config!r}, split {spec.hub_split!r}) is not "
            f"available: it is not in the local datasets cache and cannot be fetched offline "
            f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE). Use data=pydoc or a local file "
            f"(source=text_file or jsonl) instead. Cause: {type(e).__name__}: {e}"
        ) from e
    if spec.text_field not in ds.column_names:
        raise invalid("text_field", spec.text_field, f"{spec.hub_id!r} has columns {ds.column_names}")
    # Rows like wikitext's are lines of one long document (paragraphs separated by empty rows);
    # a trailing newline in a row is its line end, not an extra blank line.
    lines = [ln for row in ds[spec.text_field] for ln in _lines((row or "").removesuffix("\n"))]
    yield f"{spec.hub_id}", lines


# --------------------------------------------------------------------------- grouping


def _paragraphs(lines: Iterable[str], stats: dict[str, int]) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph) for each run of non-blank lines; blank lines are counted."""
    start, buf = 0, []
    for n, line in enumerate(lines, 1):
        if line.strip():
            if not buf:
                start = n
            buf.append(line)
        else:
            stats["skipped_empty"] += 1
            if buf:
                yield start, "\n".join(buf)
                buf = []
    if buf:
        yield start, "\n".join(buf)


def _cut(text: str, spec: CorpusSpec) -> int:
    """Where to cut ``text`` to at most max_chars: at the last whitespace, unless that leaves less
    than half of max_chars (or less than min_chars), e.g. text without spaces such as CJK."""
    floor = max(spec.min_chars, spec.max_chars // 2)
    last = None
    # Scan from 0, not from floor, so a match is a whole whitespace run and text[:start] ends in text.
    for last in _SPACE.finditer(text, 0, spec.max_chars + 1):  # noqa: B007 - want the last match
        pass
    return last.start() if last is not None and last.start() >= floor else spec.max_chars


def _cap(text: str, spec: CorpusSpec, stats: dict[str, int]) -> list[str]:
    """``text`` (>= min_chars) as one or more texts of at most max_chars, per ``spec.long_text``."""
    if len(text) <= spec.max_chars:
        return [text]
    if spec.long_text == "truncate":
        stats["truncated"] += 1
        return [text[: _cut(text, spec)].rstrip()]
    stats["windowed"] += 1
    pieces = []
    while text:
        i = _cut(text, spec) if len(text) > spec.max_chars else len(text)
        piece, text = text[:i].rstrip(), text[i:].lstrip()
        if len(piece) >= spec.min_chars:
            pieces.append(piece)
        else:  # only the final remainder can be this short
            stats["too_short"] += 1
    return pieces


# Where a window may end, best first: after a paragraph break, after a sentence end (Latin, CJK and Korean
# full stops, with closing quotes or brackets), after any whitespace.
_BOUNDARIES = (re.compile(r"\n[^\S\n]*\n\s*"), re.compile(r"[.!?\u3002\uff01\uff1f\u2026][\"'\u201d\u2019)\]]*\s+"),
               re.compile(r"\s+"))


def token_windows(text: str, tokenizer, max_tokens: int) -> list[str]:
    """``text`` as consecutive windows of at most ``max_tokens`` tokens of ``tokenizer`` (special tokens
    included, counted as the harvest counts them); ``"".join(windows) == text``.

    A text of ``R`` tokens aims at ``k = ceil(R / budget)`` windows of about ``R / k`` tokens each (no short
    remainder). Each cut is the paragraph break nearest that size between half of it and ``max_tokens``, else
    the nearest sentence end, else whitespace, else token boundary (text without spaces); a cut short of the
    aim may leave one window more. Every window is re-tokenised on its own to check its length.
    """
    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=True)["input_ids"])

    special = count("")
    budget = max(1, max_tokens - special)  # room left by BOS/EOS
    windows, start = [], 0
    while (total := count(text[start:]) - special) > budget:
        ends = [e + start for s, e in
                tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                if e > s]  # character end of each token
        k = -(-total // budget)
        target = -(-total // k)
        lo, hi, aim = ends[max(target // 2, 1) - 1], ends[min(budget, len(ends)) - 1], ends[target - 1]
        candidates = [sorted((m.end() for m in pattern.finditer(text, lo, hi + 1) if lo <= m.end() <= hi),
                             key=lambda c: abs(c - aim)) for pattern in _BOUNDARIES]
        candidates.append(sorted(set(ends[:budget]), key=lambda c: abs(c - aim)))  # token boundaries
        cut = next(c for group in candidates for c in group if c > start and count(text[start:c]) <= max_tokens)
        windows.append(text[start:cut])
        start = cut
    windows.append(text[start:])
    return windows


def _group(docs: Iterable[tuple[str, list[str]]], spec: CorpusSpec, stats: dict[str, int],
           cap: Callable[[str], list[str]]):
    """Merge each document's paragraphs into texts of at least min_chars, cut by ``cap``; yield (source_id, text)."""
    for doc, lines in docs:
        stats["documents"] += 1
        buf: list[str] = []
        start = 0
        for n, para in _paragraphs(lines, stats):
            stats["paragraphs"] += 1
            if not buf:
                start = n
            buf.append(para)
            text = "\n\n".join(buf).strip()
            if len(text) >= spec.min_chars:
                for k, piece in enumerate(cap(text)):
                    yield f"{doc}:{start}" + (f"+w{k}" if k else ""), piece
                buf = []
        if buf:  # the document ended before the last paragraphs reached min_chars
            stats["too_short"] += 1


# --------------------------------------------------------------------------- loading


def _capper(spec: CorpusSpec, stats: dict[str, int], tokenizer, max_tokens: int | None) -> Callable[[str], list[str]]:
    """How a grouped text is cut: by characters (truncate | window) or by student tokens (tokens)."""
    if spec.long_text != "tokens":
        return lambda text: _cap(text, spec, stats)
    if tokenizer is None or max_tokens is None or max_tokens < 2:
        raise invalid("long_text", spec.long_text, "'tokens' cuts texts by the student's tokens: load_corpus needs "
                      f"the student tokenizer and max_tokens >= 2 (harvest.max_length), got max_tokens={max_tokens}")

    def cap(text: str) -> list[str]:
        windows = token_windows(text, tokenizer, max_tokens)
        stats["windowed"] += len(windows) > 1
        return windows

    return cap


def load_run_corpus(spec: CorpusSpec, student_tokenizer: Callable[[], Any], max_tokens: int) -> Corpus:
    """:func:`load_corpus` for a run: ``student_tokenizer()`` is called only when ``long_text=tokens`` or
    ``source=prompts`` needs it."""
    needs = spec.long_text == "tokens" or spec.source == "prompts"
    return load_corpus(spec, student_tokenizer() if needs else None, max_tokens)


def _prompts_corpus(spec: CorpusSpec, tokenizer) -> Corpus:
    """``source=prompts``: the built-in prompt set as chat transcripts (:mod:`uzr.qa.transcripts`), split as the
    prompt set is (``seed``, ``heldout_fraction``); ``num_texts`` > 0 keeps a seeded sample of that many, in the
    same proportion from each side."""
    if tokenizer is None:
        raise invalid("source", spec.source, "'prompts' formats prompts in the student's chat template: load_corpus "
                      "needs the student tokenizer")
    from uzr.qa.transcripts import prompt_transcripts  # the prompt tables load only for this source

    sides = prompt_transcripts(tokenizer, spec.seed, spec.heldout_fraction)
    total = sum(len(v) for v in sides.values())
    rng = np.random.default_rng(spec.seed)
    features = datasets.Features({"text": datasets.Value("string"), "source_id": datasets.Value("string")})
    splits, stats = {}, {"documents": total, "available": total}
    for name, items in sides.items():
        keep = len(items) if not spec.num_texts else max(1, round(spec.num_texts * len(items) / total))
        chosen = sorted(rng.choice(len(items), min(keep, len(items)), replace=False))
        splits[name] = datasets.Dataset.from_dict({"text": [items[i][1] for i in chosen],
                                                   "source_id": [items[i][0] for i in chosen]}, features=features)
        stats[name] = len(chosen)
    stats["texts"] = stats["train"] + stats["heldout"]
    log.info("%s: %s", _describe(spec), stats)
    return Corpus(splits=datasets.DatasetDict(splits), stats=stats)


def _describe(spec: CorpusSpec) -> str:
    where = {"text_file": spec.path, "jsonl": spec.path, "hub": spec.hub_id, "pydoc": "pydoc_data.topics",
             "packaged": f"uzr/corpora/{spec.path}", "prompts": "uzr.qa.prompts as chat transcripts"}
    return f"corpus {spec.name!r} (source={spec.source}, {where[spec.source]})"


def load_corpus(spec: CorpusSpec | Mapping[str, Any], tokenizer=None, max_tokens: int | None = None) -> Corpus:
    """Load, group and split a corpus; deterministic given ``spec`` (including ``seed``).

    ``tokenizer`` and ``max_tokens`` (the student's tokenizer and ``harvest.max_length``) are needed, and
    used, only with ``long_text=tokens``.

    Texts are shuffled with ``numpy.random.default_rng(seed)``; the first ``num_texts`` (all if 0,
    or if fewer are available) are kept, of which ``round(heldout_fraction * n)`` (at least 1, and
    leaving at least 1 for training) form the ``heldout`` split. Raises ``ValueError`` for bad
    specs, unreadable files and corpora left empty by filtering, and ``CorpusNotAvailableError``
    for a hub dataset that is not cached while offline.
    """
    spec = validate_corpus_spec(spec)
    if spec.source == "prompts":
        return _prompts_corpus(spec, tokenizer)
    keys = ("documents", "paragraphs", "skipped_empty", "too_short", "truncated", "windowed", "duplicates")
    stats = dict.fromkeys(keys, 0)
    docs = {
        "pydoc": _pydoc_docs,
        "text_file": lambda: _text_file_docs(spec),
        "packaged": lambda: _text_file_docs(spec),
        "jsonl": lambda: _jsonl_docs(spec.path, spec.text_field, stats),
        "hub": lambda: _hub_docs(spec),
    }[spec.source]()
    ids, texts, seen = [], [], set()
    for source_id, text in _group(docs, spec, stats, _capper(spec, stats, tokenizer, max_tokens)):
        # Exact repeats are dropped: they would leak between train and heldout (pydoc topics
        # repeat whole sections, e.g. "compound" contains "with" and "function").
        if text in seen:
            stats["duplicates"] += 1
            continue
        seen.add(text)
        ids.append(source_id)
        texts.append(text)
    stats["available"] = len(texts)
    if len(texts) < 2:
        if stats["paragraphs"] == 0:
            why = f"it holds no non-blank text ({stats['skipped_empty']} empty or whitespace-only lines)"
        else:
            why = (f"{len(texts)} text(s) left from {stats['paragraphs']} paragraphs: {stats['too_short']} "
                   f"piece(s) shorter than min_chars={spec.min_chars} even after merging each document's "
                   f"paragraphs, {stats['duplicates']} exact duplicate(s)")
        raise ValueError(f"{_describe(spec)} is too small to split into train and heldout: {why}")

    order = np.random.default_rng(spec.seed).permutation(len(texts))
    n = min(spec.num_texts or len(texts), len(texts))
    if spec.num_texts > len(texts):
        log.warning("%s: asked for num_texts=%d, only %d available", _describe(spec), spec.num_texts, n)
    order = order[:n]
    n_held = min(max(1, round(spec.heldout_fraction * n)), n - 1)
    features = datasets.Features({"text": datasets.Value("string"), "source_id": datasets.Value("string")})

    def split(idx: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [texts[i] for i in idx], "source_id": [ids[i] for i in idx]}, features=features
        )

    splits = datasets.DatasetDict({"train": split(order[n_held:]), "heldout": split(order[:n_held])})
    stats.update(texts=n, train=n - n_held, heldout=n_held)
    log.info("%s: %s", _describe(spec), stats)
    return Corpus(splits=splits, stats=stats)
