"""Markdown tables of the README from a run's metrics.json: ``python experiments/lru_mla_pretrained/tables.py RUN``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(r: dict, key: str = "estimate") -> str:
    return f"{r[key]:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] {r.get('verdict', '')}".strip()


def main(run: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    s = m["lru_mla_pretrained"]
    print("### conversion (bits per byte before training)\n")
    print("| latent | bits/byte | converted − original [95% paired] |\n|---|---|---|")
    for name, r in s["conversion"]["ranks"].items():
        d = r.get("minus_original")
        print(f"| {name} | {r['bits_per_byte']:.4f} | {ci(d) + ' ' + r['verdict'] if d else ''} |")
    groups = s["groups"]
    levels = [k for k in next(iter(groups.values()))["accuracy"] if k != "all"]
    print("\n### groups\n")
    print("| group | trainable | train wall / CPU s | eval wall / CPU s | final loss | before: exact / partial | "
          "exact all | partial all | bits/token | " + " | ".join(f"exact {lv}" for lv in levels) + " |")
    print("|" + "---|" * (9 + len(levels)))
    for g, r in groups.items():
        a = r["accuracy"]
        print(f"| {r['letter']} {g} | {r['trainable_parameters']:,} | {r['train_time']['seconds']:.0f} / "
              f"{r['train_time']['cpu_seconds']:.0f} | {r['eval_time']['seconds']:.0f} / {r['eval_time']['cpu_seconds']:.0f}"
              f" | {r['final_train_loss']:.3f} | {r['before_training']['exact']:.3f} / {r['before_training']['partial']:.3f}"
              f" | {a['all']['exact']:.3f} [{a['all']['low']:.3f}, {a['all']['high']:.3f}] | {a['all']['partial']:.3f} | "
              f"{a['all']['bits_per_token']:.3f} | " + " | ".join(
                  f"{a[lv]['exact']:.3f} [{a[lv]['low']:.3f}, {a[lv]['high']:.3f}]" for lv in levels) + " |")
    c = s["chance"]
    print(f"| chance (prompt-blind `{c['answer']}`) | | | | | | {c['all']['exact']:.3f} | {c['all']['partial']:.3f} | | "
          + " | ".join(f"{c[lv]['exact']:.3f}" for lv in levels) + " |")
    print("\npartial by level: " + "; ".join(
        f"{g} " + ", ".join(f"{r['accuracy'][lv]['partial']:.3f}" for lv in levels) for g, r in groups.items()))
    print("\n### paired (same items)\n")
    print("| pair | exact all | partial all | bits/token all | " + " | ".join(f"exact {lv}" for lv in levels) + " |")
    print("|" + "---|" * (4 + len(levels)))
    for pair, rows in s["paired"].items():
        print(f"| {pair} | {ci(rows['all']['exact'])} | {ci(s['paired_partial'][pair])} | "
              f"{ci(rows['all']['bits_per_token'])} | " + " | ".join(ci(rows[lv]["exact"]) for lv in levels) + " |")
    print("\n### iterations\n")
    print("| group | mean N all | " + " | ".join(levels) + " | rho(N, level) | convergence ratio | train N first→last |")
    print("|" + "---|" * (5 + len(levels)))
    for g, r in groups.items():
        for name, it in ((g, r), (f"{g} + KL exit", r.get("kl_exit"))):
            if not it or "iterations" not in it:
                continue
            rho = it["iterations_vs_level"]
            rho_text = f"{rho['rho']:+.3f} [{rho['low']:+.3f}, {rho['high']:+.3f}]" if rho.get("rho") is not None else "—"
            print(f"| {name} | {it['iterations']['all']:.2f} | " + " | ".join(f"{it['iterations'][lv]:.2f}" for lv in levels)
                  + f" | {rho_text} | {it['convergence_ratio']:.3f} | {r.get('train_iterations_first_last', '')} |")
        if "kl_exit" in r:
            k = r["kl_exit"]
            print(f"\nD with the KL exit: exact {k['accuracy']['all']['exact']:.3f}, partial {k['accuracy']['all']['partial']:.3f},"
                  f" minus ACT exact {ci(k['minus_act_exact'])}\n")
    f = s["fewshot"]
    shots = list(next(iter(f["groups"].values())))
    print("\n### few-shot (exact [95% Wilson] / partial)\n")
    print("| group | " + " | ".join(f"{k} shots" for k in shots) + " |\n|" + "---|" * (1 + len(shots)))
    for g, rows in f["groups"].items():
        print(f"| {g} | " + " | ".join(f"{rows[k]['exact']:.3f} [{rows[k]['low']:.2f}, {rows[k]['high']:.2f}] / "
                                       f"{rows[k]['partial']:.3f}" for k in shots) + " |")
    print("\npartial, k shots − 0 shots (same group, same items):\n")
    print("| group | " + " | ".join(f"{k}" for k in shots[1:]) + " |\n|" + "---|" * len(shots))
    for g, rows in f["versus_zero_shot"].items():
        print(f"| {g} | " + " | ".join(ci(rows[k]["partial"]) for k in shots[1:]) + " |")
    print("\npartial, between groups at each k:\n")
    print("| pair | " + " | ".join(shots) + " |\n|" + "---|" * (1 + len(shots)))
    for pair, rows in f["paired"].items():
        print(f"| {pair} | " + " | ".join(ci(rows[k]["partial"]) for k in shots) + " |")
    print(f"\nheld-out {s['heldout_items']} {s['heldout_per_level']}; train {s['train_items']}; tokens/item "
          f"{s['tokens_per_item']}; prefix {s['prefix_time']}; stage timing {m['timing']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
