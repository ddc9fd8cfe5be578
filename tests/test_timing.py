"""Per-stage timing in ``metrics.json`` → ``timing`` (:func:`uzr.timing.stopwatch`): wall and process CPU seconds."""

import time

import pytest

from uzr.timing import stopwatch


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_stopwatch_counts_cpu_apart_from_wall_and_adds_up():
    timing: dict = {}
    with stopwatch(timing, "harvest"):
        time.sleep(0.2)  # wall, no CPU
    assert timing["harvest"]["wall_s"] >= 0.19 and timing["harvest"]["cpu_s"] < 0.1
    with stopwatch(timing, "harvest"):  # a stage's build and its report add up under one name
        _spin(0.15)
    assert timing["harvest"]["cpu_s"] >= 0.14 and timing["harvest"]["wall_s"] >= 0.19 + 0.14
    with pytest.raises(RuntimeError), stopwatch(timing, "evaluate"):
        _spin(0.05)
        raise RuntimeError("a failing stage is still timed")
    assert timing["evaluate"]["cpu_s"] >= 0.04 and set(timing) == {"harvest", "evaluate"}
