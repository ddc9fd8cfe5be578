"""Tables and the learning-curve figure of experiments/adaptation from the runs' metrics.json.

    python experiments/adaptation/collect.py PAIR=RUN_GLOB [PAIR=RUN_GLOB ...]
    python experiments/adaptation/collect.py keep RUN_DIR NAME [--rescored]   # copy a run's metrics to runs/NAME.json

``ceiling:PAIR=FILE`` adds the positive control's shares: FILE is the control arm of the *undamaged* student
(``student.damage.strength=1``), the top of the gap that damage leaves after plain LoRA.

e.g. ``real='outputs/multirun/*/*adapt*/metrics.json'`` (a run's folder, with its config.yaml) or
``real='experiments/adaptation/runs/real_*.json'`` (the kept runs this README was built from): every run of a pair, one
arm each (the control arm's scores come with every run). Prints the markdown tables of the README and writes
``curves.png`` beside this file.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import yaml

from uzr.intervals import bits_per_byte_difference

HERE = Path(__file__).resolve().parent
LI_ET_AL = {"scratch": 83.0, "fine-tune": 85.6, "attention copy": 85.1, "attention distillation": 85.7}


def run_lr(path: Path, metrics: dict) -> float:
    """The run's ``adapt.lr``: from the Hydra ``config.yaml`` beside a run's metrics, or the ``lr`` field of a file
    :func:`keep` wrote."""
    config = path.parent / "config.yaml"
    return float(yaml.safe_load(config.read_text())["adapt"]["lr"] if config.exists() else metrics["lr"])


def final_val_nll(section: dict) -> float:
    """The learning-rate criterion: validation NLL per token at the run's arm's last curve point."""
    return section["training"]["adapted"]["curve"][-1]["val_nll"]


def runs(pattern: str) -> dict[str, dict]:
    """{arm: adapt section + its ``lr`` and whether that is the ``chosen`` rate} of the runs matching ``pattern``.
    The learning rate is chosen as docs/adaptation.md says: the control arm's run with the lowest final validation
    NLL. A run at another rate is labelled with it (the learning-rate check); of two runs of one arm and rate, the
    later file wins."""
    loaded = []
    for path in map(Path, sorted(glob.glob(pattern))):
        metrics = json.loads(path.read_text())
        if "adapt" in metrics:
            loaded.append((run_lr(path, metrics), {**metrics["adapt"], "timing": metrics.get("timing", {}).get("adapt")}))
    controls = {lr: final_val_nll(section) for lr, section in loaded if section["arm"] == "control"}
    chosen = min(controls, key=controls.get) if controls else None
    out = {}
    for lr, section in sorted(loaded, key=lambda item: item[0] != chosen):  # the chosen rate's arms first
        out[section["arm"] + ("" if lr == chosen else f" (lr {lr:g})")] = {**section, "lr": lr, "chosen": lr == chosen}
    return out


def keep(run_dir: str, name: str, rescored: bool = False) -> Path:
    """Copy a finished run's metrics (with its ``adapt.lr``) to ``runs/NAME.json``, where :func:`runs` reads it back.
    ``rescored``: the run only re-scored a kept arm (more domains, its adapter cached), so the kept file's stage
    timing, the arm's real cost, is carried over."""
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text())
    out = HERE / "runs" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    if rescored:
        metrics["timing"] = json.loads(out.read_text())["timing"]
    out.write_text(json.dumps({**metrics, "lr": run_lr(path, metrics)}, indent=1))
    return out


def control_bpb(bpb: dict) -> float:
    """The control arm's bits per byte: its own role in an arm's run, ``adapted`` in the control's own run."""
    return bpb.get("control", bpb["adapted"])


def interval(d: dict | None) -> str:
    if not d:
        return "—"
    verdict = "" if d["verdict"] == "no difference" else f" **{d['verdict']}**"
    return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{verdict}"


