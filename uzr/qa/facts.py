"""Facts QA: is the right answer the most likely of its candidates?

The held-out answerable prompts of the built-in set (:mod:`uzr.qa.prompts`: capitals, chemical symbols,
authors, units, arithmetic, and the computed calendar / alphabet / numeral prompts of
:mod:`uzr.qa.checkable`; 203 at the default seed and split) each carry four candidate answers. A model gets a prompt right when the
correct candidate has the highest summed log-likelihood of its tokens after the formatted question
(teacher-forced, no generation). Scoring by likelihood keeps the metric free of answer parsing and
comparable between teacher, student and injected student.

Speed. A prompt is a few dozen tokens (the chat template's system turn alone is ~25 for SmolLM2) and its
candidates one to six more, so scoring one padded batch of four full sequences per prompt ran the same
prompt tokens four times (on the packaged pair it cost as much as a plain forward of every candidate
sequence), and on tiny models per-call overhead dominated. :func:`score_candidates` scores many prompts
per forward pass:

- the plain model (nothing injected or recorded: the sdpa path) shares prefixes through a KV cache —
  the tokens every sequence of the batch starts with (the chat template's system turn) run once, each
  prompt's own tokens once (its last state predicts every candidate's first token), then only the
  candidates' other input tokens per sequence; the LM head runs once per distinct state;
- an injected model shares them too, but never pads: the controller reads absolute positions off the cache
  index, so prompts of equal length run together and each pass continues its rows of both the KV cache and
  the injector's cached key features (:meth:`~uzr.injection.injector.Injector.for_rows`); on the packaged student this
  made injected facts QA about 5x faster than full right-padded sequences;
- any other edit (a weight edit, stored-row priors fixed to a batch, a gate per position, a sliding window
  the unpadded passes could cut differently) runs full sequences, right-padded, many prompts per batch.

The uninjected teacher and student are scored once per model and prompt set and kept in the artifact
cache (:func:`cached_plain_scores`), so the evaluate stage, the gate table and every job of a sweep read
one result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from uzr.attention import decoder_of
from uzr.config.keys import key_of
from uzr.hooks import ModelEdit, injected
from uzr.injection.injector import Injector, InjectorState
from uzr.masks import pad_sequences
from uzr.next_token import target_logprobs
from uzr.qa.prompts import (
    Prompt,
    PromptSet,
    adds_special_tokens,
    answer_prefix,
    format_prompt,
    resolve_format,
)

QA_SCORE = "summed log-likelihood of the answer tokens among 4 candidates"
QA_CACHE_VERSION = 1  # bump when the scores of the cached plain models change meaning


def qa_prompts(prompt_seed: int, heldout_fraction: float, limit: int = 0) -> list[Prompt]:
    """The held-out answerable prompts of the built-in set (the first ``limit`` of them; 0 = all)."""
    prompts = [p for p in PromptSet(prompt_seed, heldout_fraction).heldout if p.answerable]
    return prompts[:limit] if limit else prompts


@dataclass(frozen=True)
class CandidateRow:
    """One (prompt, candidate) sequence: its token ids and the indices of the tokens that are scored
    (each read from the logits at the index before it)."""

    ids: tuple[int, ...]
    scored: tuple[int, ...]


def candidate_rows(tokenizer, prompt_text: str, candidates: Sequence[str], prefix: str = " ",
                   add_special_tokens: bool = True) -> list[CandidateRow]:
    """Tokenise ``prompt_text + prefix + candidate`` for each candidate. A candidate's tokens are those whose
    characters end after the prompt, so a token that straddles the boundary counts."""
    rows = []
    for cand in candidates:
        enc = tokenizer(prompt_text + prefix + cand, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        scored = tuple(j for j, (s, e) in enumerate(offsets) if e > len(prompt_text) and e > s and j > 0)
        if not scored:
            raise ValueError(f"candidate {cand!r} has no tokens after the prompt")
        rows.append(CandidateRow(tuple(enc["input_ids"]), scored))
    return rows


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _window_may_bind(model, length: int) -> bool:
    """True if a sliding-window layer could cut a sequence of ``length`` padded positions: then padding may
    only sit before the first real token (left), where it never enters a real query's window."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    return bool(window) and length > window


