"""Causal-loop task generation speed: uzr's vectorised generator beside a per-sample Python loop.

The loop generator below is the "seed"-style baseline (DESIGN.md §9: ~150k samples/s on its
machine): the same four levels, rules, update modes and prompt format, drawn with ``random`` and
formatted with f-strings one sample at a time. Both produce the same columns (prompt, answer, level,
variables, steps) as Python-side data; uzr's as an Arrow table. They run interleaved in one process
(``--rounds``), and the table keeps each one's best round: wall clock, and the process's CPU time (which a
shared machine does not inflate much; on a quiet machine the wall clock of this single-threaded run is at most
the CPU time).

    .venv/bin/python benchmarks/causal_loop.py --n 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from uzr.tasks.causal_loop import LETTERS, PARALLEL_TEXT, SEQUENTIAL_TEXT, generate

UNARY = {1: ("+", "-", "*"), 2: ("+", "-", "*", "%", "//", "="), 3: ("+", "-", "*"),
         4: ("+", "-", "*", "%", "//", "=")}
BINARY = ("+", "-", "max", "min")
MIN_VARS = {1: 3, 2: 2, 3: 3, 4: 4}


def _unary(rnd: random.Random, level: int, tgt: int, src: int) -> tuple:
    op = rnd.choice(UNARY[level])
    k = rnd.randint(2, 3) if op == "*" else rnd.randint(2, 5) if op == "%" else rnd.randint(1, 9)
    return (tgt, op, src, None, k)


def _value(rule: tuple, x: list[int], cond_t: int | None) -> int:
    _, op, a, b, k = rule
    va = x[a]
    if cond_t is not None:
        return va + k if x[b] > cond_t else va
    if b is not None:
        vb = x[b]
        return va + vb if op == "+" else va - vb if op == "-" else max(va, vb) if op == "max" else min(va, vb)
    return {"+": va + k, "-": va - k, "*": va * k, "%": va % k, "//": va // 2, "=": va}[op]


def _text(rule: tuple, names: list[str], cond_t: int | None) -> str:
    tgt, op, a, b, k = rule
    lhs, sa = names[tgt], names[a]
    if cond_t is not None:
        return f"{lhs} = {sa} + {k} if {names[b]} > {cond_t} else {sa}"
    if b is not None:
        return f"{lhs} = {op}({sa}, {names[b]})" if op in ("max", "min") else f"{lhs} = {sa} {op} {names[b]}"
    return {"//": f"{lhs} = {sa} // 2", "=": f"{lhs} = {sa}"}.get(op, f"{lhs} = {sa} {op} {k}")


def loop_sample(rnd: random.Random, levels, max_vars=6, max_rounds=8, sequential=False, fp_fraction=0.5) -> dict:
    """One sample, drawn and formatted the plain way."""
    level = rnd.choice(levels)
    V = rnd.randint(MIN_VARS[level], max_vars)
    cyclic = level in (2, 4)
    M = rnd.randint(5, 10) if cyclic else 0
    rules, conds = [], []
    if level == 1:
        rules = [_unary(rnd, 1, r, r - 1) for r in range(1, V)]
    elif level == 2:
        rules = [_unary(rnd, 2, r, (r - 1) % V) for r in range(V)]
    elif level == 3:
        rules = [_unary(rnd, 3, r, r - 2) for r in range(2, V - 1)]
        rules.append((V - 1, rnd.choice(BINARY), V - 3, V - 2, 0))
    else:
        rules = [(0, rnd.choice(BINARY), V - 1, rnd.randint(1, V - 2), 0)]
        for r in range(1, V):
            if rnd.random() < 1 / 3:
                rules.append((r, "+", r - 1, (r + rnd.randint(1, V - 1)) % V, rnd.randint(1, 9)))
            else:
                rules.append(_unary(rnd, 4, r, r - 1))
    conds = [rnd.randrange(M) if (level == 4 and r[3] is not None and r[0] != 0) else None for r in rules]
    rnd.shuffle(order := list(range(len(rules))))
    x = [rnd.randrange(M if cyclic else 10) for _ in range(V)]
    names = rnd.sample(LETTERS[:V], V)
    traj = [x]
    for _ in range(max_rounds if cyclic else V):
        new = list(traj[-1])
        for i in order:
            v = _value(rules[i], new if sequential else traj[-1], conds[i])
            new[rules[i][0]] = v % M if M else v
        traj.append(new)
        if not cyclic and new == traj[-2]:
            break
    settled = next((r for r in range(len(traj) - 1) if traj[r] == traj[r + 1]), -1)
    fixed = not cyclic or (settled >= 1 and rnd.random() < fp_fraction)
    steps = settled if fixed else rnd.randint(1, max_rounds)
    if cyclic and not fixed:
        while len(traj) <= steps:
            traj.append(traj[-1])
    by_name = lambda state: sorted(zip(names, state))  # noqa: E731
    start = ", ".join(f"{n}={v}" for n, v in by_name(traj[0]))
    text = "; ".join(_text(rules[i], names, conds[i]) for i in order)
    question = (" What are the values once nothing changes?" if fixed else
                f" What are the values after {steps} round{'s' if steps != 1 else ''}?")
    prompt = (f"Start: {start}. Rules: {text}. {SEQUENTIAL_TEXT if sequential else PARALLEL_TEXT}"
              f"{f' All values are taken modulo {M}.' if cyclic else ''}{question}"
              " Answer as A=.., B=.., for every variable.")
    answer = ", ".join(f"{n}={v}" for n, v in by_name(traj[steps]))
    return {"prompt": prompt, "answer": answer, "level": level, "variables": sorted(names), "steps": steps}


def loop_generate(n: int, seed: int, levels) -> list[dict]:
    rnd = random.Random(seed)
    return [loop_sample(rnd, levels) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    args = ap.parse_args()
    generate({"n": 1000, "levels": args.levels})  # warm-up (imports, tables)
    wall = {"uzr": float("inf"), "loop": float("inf")}
    cpu = dict(wall)
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in wall:
            t, c = time.perf_counter(), time.process_time()
            if name == "uzr":
                rows = generate({"n": args.n, "levels": args.levels, "seed": r}).num_rows
            else:
                rows = len(loop_generate(args.n, r, args.levels))
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
            assert rows == args.n
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load average (1 min) "
          f"{load_before[0]:.1f} before, {load[0]:.1f} after; n={args.n}, levels {args.levels}, best of {args.rounds} "
          f"rounds, one process")
    print("| generator | samples/s (wall) | samples/s (process CPU time) | CPU s per run |")
    print("|---|---|---|---|")
    for name in wall:
        print(f"| {name} | {args.n / wall[name]:,.0f} | {args.n / cpu[name]:,.0f} | {cpu[name]:.3f} |")
    print(f"ratio uzr / loop: {wall['loop'] / wall['uzr']:.2f} (wall), {cpu['loop'] / cpu['uzr']:.2f} (CPU)")


if __name__ == "__main__":
    main()
