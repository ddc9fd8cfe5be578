"""Causal-loop tasks: answers match an independent step-by-step simulation, same seed -> same data,
bad parameters fail clearly, the scorer and the CLI."""

from __future__ import annotations

import hashlib
import json

import pytest

from uzr.tasks.causal_loop import compose_spec, generate, main, parse_assignments, score_answer

from .causal_loop_reference import solve


@pytest.mark.parametrize("update", ["parallel", "sequential"])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_answers_equal_a_step_by_step_simulation_of_the_prompt(level, update):
    rows = generate({"n": 300, "levels": [level], "update": update, "seed": level, "trajectory": True}).to_pylist()
    for row in rows:
        want = solve(row["prompt"])
        assert parse_assignments(row["answer"]) == want, row["prompt"]
        assert row["level"] == level and row["variables"] == sorted(want)
        assert len(row["trajectory"]) == row["steps"] + 1
        assert row["trajectory"][-1] == [want[v] for v in row["variables"]]
        start = dict(zip(row["variables"], row["trajectory"][0]))
        assert row["prompt"].startswith("Start: " + ", ".join(f"{k}={v}" for k, v in start.items()) + ".")


def test_levels_have_their_structure():
    rows = generate({"n": 400, "seed": 3}).to_pylist()
    by_level = {lv: [r for r in rows if r["level"] == lv] for lv in (1, 2, 3, 4)}
    assert all(len(v) > 50 for v in by_level.values())  # levels drawn uniformly
    for r in by_level[1] + by_level[3]:
        assert "once nothing changes" in r["prompt"] and "modulo" not in r["prompt"]
    # level 1: one rule per variable but the source; level 3: two sources and one joining binary rule
    assert all(r["prompt"].count(" = ") == len(r["variables"]) - 1 for r in by_level[1])
    assert all(r["prompt"].count(" = ") == len(r["variables"]) - 2 for r in by_level[3])
    assert all(("max(" in r["prompt"]) + ("min(" in r["prompt"]) + r["prompt"].count(" + ") +
               r["prompt"].count(" - ") >= 1 for r in by_level[3])
    # cyclic levels: every variable has a rule; both question kinds occur
    for lv in (2, 4):
        assert all(r["prompt"].count(" = ") == len(r["variables"]) and "modulo" in r["prompt"] for r in by_level[lv])
        assert {("once nothing changes" in r["prompt"]) for r in by_level[lv]} == {True, False}
    assert any(" if " in r["prompt"] for r in by_level[4])


def test_same_seed_same_dataset_and_another_seed_differs():
    spec = {"n": 500, "seed": 7, "chunk_size": 128, "trajectory": True}
    assert generate(spec).equals(generate(spec))
    assert not generate(spec).equals(generate({**spec, "seed": 8}))


@pytest.mark.parametrize(("update", "digest"), [("parallel", "8656781676800e1c"), ("sequential", "ebbdda81a6cda93f")])
def test_a_seed_keeps_its_dataset(update, digest):
    """The dataset of a seed, fixed since the generator's first version (experiments cache items by it): the
    hash of every column of 300 samples over three chunks, all levels, up to 8 variables."""
    table = generate({"n": 300, "seed": 5, "update": update, "max_vars": 8, "chunk_size": 128, "trajectory": True})
    assert hashlib.sha256(json.dumps(table.to_pylist()).encode()).hexdigest()[:16] == digest


def test_fixed_point_fraction_zero_states_every_round_count():
    rows = generate({"n": 200, "levels": [2, 4], "fixed_point_fraction": 0.0}).to_pylist()
    assert all("after" in r["prompt"] and 1 <= r["steps"] <= 8 for r in rows)


@pytest.mark.parametrize(("override", "words"), [
    ({"levels": [1, 5]}, ["causal_loop.levels", "unknown level(s) [5]", "valid levels"]),
    ({"n": 0}, ["causal_loop.n=0", "an integer >= 1"]),
    ({"n": -3}, ["causal_loop.n=-3"]),
    ({"levels": []}, ["causal_loop.levels=[]", "non-empty"]),
    ({"update": "async"}, ["causal_loop.update='async'", "parallel | sequential"]),
    ({"levels": [4], "max_vars": 3}, ["causal_loop.max_vars=3", "[4, 8]"]),
    ({"fixed_point_fraction": 1.5}, ["fixed_point_fraction=1.5", "[0, 1]"]),
    ({"colour": 1}, ["unknown causal_loop key(s) ['colour']", "valid keys"]),
])
def test_bad_parameters_fail_naming_the_field(override, words):
    with pytest.raises(ValueError) as err:
        generate({"n": 10, **override})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_scorer_exact_and_partial():
    answer = "A=2, B=-9, C=9, D=8"
    assert score_answer("A=2, B=-9, C=9, D=8", answer) == (True, 1.0)
    assert score_answer("The values: D = 8, C=9, B = -9, A=2.", answer) == (True, 1.0)  # any order, spaces
    assert score_answer("A=2, B=9, C=9", answer) == (False, 0.5)  # wrong sign, D missing
    assert score_answer("no idea", answer) == (False, 0.0)
    assert score_answer("A=2, B=-9, C=9, D=8, E=1", answer) == (True, 1.0)  # extra variables ignored
    assert score_answer("A=3, A=2, B=-9, C=9, D=8", answer) == (False, 0.75)  # the first value counts
    with pytest.raises(ValueError, match="holds no assignments"):
        score_answer("A=1", "nothing")


def test_cli_composes_overrides_and_writes_a_dataset(tmp_path, capsys):
    import datasets

    spec = compose_spec(["n=40", "levels=[1,3]", "seed=2", "update=sequential"])
    assert (spec.n, spec.levels, spec.update) == (40, [1, 3], "sequential")
    out = tmp_path / "ds"
    assert main(["n=40", "levels=[1,3]", "seed=2", f"out={out}"]) == 0
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 40 and set(ds["level"]) == {1, 3}
    assert ds.column_names == ["prompt", "answer", "level", "variables", "steps"]
    assert ds.to_list() == generate({"n": 40, "levels": [1, 3], "seed": 2}).to_pylist()
    assert main(["n=0"]) == 2 and "causal_loop.n=0" in capsys.readouterr().err
    assert main(["colour=red"]) == 2 and "valid keys" in capsys.readouterr().err