class _States:
    """Final hidden states by (row, token index), wherever a pass left them."""

    def __init__(self):
        self.tails: dict[int, tuple[torch.Tensor, int]] = {}  # row -> ((L, D) states of its tokens start.., start)
        self.heads: dict[int, tuple[torch.Tensor, int]] = {}  # row -> ((D,) state, its token index)

    def get(self, row: int, index: int) -> torch.Tensor:
        head = self.heads.get(row)
        if head is not None and head[1] == index:
            return head[0]
        tail, start = self.tails[row]
        return tail[index - start]


def _plain_states(model, groups: Sequence[Sequence[CandidateRow]], pad_id: int) -> _States:
    """Final hidden states that predict every scored token, shared prefixes run once through a KV cache.

    (1) The tokens every row starts with, batch 1; (2) each prompt's tokens up to its candidates' first scored
    token, one row per prompt, left-padded after (1): its last column predicts that first token for every
    candidate; (3) each row's remaining input tokens (its last token is only a target) on its prompt's
    cache row, one pass per length (tails are 0-5 tokens: padding them to the longest doubled the work).
    Positions are passed explicitly, so padding never shifts rotary positions.
    """
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    rows = [r for group in groups for r in group]
    owner = [k for k, group in enumerate(groups) for _ in group]
    own = [min(common_prefix([r.ids for r in group]), min(r.scored[0] for r in group)) for group in groups]
    # (1) leaves every prompt at least one token of its own, so (2)'s last column is that prompt's state
    shared = max(0, min(common_prefix([r.ids for r in rows]), *(n - 1 for n in own)))
    if _window_may_bind(model, max(len(r.ids) for r in rows) + max(own)):
        shared = 0  # padding between the shared prefix and a prompt would move a sliding window
    states = _States()
    cache, past = DynamicCache(), []  # past: (P, ·) masks of what the cache holds, per prompt
    if shared:
        decoder(input_ids=torch.tensor([rows[0].ids[:shared]], device=device), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(groups))
        past.append(torch.ones(len(groups), shared, dtype=torch.long, device=device))
    parts = [group[0].ids[shared:n] for group, n in zip(groups, own)]
    width = max(len(p) for p in parts)
    if width:
        ids = torch.full((len(parts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(parts), width, dtype=torch.long, device=device)
        for k, part in enumerate(parts):
            if part:
                ids[k, width - len(part):] = torch.tensor(part, device=device)
                mask[k, width - len(part):] = 1
        past.append(mask)
        positions = shared + (mask.cumsum(1) - 1).clamp(min=0)  # (P, width)
        last = decoder(input_ids=ids, attention_mask=torch.cat(past, 1), position_ids=positions, cache=cache,
                       use_cache=True).last_hidden_state[:, -1]  # (P, D): left padding puts every prompt's last here
        for i, k in enumerate(owner):
            if parts[k]:
                states.heads[i] = (last[k], own[k] - 1)
    past_mask = torch.cat(past, 1) if past else None  # (P, shared + width)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if len(r.ids) - 1 > own[owner[i]]:
            by_length.setdefault(len(r.ids) - 1 - own[owner[i]], []).append(i)
    for length, members in sorted(by_length.items()):
        starts = [own[owner[i]] for i in members]
        ids = torch.tensor([rows[i].ids[s:s + length] for i, s in zip(members, starts)], device=device)  # (b, length)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        mask, rows_cache = torch.ones_like(ids), None
        if past_mask is not None:
            select = torch.tensor([owner[i] for i in members], device=device)
            rows_cache = _cache_rows(cache, select)
            mask = torch.cat([past_mask[select], mask], 1)
        final = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=rows_cache,
                        use_cache=False).last_hidden_state  # (b, length, D)
        for b, (i, s) in enumerate(zip(members, starts)):
            states.tails[i] = (final[b], s)
    return states


def _first_rows(groups: Sequence[Sequence[CandidateRow]]) -> np.ndarray:
    """(G,) index of each prompt's first row among all rows of ``groups`` in order."""
    return np.cumsum([0] + [len(g) for g in groups])[:-1]


def _cache_rows(cache: DynamicCache, select: torch.Tensor) -> DynamicCache:
    """A new cache holding batch rows ``select`` of ``cache`` (repeats allowed; ``cache`` is kept)."""
    out = DynamicCache()
    for layer in cache.layers:
        out.update(layer.keys[select], layer.values[select], len(out.layers))
    return out


def _edited_shared_states(model, groups: Sequence[Sequence[CandidateRow]], edit: Injector) -> _States:
    """Final hidden states under an injector, shared prefixes run once, without any padding.

    The controller reads absolute positions off the cache index, so sequences are never padded: (1) the tokens
    every row starts with, batch 1, when every row is injected alike on them (:meth:`Injector.rows_alike`: gate
    and prior); (2) each prompt's tokens up to its candidates' first scored token, prompts of equal length
    together; (3) each row's remaining input tokens on its prompt's rows of the KV cache and of the injector's key
    features (:meth:`Injector.for_rows`), rows of equal prompt and tail lengths together. Each pass gets a fresh injector for its rows.
    """
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    rows = [r for group in groups for r in group]
    first = _first_rows(groups)
    own = [min(common_prefix([r.ids for r in group]), min(r.scored[0] for r in group)) for group in groups]
    shared = max(0, min(common_prefix([r.ids for r in rows]), *(n - 1 for n in own)))
    shared = shared if edit.rows_alike(shared) else 0  # the gate or the prior differs between rows there
    states = _States()

    def run(view: Injector, ids: list[list[int]], start: int, cache: DynamicCache) -> tuple[torch.Tensor, InjectorState]:
        """(b, len, D) final states of ``ids`` at positions ``start``.., and the injector's state after them."""
        positions = torch.arange(start, start + len(ids[0]), device=device)[None].expand(len(ids), -1)
        with injected(model, view):
            final = decoder(input_ids=torch.tensor(ids, device=device), position_ids=positions, cache=cache,
                            use_cache=True).last_hidden_state
            return final, view.state()  # read before the injector is removed (removing resets it)

    base_cache, base_state = DynamicCache(), None
    if shared:
        _, base_state = run(edit.for_rows(torch.zeros(1, dtype=torch.long)), [rows[0].ids[:shared]], 0, base_cache)
    for n in sorted(set(own)):
        members = [k for k, m in enumerate(own) if m == n]  # prompts whose own tokens end at n
        zeros = torch.zeros(len(members), dtype=torch.long, device=device)
        cache = _cache_rows(base_cache, zeros) if shared else DynamicCache()
        view = edit.for_rows(torch.tensor(first[members]), base_state.rows(zeros) if shared else None)
        final, prompt_state = run(view, [groups[k][0].ids[shared:n] for k in members], shared, cache)
        last = final[:, -1]  # (P, D): each prompt's state before its first answer token
        by_tail: dict[int, list[tuple[int, int]]] = {}  # tail length -> (member index, row)
        for m, k in enumerate(members):
            for i in range(first[k], first[k] + len(groups[k])):
                states.heads[i] = (last[m], n - 1)
                if len(rows[i].ids) - 1 > n:
                    by_tail.setdefault(len(rows[i].ids) - 1 - n, []).append((m, i))
        for length, pairs in sorted(by_tail.items()):
            select = torch.tensor([m for m, _ in pairs], device=device)
            view = edit.for_rows(torch.tensor([i for _, i in pairs]), prompt_state.rows(select))
            final, _ = run(view, [rows[i].ids[n:n + length] for _, i in pairs], n, _cache_rows(cache, select))
            for b, (_, i) in enumerate(pairs):
                states.tails[i] = (final[b], n)
    return states


def _edited_states(model, rows: Sequence[CandidateRow], pad_id: int, edit: ModelEdit | None) -> _States:
    """Full right-padded sequences in one pass, with ``edit`` attached for it."""
    device = next(model.parameters()).device
    ids, mask = pad_sequences([r.ids for r in rows], pad_id)
    with injected(model, edit):
        final = decoder_of(model)(input_ids=ids.to(device), attention_mask=mask.to(device).long()).last_hidden_state
    states = _States()
    states.tails = {i: (final[i], 0) for i in range(len(rows))}
    return states


# Under an injector the shared path runs several unpadded passes per batch (one per prompt length, then one per
# tail length) instead of one: on models narrower than this the per-call overhead outweighs the tokens saved
# (smoke pair, hidden 64: 1.9 vs 0.8 CPU s for 203 prompts; SmolLM2-135M, hidden 576: 5.0 vs 25.6 s for 48).
SHARE_UNDER_EDIT_MIN_WIDTH = 256


def _shares_prefix(model, edit: ModelEdit, groups: Sequence[Sequence[CandidateRow]]) -> bool:
    """Whether ``edit`` lets a prompt's tokens run once for all its candidates: an injector whose prior and gate
    allow it (:attr:`Injector.continues_rows`), the same gate value on every row of a prompt, and no sliding
    window that the unpadded passes could cut differently from full sequences."""
    if not (isinstance(edit, Injector) and edit.continues_rows):
        return False
    if _window_may_bind(model, max(len(r.ids) for g in groups for r in g)):
        return False
    if edit.gate is None:
        return True
    first = np.repeat(_first_rows(groups), [len(g) for g in groups])  # (rows,) each row's prompt's first row
    return bool((edit.gate == edit.gate[torch.from_numpy(first).to(edit.gate.device)]).all())


@torch.no_grad()
def score_candidates(model, groups: Sequence[Sequence[CandidateRow]], pad_id: int,
                     edit: ModelEdit | None = None, share_prefix: bool | None = None) -> list[list[float]]:
    """Summed log-probability (nats) of each candidate's scored tokens, for a batch of prompts.

    Args:
        groups: per prompt, its candidate rows (:func:`candidate_rows`).
        edit: attached for the pass (e.g. an :class:`~uzr.injection.injector.Injector` built for ``sum(len(g))`` rows in
            order). An injector that can continue rows (:func:`_shares_prefix`) runs each prompt's tokens once
            (:func:`_edited_shared_states`); any other edit runs full right-padded sequences.
        share_prefix: run shared prefixes once through a KV cache where possible; False runs full right-padded
            sequences, the reference the shared paths are tested against; None (auto) shares for the plain model
            and, under an edit, for models of width >= :data:`SHARE_UNDER_EDIT_MIN_WIDTH`.
    Returns: per prompt, one score per candidate.

    The LM head (262k x 640 for Gemma 3) runs once per distinct hidden state: the state predicting a
    prompt's first answer token is usually common to its candidates (the same prompt tokens before it).
    """
    rows = [r for group in groups for r in group]
    first_row = np.repeat(_first_rows(groups), [len(g) for g in groups])  # (rows,) each row's prompt's first row
    # tokens to j - 1 shared with the group's first row, whose states stop before its last token (a target only):
    # a candidate that is a token prefix of another ("L" and "LI") shares all of its tokens
    common = [min(common_prefix([r.ids for r in group]), len(group[0].ids) - 1) for group in groups for _ in group]
    if share_prefix is None:  # auto: the plain model always; under an edit, models wide enough to gain
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        share_prefix = edit is None or config.hidden_size >= SHARE_UNDER_EDIT_MIN_WIDTH
    shared = share_prefix and (edit is None or _shares_prefix(model, edit, groups))
    if not shared:
        states = _edited_states(model, rows, pad_id, edit)
    elif edit is None:
        states = _plain_states(model, groups, pad_id)
    else:
        states = _edited_shared_states(model, groups, edit)
    keys: dict[tuple[int, int], int] = {}  # (row holding the state, token index) -> index into ``picked``
    picked, index, owners, targets = [], [], [], []
    for b, r in enumerate(rows):
        for j in r.scored:
            holder = int(first_row[b]) if shared and j - 1 < common[b] else b  # same tokens to j - 1: same state
            if (holder, j - 1) not in keys:
                keys[holder, j - 1] = len(picked)
                picked.append(states.get(holder, j - 1))
            index.append(keys[holder, j - 1])
            owners.append(b)
            targets.append(r.ids[j])
    device = picked[0].device
    logp = target_logprobs(model, torch.stack(picked), torch.tensor(targets, device=device),
                           torch.tensor(index, device=device))  # (N,) one per scored token
    sums = torch.zeros(len(rows), device=device).index_add_(0, torch.tensor(owners, device=device), logp).tolist()
    out, k = [], 0
    for group in groups:
        out.append(sums[k:k + len(group)])
        k += len(group)
    return out


def candidate_logprobs(model, tokenizer, prompt_text: str, candidates: Sequence[str], prefix: str = " ",
                       injector: ModelEdit | None = None, add_special_tokens: bool = True) -> list[float]:
    """Summed log-probability (nats) of each candidate's tokens after ``prompt_text + prefix`` (one prompt;
    see :func:`score_candidates`)."""
    rows = candidate_rows(tokenizer, prompt_text, candidates, prefix, add_special_tokens)
    return score_candidates(model, [rows], tokenizer.pad_token_id or 0, injector)[0]


def qa_scores(model, tokenizer, prompts: Sequence[Prompt], prompt_format: str = "auto",
              edit_for: Callable[[list[Prompt]], ModelEdit | None] | None = None, batch_size: int = 16,
              desc: str | None = None, share_prefix: bool | None = None) -> list[list[float]]:
    """Candidate scores of every prompt, ``batch_size`` prompts per forward pass.

    ``edit_for(row_prompts)``: a fresh edit for one batch, given the prompt of each of its rows in order
    (``len(candidates)`` rows per prompt, e.g. to give each row its prompt's gate value); None = the plain
    model. ``desc``: label of a progress bar counting prompts (None: no bar)."""
    style = resolve_format(tokenizer, prompt_format)
    prefix, special, pad_id = answer_prefix(style), adds_special_tokens(style), tokenizer.pad_token_id or 0
    groups = [candidate_rows(tokenizer, format_prompt(p.question, tokenizer, style), p.candidates, prefix, special)
              for p in prompts]
    # Prompts of similar length share a batch (less left padding of the prompt parts, less right padding of
    # full sequences under an edit); the scores go back to the prompts' order.
    order = sorted(range(len(prompts)), key=lambda i: (common_prefix([r.ids for r in groups[i]]), i))
    scores: list[list[float]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            edit = edit_for([prompts[i] for i in batch for _ in prompts[i].candidates]) if edit_for else None
            for i, s in zip(batch, score_candidates(model, [groups[i] for i in batch], pad_id, edit, share_prefix)):
                scores[i] = s
            bar.update(len(batch))
    return scores


def accuracy_of(prompts: Sequence[Prompt], scores: Sequence[Sequence[float]]) -> float | None:
    """Fraction of prompts whose correct candidate has the highest score; None for no prompts."""
    if not prompts:
        return None
    return sum(int(np.argmax(s)) == p.correct_index() for p, s in zip(prompts, scores)) / len(prompts)


def qa_accuracy(model, tokenizer, prompts: Sequence[Prompt], prompt_format: str = "auto",
                edit_for: Callable[[list[Prompt]], ModelEdit | None] | None = None, batch_size: int = 16,
                desc: str | None = None) -> float | None:
    """Fraction of ``prompts`` whose correct candidate scores highest; None for no prompts.

    ``prompt_format``: qa | chat | auto (see :func:`uzr.qa.prompts.resolve_format`); ``edit_for``: see
    :func:`qa_scores` (None = the plain model)."""
    prompts = list(prompts)
    return accuracy_of(prompts, qa_scores(model, tokenizer, prompts, prompt_format, edit_for, batch_size, desc))


def injected_qa_scores(run_memo: Callable | None, model, tokenizer, prompts: Sequence[Prompt], prompt_format: str,
                       make_edit: Callable[[list[Prompt]], ModelEdit | None], key: tuple, batch_size: int,
                       desc: str | None = None) -> list[list[float]]:
    """:func:`qa_scores` under an edit, once per run for ``key`` (e.g. the injection source, mode and alpha): the
    evaluate stage's injected student at a constant alpha is the gate table's ``constant@alpha`` row."""
    def compute() -> list[list[float]]:
        return qa_scores(model, tokenizer, prompts, prompt_format, make_edit, batch_size, desc)

    if run_memo is None:
        return compute()
    return run_memo(("facts_qa", "edited", *key, prompt_format, batch_size, tuple(p.id for p in prompts)), compute)


def injected_qa_accuracy(run_memo: Callable | None, model, tokenizer, prompts: Sequence[Prompt], prompt_format: str,
                         make_edit: Callable[[list[Prompt]], ModelEdit | None], key: tuple, batch_size: int,
                         desc: str | None = None) -> float | None:
    """The accuracy of :func:`injected_qa_scores`."""
    return accuracy_of(prompts, injected_qa_scores(run_memo, model, tokenizer, prompts, prompt_format, make_edit, key,
                                                   batch_size, desc))


def correct_of(prompts: Sequence[Prompt], scores: Sequence[Sequence[float]]) -> list[bool]:
    """Whether each prompt's correct candidate has the highest score (for paired comparisons)."""
    return [int(np.argmax(s)) == p.correct_index() for p, s in zip(prompts, scores)]


def cached_plain_scores(run, spec, model_and_tokenizer: Callable[[], tuple], prompts: Sequence[Prompt],
                        prompt_format: str, batch_size: int, desc: str | None = None) -> list[list[float]]:
    """Candidate scores of an uninjected model (``spec``: its :class:`~uzr.models.ModelSpec`), computed once per
    model, device (the run's), prompt set, format and batch size and kept in the artifact cache as
    ``facts_qa/<key>`` (``run``: a :class:`~uzr.runner.RunContext`); ``model_and_tokenizer()`` is called only to
    build it."""
    payload = {"model": key_of(spec, "facts_qa"), "device": run.cfg.device, "prompt_format": prompt_format,
               "batch_size": batch_size, "prompts": [[p.id, p.question, list(p.candidates)] for p in prompts]}

    def build(folder: Path) -> dict:
        model, tokenizer = model_and_tokenizer()
        scores = qa_scores(model, tokenizer, prompts, prompt_format, batch_size=batch_size, desc=desc)
        (folder / "scores.json").write_text(json.dumps({"ids": [p.id for p in prompts], "scores": scores}))
        return {"num_prompts": len(prompts)}

    folder, _ = run.artifact("facts_qa", payload, build, version=QA_CACHE_VERSION)
    return json.loads((folder / "scores.json").read_text())["scores"]


def plain_qa_scores(run, role: str) -> list[list[float]]:
    """Candidate scores of the uninjected ``role`` (``"student"`` or ``"teacher"``) on the run's held-out prompts
    (``run``: a :class:`uzr.runner.RunContext`): scored once per model and prompt set, kept in the artifact cache
    (:func:`cached_plain_scores`) and the run's memo, so the evaluate and gate stages and later runs report the
    same numbers for the same model."""
    cfg = run.cfg

    def score() -> list[list[float]]:
        prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
        if not prompts:
            return []
        return cached_plain_scores(run, getattr(cfg, role), lambda: run.models.get(role), prompts,
                                   cfg.gate.prompt_format, cfg.evaluate.qa_batch_size, desc=f"facts QA: {role}")

    return run.memo(("facts_qa", role), score)


def plain_qa_accuracy(run, role: str) -> float | None:
    """Facts-QA accuracy of the uninjected ``role`` (see :func:`plain_qa_scores`)."""
    cfg = run.cfg
    prompts = qa_prompts(cfg.gate.prompt_seed, cfg.gate.heldout_fraction, cfg.evaluate.qa_prompts)
    return accuracy_of(prompts, plain_qa_scores(run, role))
