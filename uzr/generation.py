"""Greedy generation with per-step entropy, optionally injected: shared by the gate, the live demo and every system."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from uzr.hooks import injected
from uzr.injection.injector import Injector
from uzr.models import model_device

if TYPE_CHECKING:
    pass

class _EntropyRecorder:
    """LogitsProcessor that records the next-token entropy (B,) of every decoding step."""

    def __init__(self):
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logp = torch.log_softmax(scores.float(), -1)
        self.steps.append(-(logp.exp() * logp).sum(-1).cpu())
        return scores


class LineStop:
    """StoppingCriteria: a sequence is done once its answer has text and then a line break."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([_line_done(t) for t in texts], device=input_ids.device)


def _line_done(text: str) -> bool:
    body = text.lstrip()
    return bool(body) and "\n" in body


def _clean_answer(text: str) -> str:
    return text.lstrip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate_answers(model, tokenizer, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                     injector: Injector | None = None, add_special_tokens: bool = True,
                     desc: str | None = None) -> list[dict]:
    """Greedy answers (first line, at most ``max_new_tokens`` tokens) with their mean next-token entropy.

    Returns one ``{"answer", "mean_entropy", "tokens", "content_tokens"}`` per text; the mean entropy
    covers the content tokens (the final end-of-turn / line-break step is left out). An ``injector``
    (attached here and removed afterwards) injects into the model while it answers; it then needs
    ``batch_size=1`` or a gate of shape (B, 1). ``desc``: label of a progress bar (with ETA) counting
    answered texts (None: no bar).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    eos_ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop_ids = {tokenizer.eos_token_id, *(eos_ids if isinstance(eos_ids, list) else [eos_ids])} - {None}
    results = []
    bar = tqdm(total=len(texts), desc=desc, unit="answer", dynamic_ncols=True, disable=desc is None)
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # e.g. GGUF tokenizers without a pad token: pad with EOS
            tokenizer.pad_token = tokenizer.eos_token
        pad = tokenizer.pad_token_id
        stop_ids.add(pad)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
                            ).to(model_device(model))
            n_prompt = enc["input_ids"].shape[1]
            recorder = _EntropyRecorder()
            with injected(model, injector):
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=StoppingCriteriaList([LineStop(tokenizer, n_prompt)]),
                    top_p=None, top_k=None, temperature=None,
                )
            new = out[:, n_prompt:].cpu()
            ents = torch.stack(recorder.steps, 1) if recorder.steps else torch.zeros(len(chunk), 0)  # (B, T)
            for b in range(len(chunk)):
                n, stopped = new.shape[1], False
                for t in range(new.shape[1]):
                    if int(new[b, t]) in stop_ids or _line_done(tokenizer.decode(new[b, :t + 1], skip_special_tokens=True)):
                        n, stopped = t + 1, True
                        break
                n = min(n, ents.shape[1])
                # The step that ends the answer (end of turn, or a line break) says "the answer is over",
                # not how sure the model is of it: the content steps alone give the mean entropy.
                last = tokenizer.decode(new[b, n - 1:n], skip_special_tokens=True) if n else ""
                content = n - 1 if stopped and n > 1 and not last.strip() else n
                text = tokenizer.decode(new[b, :n], skip_special_tokens=True)
                results.append({"answer": _clean_answer(text), "tokens": n, "content_tokens": content,
                                "mean_entropy": float(ents[b, :content].mean()) if content else 0.0})
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return results
