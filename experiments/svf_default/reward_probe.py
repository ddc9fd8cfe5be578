"""The base student's REINFORCE reward distribution per domain, before any training (issue 15, part 1).

Samples ``--samples`` answers for each of ``--prompts`` training prompts per domain exactly as a REINFORCE step does
(``uzr.adapters.reinforce.sample_answers``, the experiment's prompt format and answer length) and prints, per
temperature, domain and reward kind (``binary`` ±1, ``graded`` = 2 * partial credit - 1): the mean reward, the
share of samples exactly right, the distinct reward values, and the share of prompts whose samples do not all
get the same reward (the prompts that carry a learning signal once rewards are compared within a prompt).

    PYTHONPATH=. .venv/bin/python experiments/svf_default/reward_probe.py --temperatures 1.0 0.7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from uzr.adapters.domains import DOMAINS, REWARDS, domain_items, reward
    from uzr.adapters.reinforce import sample_answers
    from uzr.adapters.stage import formatted
    from uzr.config.model import ModelSpec
    from uzr.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="write the summary and every sampled answer as JSON here")
    args = ap.parse_args()
    import yaml

    spec = ModelSpec(**yaml.safe_load(Path("conf/student/smollm2_135m.yaml").read_text()))
    model, tok = load_model(spec, cache_dir=args.cache_dir, role="student")
    summary, samples = {}, {}
    for temperature in args.temperatures:
        for domain in args.domains:
            torch.manual_seed(0)
            items = domain_items(domain, "train", args.prompts, 0)
            texts, special = formatted(tok, items, "auto")
            start = time.perf_counter()
            _, _, decoded = sample_answers(model, tok, texts, args.samples, args.max_new_tokens, temperature, special)
            seconds = time.perf_counter() - start
            samples[f"T={temperature} {domain}"] = [{"answer": items[k // args.samples].answer, "sample": text}
                                                    for k, text in enumerate(decoded)]
            for kind in REWARDS:
                r = np.array([reward(domain, text, items[k // args.samples].answer, kind)
                              for k, text in enumerate(decoded)]).reshape(len(items), args.samples)
                row = {"mean": round(float(r.mean()), 3), "exact": round(float((r == 1).mean()), 3),
                       "values": sorted({round(float(v), 3) for v in r.ravel()}),
                       "prompts_with_spread": round(float((r.std(1) > 0).mean()), 3), "seconds": round(seconds, 1)}
                summary[f"T={temperature} {domain} {kind}"] = row
                print(f"T={temperature} {domain:12s} {kind:7s} {json.dumps(row)}", flush=True)
            for k in range(0, len(decoded), args.samples):
                print(f"    {items[k // args.samples].answer!r:20s} <- {decoded[k][:90]!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "samples": samples}, f, indent=1)


if __name__ == "__main__":
    main()
