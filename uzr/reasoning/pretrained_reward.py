"""``lru_mla.objective=reward``: REINFORCE on a group's SFT-trained top with the causal-loop scorer's graded reward.

A step takes ``batch_size`` training prompts, samples ``reward_samples`` answers per prompt from the student with
the group's top (temperature ``reward_temperature``; the frozen lower layers run on the new tokens through their
KV cache, the top re-runs over the whole sequence), rewards each answer with ``2 * partial credit - 1``
(:func:`uzr.adapters.domains.reward`, ``graded``) and minimises ``-sum_i A_i log p(answer_i)`` over the samples
divided by their number, ``A`` from :func:`uzr.adapters.reinforce.advantages` (``reward_baseline``: the prompt's
mean reward by default) — the SVF experts' objective (:mod:`uzr.adapters.reinforce`) with the top as the trained
part. An answer is the sampled tokens through the first one holding a newline (at most the longest training
answer). AdamW at the SFT learning rates, no schedule, ``steps`` steps.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.nn import functional as F

from uzr.adapters.domains import reward
from uzr.adapters.reinforce import advantages
from uzr.reasoning.pretrained_items import TokenItems
from uzr.reasoning.pretrained_top import PretrainedTop
from uzr.reasoning.pretrained_training import answer_logits, batch_of

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_answers(lower, top: PretrainedTop, prompt: list[int], samples: int, max_new: int, temperature: float,
                   ends: set[int], generator: torch.Generator) -> tuple[Tensor, list[list[int]], list[Tensor]]:
    """``samples`` answers to one prompt: (the prompt's lower states (P, d), answers' ids, their lower states)."""
    top.eval()
    first = lower(input_ids=torch.tensor([prompt]), use_cache=True)
    cache = first.cache
    cache.batch_repeat_interleave(samples)
    states = first.last_hidden_state.float().expand(samples, -1, -1)  # (n, P, d)
    tokens = torch.zeros(samples, 0, dtype=torch.long)
    done = torch.zeros(samples, dtype=torch.bool)
    for _ in range(max_new):
        logits = top.logits(top(states).hidden[:, -1])  # (n, V)
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)  # (n, 1)
        tokens = torch.cat([tokens, nxt], 1)
        done |= torch.tensor([int(t) in ends for t in nxt[:, 0]])
        if bool(done.all()):
            break
        new = lower(input_ids=nxt, cache=cache, use_cache=True)
        cache = new.cache
        states = torch.cat([states, new.last_hidden_state.float()], 1)
    answers, answer_states = [], []
    P = len(prompt)
    for row in tokens.tolist():
        n = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
        answers.append(row[:n])
    for b, a in enumerate(answers):
        # the last answer token's own state is never needed (it predicts nothing that is scored)
        answer_states.append(states[b, P:P + len(a) - 1])
    return first.last_hidden_state[0].float(), answers, answer_states


def reinforce_step(top: PretrainedTop, lower, tokenizer, items: TokenItems, rows: list[int], spec,
                   generator: torch.Generator, ends: set[int], max_new: int) -> tuple[Tensor, dict]:
    """The REINFORCE loss of one step over ``rows`` (training item indices) and its log row."""
    p = spec.pretrained
    seqs, states, rewards = [], [], []
    for i in rows:
        prompt = items.ids[i][:items.answer_start[i]]
        prompt_states, answers, answer_states = sample_answers(lower, top, prompt, p.reward_samples, max_new,
                                                               p.reward_temperature, ends, generator)
        for a, s in zip(answers, answer_states):
            seqs.append(prompt + a)
            states.append(torch.cat([prompt_states, s, s.new_zeros(1, s.shape[-1])]))  # last token: unread
            rewards.append(reward("causal_loop", tokenizer.decode(a), items.answers[i], "graded"))
    starts = [items.answer_start[i] for i in rows for _ in range(p.reward_samples)]
    sampled = TokenItems(seqs, starts, [[len(s) - a] for s, a in zip(seqs, starts)], items.level[rows], [])
    top.train()
    hidden, mask, where, targets = batch_of(states, sampled, list(range(len(seqs))))
    logits, out = answer_logits(top, hidden, mask, where)
    token_logp = -F.cross_entropy(logits, targets, reduction="none")  # (N tokens,)
    owner = torch.repeat_interleave(torch.arange(len(seqs)),
                                    torch.tensor([len(s) - a for s, a in zip(seqs, sampled.answer_start)]))
    logp = torch.zeros(len(seqs)).index_add(0, owner, token_logp)  # (samples,) summed over each answer
    r = torch.tensor(rewards)
    loss = -(advantages(r, p.reward_samples, p.reward_baseline) * logp).sum() / len(seqs) + out.aux
    return loss, {"reward": float(r.mean()), "loss": float(loss.detach())}


def train_reward(top: PretrainedTop, lower, tokenizer, items: TokenItems, spec, seed: int) -> list[dict]:
    """``pretrained.reward_steps`` REINFORCE steps on ``top`` (in place); returns the per-step log."""
    p = spec.pretrained
    fresh = {id(q) for name, q in top.named_parameters() if ".refiner." in name}
    opt = torch.optim.AdamW([{"params": [q for q in top.parameters() if id(q) not in fresh], "lr": p.lr},
                             {"params": [q for q in top.parameters() if id(q) in fresh], "lr": p.lru_lr}],
                            weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=generator).tolist()
    ends = {t for t in range(len(tokenizer)) if "\n" in tokenizer.decode([t])}
    max_new = max(len(ids) - s for ids, s in zip(items.ids, items.answer_start))
    history = []
    for step in range(p.reward_steps):
        start = (step * p.batch_size) % len(order)
        rows = (order + order)[start:start + p.batch_size]
        loss, row = reinforce_step(top, lower, tokenizer, items, rows, spec, generator, ends, max_new)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(top.parameters(), 1.0)
        opt.step()
        history.append(row)
        log.info("lru_mla_pretrained reward step %d: mean reward %+.3f", step + 1, row["reward"])
    return history
