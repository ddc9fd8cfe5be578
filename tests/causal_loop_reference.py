"""Slow, independent reference for the causal-loop tasks (tests only): reads a prompt's text, runs its
rules step by step as Python expressions and returns the answer it asks for."""

from __future__ import annotations

import re

_START = re.compile(r"Start: (.*?)\. Rules: (.*?)\. Each round")


def solve(prompt: str) -> dict[str, int]:
    start, rules_text = _START.search(prompt).groups()
    state = {name: int(value) for name, value in (kv.split("=") for kv in start.split(", "))}
    rules = [tuple(part.split(" = ", 1)) for part in rules_text.split("; ")]
    sequential = "one by one in the order listed" in prompt
    mod = re.search(r"modulo (\d+)\.", prompt)
    modulus = int(mod.group(1)) if mod else None

    def one_round(old: dict[str, int]) -> dict[str, int]:
        new = dict(old)
        for target, expr in rules:
            value = eval(expr, {"max": max, "min": min}, dict(new if sequential else old))  # noqa: S307
            new[target] = value % modulus if modulus else value
        return new

    rounds = re.search(r"after (\d+) rounds?\?", prompt)
    if rounds:
        for _ in range(int(rounds.group(1))):
            state = one_round(state)
        return state
    assert "once nothing changes" in prompt
    for _ in range(100):
        new = one_round(state)
        if new == state:
            return state
        state = new
    raise AssertionError(f"no fixed point within 100 rounds: {prompt}")
