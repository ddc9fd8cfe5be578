"""Next-token statistics from a causal LM's final hidden states, with the LM head applied in chunks.

The LM head of a small model with a big vocabulary dominates its cost and memory (Gemma 3 270M:
262k tokens x 640); chunking over positions keeps the (chunk, V) logits small.
"""

from __future__ import annotations

import torch


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) final hidden states -> (..., V) float32 logits, with the model's final soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def next_token_stats(model, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                     chunk: int = 128) -> dict[str, torch.Tensor]:
    """Entropy (nats), max probability and, given targets, the negative log-likelihood per position.

    Args:
        hidden: (B, S, D) final (post-norm) hidden states.
        targets: (B, S) token id predicted at each position (e.g. ``input_ids`` shifted left), or None.
    Returns:
        dict of (B, S) float32: ``entropy``, ``maxprob`` and ``nll`` (if targets).
    """
    parts: dict[str, list[torch.Tensor]] = {"entropy": [], "maxprob": [], "nll": []}
    for start in range(0, hidden.shape[1], chunk):
        logp = torch.log_softmax(lm_head_logits(model, hidden[:, start:start + chunk]), -1)  # (B, c, V)
        probs = logp.exp()
        parts["entropy"].append(-(probs * logp).sum(-1))
        parts["maxprob"].append(probs.amax(-1))
        if targets is not None:
            parts["nll"].append(-logp.gather(-1, targets[:, start:start + chunk, None])[..., 0])
    return {name: torch.cat(values, 1) for name, values in parts.items() if values}
