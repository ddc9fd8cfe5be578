"""Why the ablation sat at chance: one group trained on chosen levels with a plain loop, held-out accuracy by level
at four points of training (experiments/lru_mla/README.md, "Diagnosis").

    PYTHONPATH=. .venv/bin/python experiments/lru_mla/diagnose.py group=baseline steps=1200 'levels=[1]' \
        answer_order='"letter"'            # any LRUMLASpec field as JSON; digits=lsb writes numbers units first

Batches are drawn with replacement (seed 0) from the stage's training items; held-out items as the stage's.
One thread; prints CPU seconds.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import uzr.tasks.compact as compact
from uzr.config.lru_mla import LRUMLASpec
from uzr.reasoning.stage import HELDOUT_SEED_OFFSET
from uzr.reasoning.tiny_lm import build
from uzr.reasoning.training import evaluate, make_items, targets
from uzr.tasks.compact import PAD, CharCodec


def units_first(text: str) -> str:
    return re.sub(r"\d+", lambda m: m[0][::-1], text)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    args = dict(a.split("=", 1) for a in argv)
    group, steps, digits = args.pop("group", "baseline"), int(args.pop("steps", 1200)), args.pop("digits", "msb")
    spec = LRUMLASpec(**{k: json.loads(v) for k, v in args.items()})
    if digits == "lsb":  # numbers written units first, in prompt and answer (the scorer is not used here)
        prompt, answer = compact.compact_prompt, compact.compact_answer
        compact.compact_prompt = lambda p: units_first(prompt(p))
        compact.compact_answer = lambda a: units_first(answer(a))
    train, seen = make_items(spec, spec.train_items, 0)
    held, _ = make_items(spec, spec.eval_items, HELDOUT_SEED_OFFSET, exclude=seen)
    model = build(spec, group, CharCodec().vocab_size, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / max(1, steps - spec.warmup_steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(0)
    start, losses = time.process_time(), []
    for s in range(steps):
        idx = torch.randint(0, len(train.ids), (spec.batch_size,), generator=g).numpy()
        ids, sep = torch.from_numpy(train.ids[idx]), torch.from_numpy(train.sep[idx])
        model.train()
        out = model(ids, ids != PAD)
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets(ids, sep).flatten())
        opt.zero_grad()
        (loss + out.aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (s + 1) % (steps // 4) == 0:
            r = evaluate(model, held)
            exact, partial = np.array(r["exact"]), np.array(r["partial"])
            token = np.array(r["tokens_right"]) / np.array(r["tokens"])
            print(f"step {s + 1} loss {np.mean(losses[-100:]):.3f} cpu {time.process_time() - start:.0f}s | " + " ".join(
                f"L{lv}: exact {exact[held.level == lv].mean():.3f} partial {partial[held.level == lv].mean():.3f} "
                f"token {token[held.level == lv].mean():.3f}" for lv in np.unique(held.level)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
