"""Wall and CPU seconds of a phase, side by side.

On a shared machine the wall clock measures the other jobs as much as this one; the process's CPU seconds
(all its threads, ``time.process_time``) do not. With one torch thread (``threads=1``) the CPU seconds bound the
phase's wall time on a quiet machine from above, which is what a time budget is checked against."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Started on creation; :meth:`read` gives ``{"seconds": wall, "cpu_seconds": process CPU}`` since then."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """(wall s, process CPU s) since the start, unrounded."""
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def read(self) -> dict[str, float]:
        wall, cpu = self.elapsed()
        return {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


@contextmanager
def stopwatch(timing: dict, name: str) -> Iterator[None]:
    """Adds the block's wall and process CPU seconds to ``timing[name]`` (``{"wall_s", "cpu_s"}``), also when it
    raises: a stage's build and its report add up under the stage's name in ``metrics.json`` → ``timing``."""
    clock = Stopwatch()
    try:
        yield
    finally:
        wall, cpu = clock.elapsed()
        entry = timing.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] = round(entry["wall_s"] + wall, 2)
        entry["cpu_s"] = round(entry["cpu_s"] + cpu, 2)