def text_rows(pair: str, arms: dict[str, dict], domain: str) -> list[str]:
    rows = []
    for arm, section in arms.items():
        if domain not in section["domains"]:
            continue
        bpb = section["domains"][domain]["bits_per_byte"]
        rows.append(f"| {pair} | {domain} | {arm} | {bpb['student']:.4f} | {control_bpb(bpb):.4f} | "
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
        resumed = " (resumed)" if t["resumed"] else ""  # its training wall time spans the interruption
        rows.append(f"| {pair} | {arm}{resumed} | {t['steps']} | {t['seconds']:.0f} | {t['cpu_seconds']:.0f} | "
                    f"{stage.get('wall_s', 0):.0f} | {stage.get('cpu_s', 0):.0f} |")
    return rows


def shares(pair: str, arms: dict[str, dict], domain: str) -> list[str]:
    """Each arm's gain over the frozen student as a share of the control arm's gain (Li et al.'s fine-tune gap) and,
    where the teacher is ahead, of the student-to-teacher gap."""
    rows = []
    for arm, section in arms.items():
        bpb = section["domains"][domain]["bits_per_byte"]
        student, control, adapted, teacher = bpb["student"], control_bpb(bpb), bpb["adapted"], bpb["teacher"]
        control_gain = student - control
        of_control = f"{(student - adapted) / control_gain * 100:.0f} %" if control_gain > 0 else "—"
        of_teacher = f"{(student - adapted) / (student - teacher) * 100:.0f} %" if student > teacher else "— (teacher behind)"
        rows.append(f"| {pair} | {arm} | {of_control} | {of_teacher} |")
    return rows


def ceiling_rows(pair: str, arms: dict[str, dict], domain: str, ceiling: dict) -> list[str]:
    """Li et al.'s shares on the positive control: each arm's gain over the control arm as a share of the control's
    distance to ``ceiling`` (the same training of the *undamaged* student: what the damage still costs after plain
    LoRA), with the paired interval of arm − ceiling on the same texts."""
    top = ceiling["domains"][domain]
    rows = []
    for arm, section in arms.items():
        if not section["chosen"]:
            continue
        d = section["domains"][domain]
        if d["per_text"]["bytes"] != top["per_text"]["bytes"]:
            raise SystemExit(f"{pair}: the ceiling run scored other texts than arm {arm}")
        control, adapted = control_bpb(d["bits_per_byte"]), d["bits_per_byte"]["adapted"]
        gap = control - top["bits_per_byte"]["adapted"]
        diff = bits_per_byte_difference(d["per_text"]["nll_adapted"], top["per_text"]["nll_adapted"], d["per_text"]["bytes"])
        rows.append(f"| {pair} | {arm} | {adapted:.4f} | {top['bits_per_byte']['adapted']:.4f} | "
                    f"{interval({**diff.as_dict(), 'verdict': diff.verdict(higher_is_better=False)})} | "
                    f"{(control - adapted) / gap * 100:.0f} % |")
    return rows


def figure(pairs: dict[str, dict[str, dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (pair, arms) in zip(axes[0], pairs.items()):
        plotted = set()
        for arm, section in arms.items():
            if not section["chosen"] and section["arm"] != "control":  # the other rates: only their control is drawn
                continue
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


def lr_rows(pair: str, arms: dict[str, dict]) -> list[str]:
    rows = []
    for section in arms.values():
        if section["arm"] != "control":
            continue
        curve = section["training"]["adapted"]["curve"]
        bpb = next(iter(section["domains"].values()))["bits_per_byte"]
        rows.append(f"| {pair} | {section['lr']:g}{' (chosen)' if section['chosen'] else ''} | "
                    f"{curve[0]['val_nll']:.4f} → {curve[-1]['val_nll']:.4f} | {control_bpb(bpb):.4f} |")
    return rows


def main(argv: list[str]) -> None:
    if argv[:1] == ["keep"]:  # collect.py keep RUN_DIR NAME [--rescored]
        print(keep(argv[1], argv[2], rescored="--rescored" in argv[3:]))
        return
    ceilings = {a.split("=", 1)[0].removeprefix("ceiling:"): json.loads(Path(a.split("=", 1)[1]).read_text())["adapt"]
                for a in argv if a.startswith("ceiling:")}
    pairs = {pair: runs(pattern) for pair, pattern in (a.split("=", 1) for a in argv if not a.startswith("ceiling:"))}
    print("| pair | adapt.lr | validation NLL, first → last point | held-out bits per byte |\n|---|---|---|---:|")
    for pair, arms in pairs.items():
        print("\n".join(lr_rows(pair, arms)))
    print()
    domain = {pair: next(iter(next(iter(arms.values()))["domains"])) for pair, arms in pairs.items() if arms}
    print("| pair | texts | arm | student | control | adapted | teacher | adapted − control | adapted − student | "
          "control − student |\n|---|---|---|---:|---:|---:|---:|---|---|---|")
    for pair, arms in pairs.items():
        for name in dict.fromkeys(d for section in arms.values() for d in section["domains"]):  # the data's first
            print("\n".join(text_rows(pair, arms, name)))
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
    if ceilings:
        print("\n| pair | arm | adapted | undamaged student, same training | adapted − undamaged | share of the "
              "damage left after plain LoRA |\n|---|---|---:|---:|---|---:|")
    for pair, ceiling in ceilings.items():
        print("\n".join(ceiling_rows(pair, pairs[pair], domain[pair], ceiling)))
    print(f"\nLi et al. 2024 (ViT-L, ImageNet top-1): {LI_ET_AL}")
    print(f"figure: {figure({p: a for p, a in pairs.items() if a})}")


if __name__ == "__main__":
    main(sys.argv[1:])
