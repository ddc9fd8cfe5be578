"""REINFORCE training of one SVF expert (the reference's ``optim_modules.Reinforce``), as a LightningModule.

A step takes ``prompts_per_step`` training prompts, samples ``samples_per_prompt`` answers from the
student with the current expert (temperature ``svf.temperature``; an SVF expert's weights materialised for the
sampling, :meth:`~uzr.adapters.svf.SVFTrainable.frozen`), scores each answer with the domain's
checker (``svf.reward``: ±1, or graded), and minimises ``-Σ r · log p(answer)`` over the samples divided by their
number (the reference: summed log-likelihood of the generated tokens times the reward, over the batch; with
``svf.baseline=prompt_mean`` ``r`` minus its prompt's mean reward, :func:`advantages`), plus
``kl_weight · KL(base || expert)`` summed over the answer tokens when ``kl_weight > 0`` (the reference's
``F.kl_div(log p_expert, log p_base, log_target=True, reduction="sum")``; off by default). Adam at
``svf.lr`` on ``z`` only; the Trainer clips the gradient norm at ``svf.clip``. The student's weights are
restored bit for bit after the sampling (an :class:`~uzr.adapters.svf.SVFEdit`), and the scoring adds the expert
through forward hooks (:class:`~uzr.adapters.svf.SVFTrainable`), so the gradient reaches ``z``.

An answer is what is checked: the sampled tokens up to the end of its first line (or end of sequence);
the log-likelihood covers exactly those tokens (prompt and answer are not re-tokenised, unlike the
reference, so the scored tokens are the sampled ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from transformers import StoppingCriteriaList

from uzr.adapters.svd import Decomposition
from uzr.adapters.svf import SVFTrainable, initial_z
from uzr.attention import decoder_of
from uzr.generation import LineStop
from uzr.masks import pad_sequences
from uzr.models import model_device
from uzr.next_token import lm_head_logits
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)


def _answer_length(tokenizer, ids: Sequence[int], stop_ids: set[int]) -> int:
    """Tokens of the answer: through the first stop token, or through the token that ends its first line."""
    for t, token in enumerate(ids):
        if token in stop_ids:
            return t + 1
        text = tokenizer.decode(ids[:t + 1], skip_special_tokens=True)
        if "\n" in text.lstrip():
            return t + 1
    return len(ids)


@torch.no_grad()
def sample_answers(model, tokenizer, texts: Sequence[str], samples: int, max_new_tokens: int, temperature: float = 1.0,
                   add_special_tokens: bool = True, greedy: bool = False
                   ) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """``samples`` sampled answers per text (plain sampling: no top-k / top-p), in text-major order;
    ``greedy``: the greedy answer instead (then ``samples`` must be 1).

    Returns ``(prompt ids, answer ids, answer text (first line, stripped))``, one entry per sample."""
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
                        ).to(model_device(model))
        how = (dict(do_sample=False, temperature=None, top_k=None, top_p=None) if greedy
               else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
        # every row stops at the end of its first line (all that is checked and scored): the step ends when the
        # last row's line does, not at max_new_tokens; a finished row's later draws are discarded, so the answers
        # are those of the unstopped run (later calls start from another RNG state: fewer steps drew)
        out = model.generate(**enc, **how, num_return_sequences=samples, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([LineStop(tokenizer, enc["input_ids"].shape[1])]))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    n_prompt = enc["input_ids"].shape[1]
    prompts, answers, decoded = [], [], []
    for row in range(out.shape[0]):
        source = row // samples
        ids = enc["input_ids"][source][enc["attention_mask"][source].bool()].tolist()
        new = out[row, n_prompt:].tolist()
        new = new[:max(_answer_length(tokenizer, new, stop_ids), 1)]
        prompts.append(ids)
        answers.append(new)
        decoded.append(tokenizer.decode(new, skip_special_tokens=True).strip().split("\n", 1)[0].strip())
    return prompts, answers, decoded


def answer_logprobs(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int = 0
                    ) -> tuple[Tensor, list[Tensor]]:
    """Summed log-probability of each answer after its prompt (N,), and the per-position log-softmax
    over the vocabulary at the answer tokens (one (n_i, V) tensor per sequence).

    Consecutive sequences with the same prompt (a REINFORCE step's samples of one prompt) share one pass over
    that prompt: its KV cache is repeated for every answer, so the prompt's tokens are run (and
    back-propagated) once per prompt instead of once per sample (:func:`_shared_prompt_logprobs`; equal to the
    padded full-sequence pass up to float rounding, ``tests/test_svf_reinforce.py``)."""
    runs = _prompt_runs(prompts)
    if all(end - start == 1 for start, end in runs):
        return _full_sequence_logprobs(model, prompts, answers, pad_id)
    totals, dists = [], []
    for start, end in runs:
        t, d = _shared_prompt_logprobs(model, prompts[start], answers[start:end], pad_id)
        totals.append(t)
        dists += d
    return torch.cat(totals), dists


def _prompt_runs(prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive identical prompts."""
    runs, start = [], 0
    for k in range(1, len(prompts) + 1):
        if k == len(prompts) or list(prompts[k]) != list(prompts[start]):
            runs.append((start, k))
            start = k
    return runs


