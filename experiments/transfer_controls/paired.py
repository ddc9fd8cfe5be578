"""Pair two runs' injected students on the same texts and prompts (e.g. ``inject.sinks=keep`` vs ``replace``).

Each run's ``metrics.json`` keeps its per-text losses (``evaluate.domains.<name>.per_text``) and per-prompt facts-QA
outcomes (``evaluate.facts_qa.correct``); this prints run A's injected student minus run B's with the paired
interval of :mod:`uzr.intervals` (bootstrap over texts; bootstrap + McNemar over prompts). The texts must be the
same (same store, same ``evaluate.num_texts``): the byte counts are checked.

    .venv/bin/python experiments/transfer_controls/paired.py RUN_A RUN_B [--domain pydoc]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from uzr.intervals import accuracy_difference, bits_per_byte_difference  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--domain", default="pydoc")
    args = parser.parse_args(argv)
    a, b = (json.loads((run / "metrics.json").read_text())["evaluate"] for run in (args.run_a, args.run_b))
    ta, tb = (m["domains"][args.domain]["per_text"] for m in (a, b))
    if ta["bytes"] != tb["bytes"]:
        raise SystemExit(f"the runs scored different texts of {args.domain} (byte counts differ)")
    bpb = bits_per_byte_difference(ta["nll_injected"], tb["nll_injected"], ta["bytes"])
    print(f"bits per byte, {args.domain}, injected A - injected B: {bpb.describe()} over {bpb.n} texts: "
          f"{bpb.verdict(higher_is_better=False)} (A {sum(ta['nll_injected']):.1f} nats, B {sum(tb['nll_injected']):.1f})")
    qa_a, qa_b = a.get("facts_qa") or {}, b.get("facts_qa") or {}
    if "correct" in qa_a and "correct" in qa_b:
        acc = accuracy_difference(qa_a["correct"]["injected"], qa_b["correct"]["injected"])
        print(f"facts QA, injected A - injected B: {acc.describe(3)} over {acc.n} prompts, McNemar p="
              f"{acc.p_value:.3f}: {acc.verdict(higher_is_better=True)}")


if __name__ == "__main__":
    main()
