"""Tables and the learning-curve figure of experiments/adaptation from the runs' metrics.json.

    python experiments/adaptation/collect.py PAIR=RUN_GLOB [PAIR=RUN_GLOB ...]

e.g. ``real='outputs/multirun/*/*adapt*/metrics.json'``: every run of a pair (one arm each; the control arm's
scores come with every run). Prints the markdown tables of the README and writes ``curves.png`` beside this file.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LI_ET_AL = {"scratch": 83.0, "fine-tune": 85.6, "attention copy": 85.1, "attention distillation": 85.7}


CHOSEN_LR = 3e-3  # adapt.lr's default: the arms' learning rate


def runs(pattern: str) -> dict[str, dict]:
    """{arm: adapt section} of the runs matching ``pattern`` (the last run of an arm wins); a run at another learning
    rate than the chosen one (the learning-rate sweep) is labelled with it."""
    out = {}
    for path in sorted(glob.glob(pattern)):
        metrics = json.loads(Path(path).read_text())
        if "adapt" not in metrics:
            continue
        lr = float(yaml.safe_load((Path(path).parent / "config.yaml").read_text())["adapt"]["lr"])
        arm = metrics["adapt"]["arm"] + ("" if lr == CHOSEN_LR else f" (lr {lr:g})")
        out[arm] = {**metrics["adapt"], "timing": metrics.get("timing", {}).get("adapt")}
    return out


def interval(d: dict | None) -> str:
    if not d:
        return "—"
    verdict = "" if d["verdict"] == "no difference" else f" **{d['verdict']}**"
    return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{verdict}"


def text_rows(pair: str, arms: dict[str, dict], domain: str) -> list[str]:
    rows = []
    for arm, section in arms.items():
        bpb = section["domains"][domain]["bits_per_byte"]
        rows.append(f"| {pair} | {arm} | {bpb['student']:.4f} | {bpb.get('control', bpb['adapted']):.4f} | "
                    f"{bpb['adapted']:.4f} | {bpb['teacher']:.4f} | {interval(bpb.get('adapted_minus_control'))} | "
                    f"{interval(bpb.get('adapted_minus_student') if 'control' in bpb else None)} | "
                    f"{interval(bpb.get('control_minus_student') or bpb.get('adapted_minus_student'))} |")
    return rows


def qa_rows(pair: str, arms: dict[str, dict], name: str, pick) -> list[str]:
    rows = []
    for arm, section in arms.items():
        qa = pick(section)
        if not isinstance(qa, dict) or "student" not in qa:
            continue
        control = qa.get("control", qa.get("adapted"))
        adapted = qa.get("adapted") if "control" in qa else None
        rows.append(f"| {pair} | {name} | {arm} | {qa['num_prompts']} | {qa['student']:.3f} | {control:.3f} | "
                    f"{'—' if adapted is None else f'{adapted:.3f}'} | {qa['teacher']:.3f} | "
                    f"{interval(qa.get('adapted_minus_control'))} | "
                    f"{interval(qa.get('control_minus_student') or qa.get('adapted_minus_student'))} |")
    return rows


def time_rows(pair: str, arms: dict[str, dict]) -> list[str]:
    rows = []
    for arm, section in arms.items():
        t = section["training"]["adapted"]
        stage = section.get("timing") or {}
        rows.append(f"| {pair} | {arm} | {t['steps']} | {t['seconds']:.0f} | {t['cpu_seconds']:.0f} | "
                    f"{stage.get('wall_s', 0):.0f} | {stage.get('cpu_s', 0):.0f} |")
    return rows


def shares(pair: str, arms: dict[str, dict], domain: str) -> list[str]:
    """Each arm's gain over the frozen student as a share of the control arm's gain (Li et al.'s fine-tune gap) and,
    where the teacher is ahead, of the student-to-teacher gap."""
    rows = []
    for arm, section in arms.items():
        bpb = section["domains"][domain]["bits_per_byte"]
        student, control, adapted, teacher = bpb["student"], bpb.get("control", bpb["adapted"]), bpb["adapted"], \
            bpb["teacher"]
        control_gain = student - control
        of_control = f"{(student - adapted) / control_gain * 100:.0f} %" if control_gain > 0 else "—"
        of_teacher = f"{(student - adapted) / (student - teacher) * 100:.0f} %" if student > teacher else "— (teacher behind)"
        rows.append(f"| {pair} | {arm} | {of_control} | {of_teacher} |")
    return rows


def figure(pairs: dict[str, dict[str, dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (pair, arms) in zip(axes[0], pairs.items()):
        plotted = set()
        for arm, section in arms.items():
            for role, log in section["training"].items():
                name = arm if role == "adapted" else "control"
                if name in plotted:
                    continue
                plotted.add(name)
                curve = log["curve"]
                ax.plot([p["step"] for p in curve], [p["val_nll"] for p in curve], marker="o", ms=3, label=name)
        ax.set(title=pair, xlabel="step", ylabel="validation NLL per token (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "curves.png"
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str]) -> None:
    pairs = {pair: runs(pattern) for pair, pattern in (a.split("=", 1) for a in argv)}
    domain = {pair: next(iter(next(iter(arms.values()))["domains"])) for pair, arms in pairs.items() if arms}
    print("| pair | arm | student | control | adapted | teacher | adapted − control | adapted − student | "
          "control − student |\n|---|---|---:|---:|---:|---:|---|---|---|")
    for pair, arms in pairs.items():
        print("\n".join(text_rows(pair, arms, domain[pair])))
    print("\n| pair | set | arm | prompts | student | control | adapted | teacher | adapted − control | "
          "control − student |\n|---|---|---|---:|---:|---:|---:|---:|---|---|")
    for pair, arms in pairs.items():
        print("\n".join(qa_rows(pair, arms, "facts QA", lambda s: s.get("facts_qa"))))
        print("\n".join(qa_rows(pair, arms, "kv_retrieval", lambda s: s.get("qa_domains", {}).get("kv_retrieval"))))
    print("\n| pair | arm | steps | training wall s | training CPU s | stage wall s | stage CPU s |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for pair, arms in pairs.items():
        print("\n".join(time_rows(pair, arms)))
    print("\n| pair | arm | share of the control arm's gain | share of the student → teacher gap |\n|---|---|---:|---:|")
    for pair, arms in pairs.items():
        print("\n".join(shares(pair, arms, domain[pair])))
    print(f"\nLi et al. 2024 (ViT-L, ImageNet top-1): {LI_ET_AL}")
    print(f"figure: {figure({p: a for p, a in pairs.items() if a})}")


if __name__ == "__main__":
    main(sys.argv[1:])
