"""The sweep report (uzr.report) on synthetic sweep folders: table values, figures, summary, errors.

A real sweep is reported on in tests/test_sweep.py; here the job folders are written by hand so every
number is known and the cases (injection hurting everywhere, a non-neutral alpha 0, a failed job) are cheap.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from uzr.report.sweep import main, write_report

LAYER_SETS = ([1], [1, 2])
ALPHAS = (0, 0.5, 1)
PNG = b"\x89PNG\r\n\x1a\n"


def fake_metrics(layers: list[int], alpha: float, hurt: float, zero_exact: bool = True) -> dict:
    """metrics.json as uzr.runner writes it; injected bpb = student + hurt * alpha."""
    student = 1.25 + 0.01 * len(layers)
    injected = student + hurt * alpha + (0.0 if zero_exact or alpha else 1e-3)
    habit = {
        f"L{layer}": {
            "student": {"norm_entropy": 0.2 + 0.01 * layer, "locality": 0.3, "attn_kl": 0.5 + 0.1 * layer},
            "injected": {"norm_entropy": 0.2 - 0.01 * alpha * layer, "locality": 0.3 - 0.05 * alpha,
                         "attn_kl": 0.5 + 0.1 * layer - 0.2 * alpha},
        }
        for layer in layers
    }
    key = "".join(map(str, layers))
    return {
        "name": f"t:alpha.value={alpha}",
        "artifacts": {"harvest": {"key": "h0", "built": alpha == 0 and layers == [1], "path": "/c/h0"},
                      "controller": {"key": f"c{key}", "built": alpha == 0, "path": f"/c/c{key}"}},
        "controller": {"heldout_kl": {"controller": 0.30 + 0.01 * len(layers), "uniform": 0.9, "recency": 0.6,
                                      "student_self": 0.4}},
        "evaluate": {"bits_per_byte": {"student": student, "injected": injected, "teacher": 1.5},
                     "habit_distance": habit, "num_texts": 4,
                     "facts_qa": {"student": 0.9, "injected": 0.9 - 0.1 * alpha, "teacher": 1.0}},
    }


def write_sweep(root: Path, hurt: float = 0.1, zero_exact: bool = True, figures: bool = True) -> Path:
    """A finished 2 layer sets x 3 alphas sweep folder, plus its multirun.yaml."""
    sweep = root / "12-00-00-000001"
    num = 0
    for alpha in ALPHAS:
        for layers in LAYER_SETS:
            overrides = ["+experiment=smoke", f"alpha.value={alpha}", f"inject.layers=[{','.join(map(str, layers))}]"]
            job = sweep / f"{num}-{','.join(overrides[1:])}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            config = {"name": "smoke", "seed": 0, "paths": {"cache_dir": f"/tmp/c{num}"},
                      "alpha": {"schedule": "constant", "value": alpha, "warmup_steps": 16},
                      "inject": {"layers": layers, "teacher_layers": None, "mode": "bias"},
                      "logger": {"group": "12-00-00-000001"}}
            (job / "config.yaml").write_text(yaml.safe_dump(config))
            (job / "metrics.json").write_text(json.dumps(fake_metrics(layers, alpha, hurt, zero_exact)))
            (job / "job.json").write_text(json.dumps({"wall_s": 10.0 + num, "machine": {
                "platform": "Linux-test", "cpu_count": 2, "python": "3.11", "torch": "2.x", "cuda": None}}))
            if figures:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                (job / "figures").mkdir()
                fig = plt.figure(figsize=(4, 1.1))
                fig.text(0.5, 0.5, f"alpha {alpha} layers {layers}")
                fig.savefig(job / "figures" / f"heatmaps_L{layers[0]}.png")
                plt.close(fig)
            num += 1
    multirun = {"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"],
                                        "task": ["+experiment=smoke", "alpha.value=0,0.5,1",
                                                 "inject.layers=[1],[1,2]"]},
                          "runtime": {"cwd": "/work", "choices": {"hydra/launcher": "basic"}},
                          "sweeper": {"params": None}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return sweep


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_table_has_one_row_per_job_with_the_metrics_values(tmp_path):
    sweep = write_sweep(tmp_path)
    result = write_report(sweep, tmp_path / "out", "t")
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == len(ALPHAS) * len(LAYER_SETS)
    for row in rows:
        job = sweep / row["job"]
        m = json.loads((job / "metrics.json").read_text())
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert float(row["alpha.value"]) == config["alpha"]["value"]
        assert row["inject.layers"] == "[" + ",".join(map(str, config["inject"]["layers"])) + "]"
        assert row["alpha.schedule"] == "constant" and row["inject.mode"] == "bias"
        bpb = m["evaluate"]["bits_per_byte"]
        for name in ("student", "injected", "teacher"):
            assert float(row[f"bpb_{name}"]) == bpb[name]  # exact: the CSV keeps full precision
        habit = m["evaluate"]["habit_distance"]
        for side in ("student", "injected"):
            expected = sum(h[side]["attn_kl"] for h in habit.values()) / len(habit)
            assert float(row[f"habit_attn_kl_{side}"]) == pytest.approx(expected, rel=1e-12)
        for method in ("controller", "student_self", "recency", "uniform"):
            assert float(row[f"heldout_kl_{method}"]) == m["controller"]["heldout_kl"][method]
        assert row["controller_artifact"] == ("built " if config["alpha"]["value"] == 0 else "reused ") + \
            m["artifacts"]["controller"]["key"]
        assert float(row["facts_qa_injected"]) == m["evaluate"]["facts_qa"]["injected"]
    assert not any(k.startswith("paths") for k in rows[0]), "keys that differ per job but do not describe it are no columns"
    table = (tmp_path / "out" / "results.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == table[0].count("|") for line in table)
    assert len(result["rows"]) == len(rows)


def test_paired_intervals_and_the_oracle_are_columns(tmp_path):
    """Each job's paired intervals (bits per byte, facts QA) and its oracle row (evaluate.oracle) are columns of the
    table, signed, under readable titles; the summary reads the verdicts."""
    sweep = write_sweep(tmp_path, figures=False)
    for path in sweep.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        bpb = metrics["evaluate"]["bits_per_byte"]
        delta = bpb["injected"] - bpb["student"]
        bpb["injected_minus_student"] = {"estimate": delta, "low": delta - 0.01, "high": delta + 0.01,
                                         "verdict": "worse" if delta > 0.01 else "no difference"}
        bpb["oracle"] = bpb["student"] - 0.002
        bpb["oracle_minus_student"] = {"estimate": -0.002, "low": -0.005, "high": 0.001, "verdict": "no difference"}
        qa = metrics["evaluate"]["facts_qa"]
        qa["injected_minus_student"] = {"estimate": qa["injected"] - qa["student"], "low": -0.2, "high": 0.05,
                                        "verdict": "no difference"}
        path.write_text(json.dumps(metrics))
    result = write_report(sweep, tmp_path / "out", "t")
    row = next(r for r in result["rows"] if r["alpha.value"] == 1 and r["inject.layers"] == "[1]")
    assert row["bpb_delta_low"] == pytest.approx(0.09) and row["bpb_delta_high"] == pytest.approx(0.11)
    assert row["bpb_verdict"] == "worse"
    assert row["facts_qa_delta"] == pytest.approx(-0.1) and row["facts_qa_verdict"] == "no difference"
    assert row["bpb_oracle"] == pytest.approx(1.258) and row["bpb_oracle_verdict"] == "no difference"
    table = (tmp_path / "out" / "results.md").read_text()
    header = table.splitlines()[0]
    for title in ("Δ bpb 95% low", "Δ bpb 95% high", "Δ bpb verdict", "Δ facts QA (inj. − student)", "bpb oracle",
                  "Δ bpb (oracle − student)"):
        assert f"| {title} |" in header
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in table.splitlines()[2 + 2].strip("|").split("|")]))  # layers [1], alpha 1
    assert cells["job"].startswith("4-alpha.value=1,") and cells["Δ bpb 95% low"] == "+0.0900"
    assert cells["Δ facts QA (inj. − student)"] == "-0.1000" and cells["Δ bpb (oracle − student)"] == "-0.0020"
    assert any("paired 95% interval" in line and "WORSE in 4 of 4" in line for line in result["summary"])


def test_figures_and_command_are_written(tmp_path):
    sweep = write_sweep(tmp_path)
    write_report(sweep, tmp_path / "out", "t")
    out = tmp_path / "out"
    for name in ("curves.png", "grid.png", "heatmaps.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    command = (out / "COMMAND.md").read_text()
    assert "python -m uzr.train -m +experiment=smoke alpha.value=0,0.5,1 'inject.layers=[1],[1,2]'" in command
    assert "python -m uzr.train +experiment=smoke alpha.value=0.5 'inject.layers=[1,2]'" in command
    assert "Linux-test, 2 CPUs" in command and "report written on" in command
    report = (out / "REPORT.md").read_text()
    assert "![curves](curves.png)" in report and "| job |" in report
    assert "alpha.value=0,0.5,1 'inject.layers=[1],[1,2]'" in report and "Linux-test" in report


def test_summary_says_when_injection_hurts_at_every_alpha(tmp_path):
    lines = write_report(write_sweep(tmp_path), tmp_path / "out", "t")["summary"]
    assert any("Injection HURTS bits per byte at every alpha > 0 and every layer set" in line for line in lines)
    assert any("alpha=0 reproduces the uninjected student exactly in all 2" in line for line in lines)
    assert any("teacher is NOT ahead" in line for line in lines)
    assert any("layers [1,2]: best alpha 0.5" in line for line in lines)
    # facts QA in the synthetic sweep: injected = 0.9 - 0.1 * alpha, student 0.9
    assert any("Facts QA accuracy (student 0.900, teacher 1.000, chance 0.25): injection improves it in 0, "
               "leaves it unchanged in 0 and HURTS it in 4 of 4" in line for line in lines), lines


def test_summary_when_injection_helps_and_alpha_zero_is_not_neutral(tmp_path):
    lines = write_report(write_sweep(tmp_path, hurt=-0.1, zero_exact=False), tmp_path / "out", "t")["summary"]
    text = "\n".join(lines)
    assert "HURTS bits per byte" not in text
    assert "improves bits per byte at every alpha > 0" in text
    assert "alpha=0 does NOT reproduce the uninjected student in 2 of 2" in text


def test_unfinished_jobs_are_named_and_left_out(tmp_path):
    sweep = write_sweep(tmp_path, figures=False)
    failed = sweep / "6-alpha.value=2"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- alpha.value=2\n")
    result = write_report(sweep, tmp_path / "out", "t")
    assert len(result["rows"]) == 6
    assert any("1 job folder(s) have no metrics.json" in line and "6-alpha.value=2" in line
               for line in result["summary"])
    assert "heatmaps" not in result["files"] and not (tmp_path / "out" / "heatmaps.png").exists()


def test_cli_default_output_is_experiments_slash_sweep_name(tmp_path, monkeypatch, capsys):
    sweep = write_sweep(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([str(sweep)]) == 0
    assert len(read_csv(tmp_path / "experiments" / sweep.name / "results.csv")) == 6
    assert main([str(sweep), "--name", "ablation"]) == 0
    assert (tmp_path / "experiments" / "ablation" / "REPORT.md").read_text().startswith("# ablation")
    assert "HURTS" in capsys.readouterr().out


def test_empty_or_missing_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "0-alpha.value=0" / ".hydra").mkdir(parents=True)
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.json under" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