def _full_sequence_logprobs(model, prompts, answers, pad_id: int) -> tuple[Tensor, list[Tensor]]:
    """Every prompt + answer as one right-padded batch (prompts that differ: nothing to share)."""
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
    ids, mask = pad_sequences(seqs, pad_id)  # right-padded
    device = model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, S, D)
    totals, dists = [], []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device)  # positions predicting the answer
        logp = torch.log_softmax(lm_head_logits(model, hidden[b, pos]).float(), -1)  # (n, V)
        totals.append(logp.gather(-1, ids[b, pos + 1][:, None]).sum())
        dists.append(logp)
    return torch.stack(totals), dists


def _shared_prompt_logprobs(model, prompt: Sequence[int], answers: Sequence[Sequence[int]], pad_id: int
                            ) -> tuple[Tensor, list[Tensor]]:
    """One prompt, N answers: the prompt runs once (1 row), its KV cache is repeated N times and the answers run
    right-padded on top of it. Gradients reach the prompt's pass through the repeated cache."""
    device = model_device(model)
    decoder = decoder_of(model)
    first = decoder(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
    cache = first.cache
    cache.batch_repeat_interleave(len(answers))
    ids, mask = pad_sequences(answers, pad_id)  # (N, A) right-padded
    ids, mask = ids.to(device), mask.to(device)
    full_mask = torch.cat([torch.ones(len(answers), len(prompt), dtype=torch.long, device=device), mask.long()], 1)
    hidden = decoder(input_ids=ids, attention_mask=full_mask, cache=cache, use_cache=True
                     ).last_hidden_state  # (N, A, D)
    last = first.last_hidden_state[0, -1:]  # (1, D): predicts every answer's first token
    totals, dists = [], []
    for b, a in enumerate(answers):
        h = torch.cat([last, hidden[b, :len(a) - 1]])  # (n, D): the states predicting answer tokens 0..n-1
        logp = torch.log_softmax(lm_head_logits(model, h).float(), -1)  # (n, V)
        totals.append(logp.gather(-1, ids[b, :len(a)][:, None]).sum())
        dists.append(logp)
    return torch.stack(totals), dists


def advantages(rewards: Tensor, samples: int, baseline: str = "none") -> Tensor:
    """What multiplies each sample's log-likelihood (N,), samples in text-major order (``samples`` per prompt).

    ``none``: the reward itself (the reference's REINFORCE). ``prompt_mean``: the reward minus the mean reward of
    its prompt's samples (a leave-nothing-out baseline, as in RLOO / GRPO without the scaling): a prompt whose
    samples all score the same contributes nothing, instead of pushing every sample down when all are wrong."""
    if baseline == "none":
        return rewards
    if baseline == "prompt_mean":
        per_prompt = rewards.reshape(-1, samples)
        return (per_prompt - per_prompt.mean(1, keepdim=True)).reshape(-1)
    raise ValueError(f"unknown baseline {baseline!r}; valid: none, prompt_mean")


class ReinforceModule(L.LightningModule):
    """Trains the ``z`` of one expert (or another trainable edit) with REINFORCE; the student (``model``) stays frozen and unregistered
    (it is neither moved nor saved in checkpoints: a checkpoint holds ``z`` and the optimiser state).

    ``texts``/``answers``: the formatted training prompts and their reference answers; ``reward_fn(prediction,
    answer) -> float`` (±1 from the domain's checker). Batches are lists of item indices.
    """

    def __init__(self, model, tokenizer, decomp: Decomposition | None, texts: Sequence[str], answers: Sequence[str],
                 reward_fn: Callable[[str, str], float], lr: float = 2e-3, kl_weight: float = 0.0,
                 samples_per_prompt: int = 4, max_new_tokens: int = 24, temperature: float = 1.0,
                 init_z: float = 0.1, add_special_tokens: bool = True, edit: nn.Module | None = None,
                 baseline: str = "none"):
        super().__init__()
        # the trained edit: an SVF expert's z (from ``decomp``), or any trainable ModelEdit module (``edit``: the
        # LoRA / IA3 baselines of uzr.adapters.peft_edit), trained by the same objective
        self.edit = edit if edit is not None else SVFTrainable(decomp, initial_z(decomp, init_z))
        object.__setattr__(self, "lm", model)  # not a submodule
        object.__setattr__(self, "tokenizer", tokenizer)
        self.texts, self.answers, self.reward_fn = list(texts), list(answers), reward_fn
        self.lr, self.kl_weight, self.samples = lr, kl_weight, samples_per_prompt
        self.max_new_tokens, self.temperature, self.add_special = max_new_tokens, temperature, add_special_tokens
        self.baseline = baseline  # none: the raw reward (the reference) | prompt_mean: minus its prompt's mean reward
        self.history: list[dict[str, float]] = []  # per step: mean reward, loss, kl

    def configure_optimizers(self):
        return torch.optim.Adam(self.edit.parameters(), lr=self.lr)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        items = [int(i) for i in batch]
        texts = [self.texts[i] for i in items]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.lm.eval()
        # sample from the current edit with its weights materialised when it can (SVF: no per-token hooks), then
        # score the samples through the differentiable edit
        sampler = self.edit.frozen() if hasattr(self.edit, "frozen") else self.edit
        clock = Stopwatch()
        with sampler.attach(self.lm):
            prompts, answers, decoded = sample_answers(self.lm, self.tokenizer, texts, self.samples, self.max_new_tokens,
                                                       self.temperature, self.add_special)
        sample_cpu = clock.read()["cpu_seconds"]
        with self.edit.attach(self.lm):
            logp, dists = answer_logprobs(self.lm, prompts, answers, pad)
        rewards = torch.tensor([self.reward_fn(text, self.answers[items[k // self.samples]])
                                for k, text in enumerate(decoded)], dtype=logp.dtype, device=logp.device)
        loss = -(advantages(rewards, self.samples, self.baseline) * logp).sum() / len(rewards)
        kl = torch.zeros((), device=logp.device)
        if self.kl_weight > 0:
            with torch.no_grad():
                _, base = answer_logprobs(self.lm, prompts, answers, pad)  # the plain student
            kl = sum(torch.sum(b.exp() * (b - d)) for b, d in zip(base, dists)) / len(rewards)
            loss = loss + self.kl_weight * kl
        self.history.append({"reward": float(rewards.mean()), "loss": float(loss.detach()), "kl": float(kl),
                             "sample_cpu_seconds": sample_cpu})
        log.info("reinforce step %d: mean reward %+.3f, loss %.4f; CPU s: sampling %.1f, scoring forward %.1f",
                 len(self.history), float(rewards.mean()), float(loss.detach()), sample_cpu,
                 clock.read()["cpu_seconds"] - sample_cpu)  # a step takes seconds to minutes on a CPU: say where the run is
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=len(items))
        self.log("train/loss", loss.detach(), batch_size=len(items))
        return loss

    def z(self) -> dict[str, Tensor]:
        return self.edit.z_dict()
