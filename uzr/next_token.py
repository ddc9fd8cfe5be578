"""Next-token statistics from a causal LM's final hidden states, with the LM head applied in blocks.

The LM head of a small model with a big vocabulary dominates its cost and memory (Gemma 3 270M:
262,144 tokens x 640). Everything here runs over blocks of at most ``chunk`` token positions (flattened
over batch and sequence), so at most two ``(chunk, V)`` float32 tensors exist at once, whatever the batch.
"""

from __future__ import annotations

import torch

from uzr.attention.layers import decoder_of

CHUNK = 128  # token positions per LM-head block: (128, 262144) float32 is 128 MiB


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) final hidden states -> (..., V) float32 logits, with the model's final soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _blocks(hidden: torch.Tensor, chunk: int):
    """(start, (c, D) block) over the positions of ``hidden`` (..., D) flattened to (N, D)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    for start in range(0, flat.shape[0], chunk):
        yield start, flat[start:start + chunk]


@torch.no_grad()
def target_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None,
                    chunk: int = CHUNK) -> torch.Tensor:
    """log p(target) for each target: hidden (U, D) final states, targets (N,) token ids, rows (N,) the index
    of each target's state in ``hidden`` (None: ``arange(N)``, one state per target) -> (N,) float32. A state
    shared by several targets goes through the LM head once."""
    rows = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows
    out = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start, block in _blocks(hidden, chunk):
        logits = lm_head_logits(model, block)  # (c, V)
        lse = torch.logsumexp(logits, -1)  # (c,)
        sel = ((rows >= start) & (rows < start + block.shape[0])).nonzero()[:, 0]
        local = rows[sel] - start
        out[sel] = logits[local, targets[sel]] - lse[local]
    return out


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, S-1) the model's loss (nats) on tokens 1..S-1 of each row of ``ids`` (B, S); the LM head runs in blocks.
    Edits already attached to the model (an injector's) apply."""
    final = decoder_of(model)(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (B, S, D)
    logp = target_logprobs(model, final[:, :-1].reshape(-1, final.shape[-1]), ids[:, 1:].reshape(-1))  # (B*(S-1),)
    return -logp.reshape(ids.shape[0], -1)


@torch.no_grad()
def next_token_stats(model, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                     chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """Entropy (nats), max probability and, given targets, the negative log-likelihood per position.

    Args:
        hidden: (B, S, D) final (post-norm) hidden states.
        targets: (B, S) token id predicted at each position (e.g. ``input_ids`` shifted left), or None.
        chunk: positions per block (over B x S): at most two (chunk, V) float32 tensors live at once.
    Returns:
        dict of (B, S) float32: ``entropy``, ``maxprob`` and ``nll`` (if targets).
    """
    B, S = hidden.shape[:2]
    flat_targets = targets.reshape(-1) if targets is not None else None
    parts: dict[str, list[torch.Tensor]] = {"entropy": [], "maxprob": [], "nll": []}
    for start, block in _blocks(hidden, chunk):
        # log_softmax (not logits - logsumexp in place) keeps the harvest's stored numbers bit for bit; the
        # logits block is freed as soon as it returns
        logp = torch.log_softmax(lm_head_logits(model, block), -1)  # (c, V)
        if flat_targets is not None:
            parts["nll"].append(-logp.gather(-1, flat_targets[start:start + block.shape[0], None])[:, 0])
        probs = logp.exp()  # the second (c, V) block
        parts["maxprob"].append(probs.amax(-1))
        parts["entropy"].append(-probs.mul_(logp).sum(-1))
    return {name: torch.cat(values).reshape(B, S) for name, values in parts.items() if values}


@torch.no_grad()
def next_token_kl(teacher, teacher_final: torch.Tensor, student, student_final: torch.Tensor,
                  chunk: int = CHUNK) -> float:
    """Mean KL(teacher || student) of next-token distributions over positions (same vocabulary, same tokens).

    teacher_final, student_final: (..., D_t) and (..., D_s) final hidden states of the same positions."""
    total, count = 0.0, 0
    for (_, t_block), (_, s_block) in zip(_blocks(teacher_final, chunk), _blocks(student_final, chunk)):
        t = torch.log_softmax(lm_head_logits(teacher, t_block), -1)  # (c, V)
        s = torch.log_softmax(lm_head_logits(student, s_block), -1)
        s.sub_(t).neg_()  # t - s, in place: no third block
        total += float((t.exp_() * s).sum())
        count += t.shape[0]
    return total / count if count else float("nan")
