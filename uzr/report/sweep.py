"""Sweep report: ``python -m uzr.report outputs/multirun/<sweep> [--name NAME] [--out DIR]``.

Reads every job's ``metrics.json`` and ``config.yaml`` under a Hydra sweep folder and writes, into
``experiments/<name>/`` (``name`` defaults to the sweep folder's name):

- ``results.csv`` / ``results.md``: one row per job — alpha, schedule, injected layers, mode; bits per
  byte of the teacher, the student without injection and the injected student; habit distances
  (averaged over the injected layers) without and with injection; the controller's held-out KL beside
  its baselines; which artifacts the job built or reused;
- ``curves.png``: metric-versus-alpha curves, one line per layer set, each beside its no-injection
  baseline (and the teacher's bits per byte);
- ``grid.png``: the change that injection made, as a layer set x alpha grid; ``heatmaps.png``: the
  jobs' attention heatmap figures tiled the same way;
- ``REPORT.md``: summary lines (plain about a result that hurts), the table, the figures, the
  command that ran the sweep and the machine; ``COMMAND.md``: the command and machine alone.

No W&B account is needed: everything comes from the job folders.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from uzr.report.figures import KL_METHODS, plot_curves, plot_grid, series_names, tile_heatmaps

METRICS, CONFIG, JOB_INFO = "metrics.json", "config.yaml", "job.json"
HABITS = ("norm_entropy", "locality", "attn_kl")
# Config keys that are shown as their own columns (the sweep axes users vary most).
AXES = ("alpha.value", "alpha.schedule", "inject.layers", "inject.mode")
# Keys that differ between jobs without describing the experiment.
IGNORED_KEYS = ("logger.", "paths.", "hydra.", "device")
# evaluate metrics with their own columns; any other {"student", "injected"[, "teacher"]} dict gets columns too
KNOWN_EVAL = ("bits_per_byte", "habit_distance", "next_token_kl", "num_texts")


class ReportError(RuntimeError):
    """A sweep folder that cannot be reported on (named in the message)."""


@dataclass
class Job:
    dir: Path
    metrics: dict
    config: dict
    overrides: list[str] = field(default_factory=list)
    info: dict | None = None  # job.json: machine, wall time

    @property
    def num(self) -> int:
        head = self.dir.name.split("-", 1)[0]
        return int(head) if head.isdigit() else 1 << 30


# ------------------------------------------------------------------------------------------- read
def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"alpha.value": 0.5, "inject.layers": [8, 15], ...}``."""
    flat = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_jobs(sweep: Path) -> tuple[list[Job], list[Path]]:
    """Jobs with a ``metrics.json`` under ``sweep`` (any depth), and job folders that have none."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise ReportError(f"{sweep} is not a folder: pass a Hydra sweep folder such as outputs/multirun/<date>/<time>")
    jobs = []
    for path in sorted(sweep.rglob(METRICS)):
        if "wandb" in path.relative_to(sweep).parts:
            continue
        job_dir = path.parent
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{path} is not valid JSON ({err}); was the job interrupted while writing it?") from None
        config = _load_yaml(job_dir / CONFIG) or _load_yaml(job_dir / ".hydra" / "config.yaml")
        if config is None:
            raise ReportError(f"{job_dir} has {METRICS} but no {CONFIG} (nor .hydra/config.yaml)")
        overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
        info = json.loads((job_dir / JOB_INFO).read_text()) if (job_dir / JOB_INFO).exists() else None
        jobs.append(Job(job_dir, metrics, config, [str(o) for o in overrides], info))
    if not jobs:
        raise ReportError(
            f"no {METRICS} under {sweep}: not a finished uzr sweep (each job of `python -m uzr.train -m ...` "
            f"writes {METRICS} into its own subfolder when it completes)"
        )
    with_metrics = {job.dir for job in jobs}
    unfinished = sorted(
        p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")
        if p.parent.parent not in with_metrics and "wandb" not in p.relative_to(sweep).parts
    )
    jobs.sort(key=lambda j: (j.num, str(j.dir)))
    return jobs, unfinished


# ------------------------------------------------------------------------------------------- rows
def _layers_str(layers) -> str:
    return "[" + ",".join(str(v) for v in layers) + "]" if isinstance(layers, (list, tuple)) else str(layers)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def varying_keys(jobs: list[Job]) -> list[str]:
    """Config keys (other than the fixed columns) whose values differ between jobs, e.g. ``seed``."""
    flats = [flatten(job.config) for job in jobs]
    keys = sorted(set().union(*flats))
    out = []
    for key in keys:
        if key in AXES or key.startswith(IGNORED_KEYS):
            continue
        if len({json.dumps(f.get(key), sort_keys=True, default=str) for f in flats}) > 1:
            out.append(key)
    return out


def job_row(job: Job, sweep: Path, extra_keys: list[str]) -> dict:
    """One flat row of the results table (``None`` where the job did not measure a number)."""
    flat = flatten(job.config)
    m = job.metrics
    row: dict = {"job": str(job.dir.relative_to(sweep)) if job.dir != sweep else "."}
    row["alpha.value"] = flat.get("alpha.value")
    row["alpha.schedule"] = flat.get("alpha.schedule")
    row["inject.layers"] = _layers_str(flat.get("inject.layers"))
    row["inject.mode"] = flat.get("inject.mode")
    for key in extra_keys:
        value = flat.get(key)
        row[key] = _layers_str(value) if isinstance(value, list) else value
    ev = m.get("evaluate") or {}
    bpb = ev.get("bits_per_byte", {})
    for name in ("teacher", "student", "injected"):
        row[f"bpb_{name}"] = bpb.get(name)
    row["bpb_delta"] = (bpb["injected"] - bpb["student"]) if {"injected", "student"} <= set(bpb) else None
    paired = bpb.get("injected_minus_student") or {}
    row["bpb_delta_low"], row["bpb_delta_high"] = paired.get("low"), paired.get("high")
    row["bpb_verdict"] = paired.get("verdict")
    oracle = bpb.get("oracle_minus_student") or {}  # evaluate.oracle: the teacher's attention injected alike
    row["bpb_oracle"] = bpb.get("oracle")
    row["bpb_oracle_delta"], row["bpb_oracle_delta_low"] = oracle.get("estimate"), oracle.get("low")
    row["bpb_oracle_delta_high"], row["bpb_oracle_verdict"] = oracle.get("high"), oracle.get("verdict")
    qa_paired = (ev.get("facts_qa") or {}).get("injected_minus_student") or {}
    row["facts_qa_delta"] = qa_paired.get("estimate")
    row["facts_qa_delta_low"], row["facts_qa_delta_high"] = qa_paired.get("low"), qa_paired.get("high")
    row["facts_qa_verdict"] = qa_paired.get("verdict")
    habit = ev.get("habit_distance", {})
    for name in HABITS:
        for side in ("student", "injected"):
            row[f"habit_{name}_{side}"] = _mean(gaps.get(side, {}).get(name) for gaps in habit.values())
    if "next_token_kl" in ev:
        for side in ("student", "injected"):
            row[f"next_token_kl_{side}"] = ev["next_token_kl"].get(side)
    for key, value in ev.items():  # any other per-model metric, e.g. {"facts_qa": {"student": .., "injected": ..}}
        if key in KNOWN_EVAL or not isinstance(value, dict) or "injected" not in value:
            continue
        for side in ("teacher", "student", "injected", "oracle"):
            if isinstance(value.get(side), (int, float)) and not isinstance(value.get(side), bool):
                row[f"{key}_{side}"] = float(value[side])
    for key, value in ((m.get("dominance") or {}).get("sweep_row") or {}).items():  # setting/split/stage/index: mean
        row[f"dominance {key}"] = value
    kl = (m.get("controller") or {}).get("heldout_kl", {})
    for method in KL_METHODS:
        row[f"heldout_kl_{method}"] = kl.get(method)
    for kind in ("harvest", "controller"):
        art = m.get("artifacts", {}).get(kind)
        row[f"{kind}_artifact"] = None if art is None else f"{'built' if art['built'] else 'reused'} {art['key']}"
    row["wall_s"] = (job.info or {}).get("wall_s")
    return row


def series_label(row: dict, extra_keys: list[str], varying: set[str]) -> str:
    """The curve a row belongs to: its layer set plus every other varied key except alpha."""
    parts = [f"layers {row['inject.layers']}"]
    parts += [f"{key}={row[key]}" for key in ("alpha.schedule", "inject.mode") if key in varying]
    parts += [f"{key}={row[key]}" for key in extra_keys]
    return ", ".join(parts)


def build_rows(jobs: list[Job], sweep: Path) -> tuple[list[dict], list[str]]:
    extra = varying_keys(jobs)
    rows = [job_row(job, sweep, extra) for job in jobs]
    varying = {key for key in AXES if len({str(r[key]) for r in rows}) > 1}
    for row in rows:
        row["series"] = series_label(row, extra, varying)
    order = {name: i for i, name in enumerate(dict.fromkeys(r["series"] for r in rows))}  # sweep order
    rows.sort(key=lambda r: (order[r["series"]], r["alpha.value"] if r["alpha.value"] is not None else -1))
    return rows, extra


# ------------------------------------------------------------------------------------------ table
COLUMN_TITLES = {
    "bpb_teacher": "bpb teacher", "bpb_student": "bpb student (no inj.)", "bpb_injected": "bpb injected",
    "bpb_delta": "Δ bpb (inj. − student)", "bpb_delta_low": "Δ bpb 95% low", "bpb_delta_high": "Δ bpb 95% high",
    "bpb_verdict": "Δ bpb verdict", "facts_qa_delta": "Δ facts QA (inj. − student)",
    "facts_qa_delta_low": "Δ facts QA 95% low", "facts_qa_delta_high": "Δ facts QA 95% high",
    "facts_qa_verdict": "Δ facts QA verdict", "bpb_oracle": "bpb oracle", "bpb_oracle_delta": "Δ bpb (oracle − student)",
    "habit_norm_entropy_student": "norm. entropy gap student", "habit_norm_entropy_injected": "norm. entropy gap injected",
    "habit_locality_student": "locality gap student", "habit_locality_injected": "locality gap injected",
    "habit_attn_kl_student": "attn KL to teacher student", "habit_attn_kl_injected": "attn KL to teacher injected",
    "next_token_kl_student": "next-token KL student", "next_token_kl_injected": "next-token KL injected",
    "heldout_kl_controller": "held-out KL controller", "heldout_kl_student_self": "held-out KL student-self",
    "heldout_kl_recency": "held-out KL recency", "heldout_kl_uniform": "held-out KL uniform",
    "facts_qa_teacher": "facts QA teacher", "facts_qa_student": "facts QA student", "facts_qa_injected": "facts QA injected",
    "harvest_artifact": "harvest", "controller_artifact": "controller", "wall_s": "wall s",
}


# differences, shown with their sign
SIGNED = ("bpb_delta", "bpb_delta_low", "bpb_delta_high", "facts_qa_delta", "facts_qa_delta_low", "facts_qa_delta_high",
          "bpb_oracle_delta", "bpb_oracle_delta_low", "bpb_oracle_delta_high")


def table_columns(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "series"))
    # drop measurement columns no job has (e.g. next-token KL when vocabularies differ)
    return [c for c in columns if c in ("job", *AXES) or any(r.get(c) is not None for r in rows)]


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                             for c in columns])


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(COLUMN_TITLES.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" if c in ("job", *AXES) else "---:" for c in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if c in SIGNED and value is not None:
                cells.append(f"{value:+.4f}")
            elif c in AXES or c == "wall_s":
                cells.append(_cell(None if value is None else str(value)))
            else:
                cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- summary
def summary_lines(rows: list[dict]) -> list[str]:
    """Plain-language reading of the sweep; says so when injection hurts everywhere."""
    lines = []
    series = series_names(rows)
    alphas = sorted({r["alpha.value"] for r in rows if r["alpha.value"] is not None})
    lines.append(f"{len(rows)} jobs: {len(series)} layer set(s) x alpha in {alphas}.")
    ev = [r for r in rows if r["bpb_injected"] is not None]
    if not ev:
        lines.append("No job ran the evaluate stage: no bits per byte to compare.")
    else:
        students = sorted({round(r["bpb_student"], 6) for r in ev})
        teachers = sorted({round(r["bpb_teacher"], 6) for r in ev})
        s_txt = f"{students[0]:.4f}" if len(students) == 1 else f"{students[0]:.4f}–{students[-1]:.4f}"
        t_txt = f"{teachers[0]:.4f}" if len(teachers) == 1 else f"{teachers[0]:.4f}–{teachers[-1]:.4f}"
        lines.append(f"No-injection baseline: student {s_txt} bits/byte; teacher {t_txt} bits/byte.")
        if all(r["bpb_teacher"] >= r["bpb_student"] for r in ev):
            lines.append("The teacher is NOT ahead of the student on this text: there is no bits-per-byte gap for "
                         "injection to close, so a gain cannot come from transfer.")
        zero = [r for r in ev if r["alpha.value"] == 0]
        if zero:
            off = [r for r in zero if r["bpb_injected"] != r["bpb_student"]]
            lines.append(
                f"alpha=0 reproduces the uninjected student exactly in all {len(zero)} job(s)." if not off else
                f"alpha=0 does NOT reproduce the uninjected student in {len(off)} of {len(zero)} job(s) "
                f"(max |Δ| {max(abs(r['bpb_delta']) for r in off):.2e}): the injector is not neutral at alpha 0."
            )
        injected = [r for r in ev if r["alpha.value"] not in (None, 0)]
        if injected:
            deltas = [r["bpb_delta"] for r in injected]
            if all(r.get("bpb_verdict") for r in injected):
                lines.append(_verdict_counts("bits per byte", injected, "bpb_verdict", deltas, "texts"))
            elif all(d > 0 for d in deltas):
                lines.append(f"Injection HURTS bits per byte at every alpha > 0 and every layer set "
                             f"(Δ from {min(deltas):+.4f} to {max(deltas):+.4f} bits/byte).")
            elif all(d < 0 for d in deltas):
                lines.append(f"Injection improves bits per byte at every alpha > 0 and every layer set "
                             f"(Δ from {min(deltas):+.4f} to {max(deltas):+.4f} bits/byte).")
            else:
                better = sum(d < 0 for d in deltas)
                lines.append(f"Injection improves bits per byte in {better} of {len(deltas)} injected jobs "
                             f"and hurts (or ties) in the rest (Δ from {min(deltas):+.4f} to {max(deltas):+.4f}).")
            for name in series:
                mine = [r for r in injected if r["series"] == name]
                if not mine:
                    continue
                best = min(mine, key=lambda r: r["bpb_delta"])
                worst = max(mine, key=lambda r: r["bpb_delta"])
                line = f"{name}: best alpha {best['alpha.value']} (Δ bpb {best['bpb_delta']:+.4f}"
                line += ", no alpha > 0 helps)" if best["bpb_delta"] > 0 else ")"
                if len(mine) > 1:
                    line += f", worst alpha {worst['alpha.value']} (Δ bpb {worst['bpb_delta']:+.4f})"
                lines.append(line + ".")
            qa = [r for r in injected if r.get("facts_qa_injected") is not None]
            if qa and all(r.get("facts_qa_verdict") for r in qa):
                deltas = [r["facts_qa_injected"] - r["facts_qa_student"] for r in qa]
                lines.append(_verdict_counts(f"facts QA accuracy (student {qa[0]['facts_qa_student']:.3f}, teacher "
                                             f"{qa[0]['facts_qa_teacher']:.3f}, chance 0.25)", qa, "facts_qa_verdict",
                                             deltas, "prompts"))
            elif qa:
                deltas = [r["facts_qa_injected"] - r["facts_qa_student"] for r in qa]
                lines.append(
                    f"Facts QA accuracy (student {qa[0]['facts_qa_student']:.3f}, teacher {qa[0]['facts_qa_teacher']:.3f}, "
                    f"chance 0.25): injection improves it in {sum(d > 0 for d in deltas)}, leaves it unchanged in "
                    f"{sum(d == 0 for d in deltas)} and HURTS it in {sum(d < 0 for d in deltas)} of {len(qa)} injected "
                    f"jobs (Δ from {min(deltas):+.3f} to {max(deltas):+.3f}).")
            habit = [r for r in injected if r["habit_attn_kl_injected"] is not None]
            if habit:
                closer = sum(r["habit_attn_kl_injected"] < r["habit_attn_kl_student"] for r in habit)
                lines.append(f"Attention habits: injection brings the student's attention closer to the teacher's "
                             f"(lower attention KL, mean over injected layers) in {closer} of {len(habit)} injected jobs.")
    seen = set()
    for r in rows:
        c, s = r["heldout_kl_controller"], r["heldout_kl_student_self"]
        if r["inject.layers"] in seen or c is None or s is None:
            continue
        seen.add(r["inject.layers"])
        lines.append(
            f"Controller for layers {r['inject.layers']}: held-out KL {c:.4f} vs student-self {s:.4f} — "
            + ("beats the student's own attention." if c < s else
               "does NOT beat the student's own attention: it has learned nothing useful.")
        )
    return lines


def _verdict_counts(what: str, rows: list[dict], key: str, deltas: list[float], items: str) -> str:
    """How many injected jobs are better / no different / worse than the student, each read by its own paired
    95% interval (a difference inside it is no difference)."""
    counts = {v: sum(r[key] == v for r in rows) for v in ("better", "no difference", "worse")}
    return (f"Injection vs the uninjected student, {what}, by each job's paired 95% interval over the same {items}: "
            f"better in {counts['better']}, no difference in {counts['no difference']}, WORSE in {counts['worse']} of "
            f"{len(rows)} injected jobs (Δ from {min(deltas):+.4f} to {max(deltas):+.4f}).")


# ---------------------------------------------------------------------------------------- figures
def report_machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    return info


def _quote(items) -> str:
    return " ".join(shlex.quote(str(o)) for o in items)


def sweep_command(sweep: Path, jobs: list[Job]) -> list[str]:
    """Markdown lines naming the command that ran the sweep (from Hydra's ``multirun.yaml``)."""
    lines = []
    multirun = _load_yaml(sweep / "multirun.yaml")
    hydra = (multirun or {}).get("hydra") or {}
    if hydra.get("overrides"):
        task = hydra["overrides"].get("task") or []
        hydra_overrides = [o for o in hydra["overrides"].get("hydra") or [] if o != "hydra.mode=MULTIRUN"]
        cwd = (hydra.get("runtime") or {}).get("cwd")
        lines += ["The sweep (reconstructed from Hydra's `multirun.yaml`"
                  + (f", run in `{cwd}`" if cwd else "") + "):", "",
                  "```bash", f"python -m uzr.train -m {_quote(task + hydra_overrides)}".rstrip(), "```", ""]
        params = (hydra.get("sweeper") or {}).get("params")
        if params:
            lines += ["Grid from the config's `hydra.sweeper.params` (a command-line key replaces the same key):", ""]
            lines += [f"- `{key}`: `{value}`" for key, value in params.items()]
            lines.append("")
        launcher = ((hydra.get("runtime") or {}).get("choices") or {}).get("hydra/launcher")
        if launcher:
            lines += [f"Launcher: `hydra/launcher={launcher}`.", ""]
    else:
        lines += ["No `multirun.yaml` in the sweep folder: the jobs' own overrides follow.", ""]
    lines += ["Each job alone (its `.hydra/overrides.yaml`):", "", "```bash"]
    lines += [f"python -m uzr.train {_quote(job.overrides)}" for job in jobs]
    lines += ["```", ""]
    return lines


def machine_lines(jobs: list[Job]) -> list[str]:
    lines = []
    machines = {json.dumps(job.info["machine"], sort_keys=True) for job in jobs if job.info and "machine" in job.info}
    for machine in sorted(machines):
        m = json.loads(machine)
        lines.append(f"- jobs ran on: {m.get('platform')}, {m.get('cpu_count')} CPUs"
                     + (f" ({m['cpus_usable']} usable)" if m.get("cpus_usable") else "")
                     + f", Python {m.get('python')}, torch {m.get('torch')}"
                     + (f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"))
    if not machines:
        lines.append("- the jobs did not record their machine (no job.json)")
    walls = [job.info["wall_s"] for job in jobs if job.info and job.info.get("wall_s") is not None]
    if walls:
        lines.append(f"- job wall time: {sum(walls):.0f} s in all, {min(walls):.0f}–{max(walls):.0f} s per job")
    r = report_machine()
    lines.append(f"- report written on: {r['platform']}, {r['cpu_count']} CPUs, Python {r['python']}")
    return lines


# ------------------------------------------------------------------------------------------- main
def write_report(sweep: Path, out: Path, name: str) -> dict:
    """Write the report of ``sweep`` into ``out``; returns ``{"rows": [...], "files": {...}, "summary": [...]}``."""
    sweep = Path(sweep)
    jobs, unfinished = load_jobs(sweep)
    rows, _ = build_rows(jobs, sweep)
    out.mkdir(parents=True, exist_ok=True)
    columns = table_columns(rows)
    files = {"csv": out / "results.csv", "markdown": out / "results.md", "curves": out / "curves.png",
             "grid": out / "grid.png", "heatmaps": out / "heatmaps.png", "report": out / "REPORT.md",
             "command": out / "COMMAND.md"}
    write_csv(rows, columns, files["csv"])
    table = markdown_table(rows, columns)
    files["markdown"].write_text(table)
    plot_curves(rows, files["curves"])
    plot_grid(rows, files["grid"])
    if not tile_heatmaps(rows, sweep, files["heatmaps"]):
        files.pop("heatmaps")
    summary = summary_lines(rows)
    if unfinished:
        summary.append(f"{len(unfinished)} job folder(s) have no {METRICS} (failed or unfinished) and are left "
                       f"out: {', '.join(str(p.relative_to(sweep)) for p in unfinished[:5])}")
    command = sweep_command(sweep, jobs)
    machine = machine_lines(jobs)
    files["command"].write_text("\n".join([f"# {name}: command", "", f"Sweep folder: `{sweep}`", "", *command,
                                           "## Machine", "", *machine, ""]))
    figures = [f"![{key}]({files[key].name})" for key in ("curves", "grid", "heatmaps") if key in files]
    files["report"].write_text("\n".join([
        f"# {name}", "", f"Report of the sweep in `{sweep}` ({len(rows)} jobs), written by "
        f"`python -m uzr.report`.", "", "## Summary", "", *[f"- {line}" for line in summary], "",
        "## Results", "", "Bits per byte (bpb): lower is better; 'student' is the same model without injection. "
        "Habit distances (gap = mean |habit(student) − habit(teacher)| per position; attention KL = "
        "KL(teacher || student) per query row) are averaged over the injected layers. Δ = injected − student.", "", table,
        "## Figures", "", *figures, "", "## Command", "", *command, "## Machine", "", *machine, "",
    ]))
    return {"rows": rows, "files": files, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uzr.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a Hydra sweep folder, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--name", help="report name (default: the sweep folder's name)")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments/<name>)")
    args = parser.parse_args(argv)
    name = args.name or args.sweep.resolve().name
    out = args.out or Path("experiments") / name
    try:
        result = write_report(args.sweep, out, name)
    except ReportError as err:
        print(f"uzr.report: error: {err}", file=sys.stderr)
        return 2
    for line in result["summary"]:
        print(f"• {line}")
    print(f"wrote {len(result['rows'])} rows and {', '.join(p.name for p in result['files'].values())} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
