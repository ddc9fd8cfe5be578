"""Where each model looks on attention-bound items: the answer's query's attention on the evidence span.

On an item with evidence (:attr:`uzr.qa.prompts.Prompt.evidence`: kv_retrieval's asked line, induction's last
repeated word and its successor) the deciding query is the last token the candidates share (the prompt's last token
for kv_retrieval; the end of the repeat for induction): its next-token prediction tells them apart. Of the
attention mass it puts on the passage (the marked span), the *evidence share* is the part on the evidence span, per
layer and head, averaged over items; ``uniform`` is the share that attention spread evenly over the passage's tokens
would give. A model that retrieves by attention has some head whose share is far above uniform. If the teacher has
such heads and the student does not, the teacher's rows carry the retrieval and injecting them could transfer it; if
the student has them too, its deficit is not where it looks (``evaluate.qa_evidence_mass``).

The mass comes from the :class:`~uzr.dominance.measure.GroupMass` reducer (the dominance stage's), one forward per
item and model with no map materialised; the injected student is measured under the run's QA edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from uzr.attention import LayerRecorder, attention_modules, recording
from uzr.dominance.groups import indicator, span_labels, special_flags
from uzr.dominance.measure import GroupMass
from uzr.hooks import ModelEdit, injected
from uzr.injection.emphasis import placed_spans
from uzr.qa.facts import candidate_rows, common_prefix
from uzr.qa.prompts import Prompt, adds_special_tokens, answer_prefix, format_prompt, resolve_format

EVIDENCE, REST = 0, 1  # key groups: the evidence span, the rest of the passage


def outside(spans: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of character ``spans`` not covered by ``holes`` (both lists of (start, end))."""
    out = []
    for a, b in spans:
        cut = a
        for h0, h1 in sorted(holes):
            if h1 <= cut or h0 >= b:
                continue
            if h0 > cut:
                out.append((cut, h0))
            cut = max(cut, h1)
        if cut < b:
            out.append((cut, b))
    return out


def evidence_labels(tokenizer, prompt: Prompt, style: str) -> tuple[list[int], np.ndarray]:
    """The token ids up to the deciding query and (S,) labels: ``EVIDENCE`` on the evidence span, ``REST`` on the rest
    of the marked passage, -1 elsewhere (question, template, special tokens, answer).

    The ids are the formatted prompt and the answer tokens every candidate shares (induction's repeat; none for
    kv_retrieval's codes), so the last one is the query whose next-token prediction tells the candidates apart."""
    text = format_prompt(prompt.question, tokenizer, style)
    rows = candidate_rows(tokenizer, text, prompt.candidates, answer_prefix(style), adds_special_tokens(style))
    shared = common_prefix([row.ids for row in rows])
    enc = tokenizer(text + answer_prefix(style) + prompt.candidates[0], add_special_tokens=adds_special_tokens(style),
                    return_offsets_mapping=True)
    spans = [placed_spans(text, prompt, group) for group in (prompt.evidence, outside(prompt.marked, prompt.evidence))]
    ids = enc["input_ids"][:shared]
    return ids, span_labels(enc["offset_mapping"][:shared], special_flags(ids, tokenizer), spans)


@torch.no_grad()
def last_query_mass(model, ids: Sequence[int], labels: np.ndarray, edit: ModelEdit | None = None,
                    block_size: int = 256) -> np.ndarray:
    """(L, H, 2) attention mass of the last token's query (the deciding query of :func:`evidence_labels`) on the
    evidence and the rest of the passage, every layer and head, from one forward of ``model.base_model`` (no LM head)
    under ``edit``."""
    device = next(model.parameters()).device
    groups = indicator(labels, 2).to(device)  # (1, S, 2)
    recorders = {i: LayerRecorder(reducers=[GroupMass(groups)], block_size=block_size)
                 for i in range(len(attention_modules(model)))}
    with recording(model, recorders), injected(model, edit):
        model.base_model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return torch.stack([r.take()[GroupMass.name][0, :, -1] for r in recorders.values()]).cpu().numpy()


def evidence_shares(model, tokenizer, prompts: Sequence[Prompt], prompt_format: str,
                    edit_for: Callable[[list[Prompt]], ModelEdit] | None = None, desc: str = "evidence") -> dict:
    """Mean evidence share per (layer, head) over ``prompts`` (those with evidence inside a larger passage) and the
    uniform share; see the module docstring. ``edit_for([prompt])``: the edit to measure under (None: the plain
    model)."""
    style = resolve_format(tokenizer, prompt_format)
    shares, uniform = [], []
    for prompt in tqdm(prompts, desc=desc, unit="prompt", leave=False):
        ids, labels = evidence_labels(tokenizer, prompt, style)
        n_evidence, n_rest = int((labels == EVIDENCE).sum()), int((labels == REST).sum())
        if not n_evidence or not n_rest:
            raise ValueError(f"prompt {prompt.id}: no tokens on its evidence ({n_evidence}) or on the rest of its "
                             f"passage ({n_rest}); the evidence share needs both")
        mass = last_query_mass(model, ids, labels, None if edit_for is None else edit_for([prompt]))  # (L, H, 2)
        shares.append(mass[..., EVIDENCE] / np.maximum(mass.sum(-1), 1e-12))
        uniform.append(n_evidence / (n_evidence + n_rest))
    share = np.mean(shares, axis=0)  # (L, H)
    best = np.unravel_index(int(np.argmax(share)), share.shape)
    return {"uniform": float(np.mean(uniform)), "n": len(prompts),
            "head_mean": [float(v) for v in share.mean(1)],  # per layer
            "best_head": [float(v) for v in share.max(1)],  # per layer
            "top": {"layer": int(best[0]), "head": int(best[1]), "share": float(share[best])},
            "per_head": share.round(4).tolist()}


def has_evidence(prompt: Prompt) -> bool:
    """Whether ``prompt``'s evidence is a strict part of its passage (context_override's is the whole passage)."""
    return bool(prompt.evidence) and bool(outside(prompt.marked, prompt.evidence))


def evidence_section(run, prompts: Sequence[Prompt], edit_for: Callable[[list[Prompt]], ModelEdit] | None) -> dict:
    """The ``evidence_mass`` of a QA domain's section: :func:`evidence_shares` of the teacher, the student and (with
    ``edit_for``, the run's QA edit) the injected student on the first ``evaluate.qa_evidence_items`` items that
    have evidence."""
    cfg = run.cfg
    chosen = [p for p in prompts if has_evidence(p)][:cfg.evaluate.qa_evidence_items]
    if not chosen:
        return {"note": "no item has evidence inside a larger passage (context_override's is the whole passage)"}
    models = {role: run.models.get(role) for role in ("teacher", "student")}
    out = {role: evidence_shares(model, tok, chosen, cfg.gate.prompt_format, desc=f"evidence: {role}")
           for role, (model, tok) in models.items()}
    if edit_for is not None:
        out["injected"] = evidence_shares(*models["student"], chosen, cfg.gate.prompt_format, edit_for,
                                          desc="evidence: injected")
    return out
