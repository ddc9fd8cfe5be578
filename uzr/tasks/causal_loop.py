"""Causal-loop reasoning tasks: variables, update rules, and a checkable final state (DESIGN.md §9).

A sample states start values, rules such as ``B = A + 2``, ``C = max(A, B)`` or
``D = C + 1 if A > 3 else C``, how a round applies them, and asks for the values of every variable
once nothing changes (acyclic levels; cyclic ones that settle) or after a stated number of rounds.

Levels (``V`` variables, drawn per sample from ``[MIN_VARS[level], max_vars]``):

1. **chain**: one source, ``x_r = f(x_{r-1})`` with ``+k``, ``-k``, ``*k``.
2. **cycle**: ``x_r = f(x_{r-1 mod V})`` around one loop, values modulo ``M``; ops ``+k``, ``-k``, ``*k``,
   ``%k``, ``// 2``, copy.
3. **converging paths**: two sources; unary chains from each meet in one binary rule
   (``+``, ``-``, ``max``, ``min``) — A→…→C and B→…→C.
4. **nested interacting cycles**: an outer loop over all variables and an inner loop closed by a
   binary rule on the first variable; other rules may be conditional on a variable elsewhere; modulo ``M``.

Update: ``parallel`` (every rule reads the previous round's values) or ``sequential`` (the rules apply
in the order listed, each reading the newest values). Every answer is unique: the rules are
deterministic, a fixed point is absorbing, and a cycle that does not settle within ``max_rounds`` is
asked for a stated round count.

Generation is vectorised: a chunk's samples are grouped by (level, V), their rules drawn as numpy arrays
over the group and simulated as int32 arithmetic on flat states (:class:`Program`), and their text built as
blocks of byte pieces that :func:`uzr.tasks.text_pieces.render` stores straight into an Arrow string buffer,
without a Python loop over samples.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow as pa

from uzr.config.run import CONF_DIR
from uzr.config.tasks import CYCLIC_LEVELS, MAX_VARS, MIN_VARS, CausalLoopSpec, coerce_causal_loop
from uzr.tasks.text_pieces import TextRows, numbers, only, pack, render, words

LETTERS = "ABCDEFGH"

# ---------------------------------------------------------------- rules
COPY, ADD, SUB, MUL, MOD, HALF, ADD2, SUB2, MAX2, MIN2, COND = range(11)
BINARY = (ADD2, SUB2, MAX2, MIN2)
UNARY_OPS = {1: (ADD, SUB, MUL), 2: (ADD, SUB, MUL, MOD, HALF, COPY), 3: (ADD, SUB, MUL),
             4: (ADD, SUB, MUL, MOD, HALF, COPY)}
COND_FRACTION = 1 / 3  # level 4: share of unary rules made conditional on another variable


class Rules:
    """The rules of a group of ``n`` samples, ``R`` rules each, in structural (role) order: arrays
    ``tgt, op, s1, s2, k, t`` of shape (n, R), roles in ``[0, V)``; ``modulus`` (n,), 0 = none."""

    def __init__(self, n: int, num_rules: int):
        shape = (n, num_rules)
        self.tgt, self.op, self.s1, self.s2 = (np.zeros(shape, np.int64) for _ in range(4))
        self.k, self.t = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        self.modulus = np.zeros(n, np.int64)

    def set(self, r: int, tgt, op, s1, s2=0) -> None:
        self.tgt[:, r], self.op[:, r], self.s1[:, r], self.s2[:, r] = tgt, op, s1, s2


def _draw_constants(rng: np.random.Generator, rules: Rules, threshold_high) -> None:
    op = rules.op
    rules.k = np.where(op == MUL, rng.integers(2, 4, op.shape),
                       np.where(op == MOD, rng.integers(2, 6, op.shape), rng.integers(1, 10, op.shape)))
    rules.t = rng.integers(0, np.broadcast_to(np.asarray(threshold_high)[..., None], op.shape))


def draw_rules(rng: np.random.Generator, level: int, n: int, V: int, moduli: tuple[int, int] = (5, 10)) -> Rules:
    """Random rules of ``n`` samples of ``level`` with ``V`` variables (roles; sources have no rule);
    cyclic levels draw their modulus from ``[moduli[0], moduli[1]]``."""
    unary = np.asarray(UNARY_OPS[level])
    pick = lambda size: unary[rng.integers(0, len(unary), size)]  # noqa: E731
    if level == 1:  # chain: role 0 is the source
        rules = Rules(n, V - 1)
        for r in range(1, V):
            rules.set(r - 1, r, pick(n), r - 1)
    elif level == 2:  # one cycle through every role
        rules = Rules(n, V)
        for r in range(V):
            rules.set(r, r, pick(n), (r - 1) % V)
    elif level == 3:  # sources 0 and 1; role r < V-1 extends the chain of r-2; V-1 joins both chains
        rules = Rules(n, V - 2)
        for r in range(2, V - 1):
            rules.set(r - 2, r, pick(n), r - 2)
        rules.set(V - 3, V - 1, np.asarray(BINARY)[rng.integers(0, len(BINARY), n)], V - 3, V - 2)
    else:  # outer loop 0..V-1, inner loop 0..a-1 closed by role 0's binary rule; conditional links
        rules = Rules(n, V)
        inner_end = rng.integers(1, V - 1, n)  # a - 1 in [1, V-2]
        rules.set(0, 0, np.asarray(BINARY)[rng.integers(0, len(BINARY), n)], V - 1, inner_end)
        for r in range(1, V):
            cond = rng.random(n) < COND_FRACTION
            other = (r + rng.integers(1, V, n)) % V  # any role but r
            rules.set(r, r, np.where(cond, COND, pick(n)), r - 1, np.where(cond, other, 0))
    if level in CYCLIC_LEVELS:
        rules.modulus = rng.integers(moduli[0], moduli[1] + 1, n)
    _draw_constants(rng, rules, rules.modulus if level in CYCLIC_LEVELS else 10)
    return rules


class Listed:
    """A group's rules in listing order, their variables as letter indices: ``tgt, s1, s2`` (n, R) in
    ``[0, V)``; ``op`` (n, R), ``k, t`` (n, R) int32; ``modulus`` (n, 1) int32, 0 = none."""

    def __init__(self, rules: Rules, order: np.ndarray, letter_of: np.ndarray):
        n, R = order.shape
        at = (order + np.arange(n)[:, None] * R).ravel()  # (n * R,) flat index of the rule listed p-th

        def listed(a):  # (n, R), column p = the rule listed p-th
            return a.ravel()[at].reshape(n, R)

        letter_rows = np.arange(n)[:, None] * letter_of.shape[1]  # (n, 1) row starts in the flat letter_of
        self.op, self.k, self.t = listed(rules.op), listed(rules.k).astype(np.int32), listed(rules.t).astype(np.int32)
        self.tgt, self.s1, self.s2 = (letter_of.ravel()[letter_rows + listed(role)]
                                      for role in (rules.tgt, rules.s1, rules.s2))
        self.modulus = rules.modulus.astype(np.int32)[:, None]


class Program:
    """Listed rules as arithmetic on int32 (n, R) arrays: a rule's value from its sources' values a and b is
    ``a * mul + add + sign * b + kc * (b > t)`` (copy, +k, -k, *k, a + b, a - b, the conditional +k), replaced
    by ``a % k``, ``a // 2``, ``max(a, b)`` or ``min(a, b)`` where those rules are, then taken ``% modulus`` on
    the cyclic levels. Sources and targets are flat indices into the state (n * V,) in letter order."""

    def __init__(self, rules: Listed, V: int):
        op, k = rules.op, rules.k
        n = op.shape[0]
        base = np.arange(n)[:, None] * V  # (n, 1) row starts in the flat state
        self.tgt, self.s1, self.s2 = base + rules.tgt, base + rules.s1, base + rules.s2
        self.mul = np.where(op == MUL, k, 1).astype(np.int32)
        self.add = np.where(op == ADD, k, np.where(op == SUB, -k, 0)).astype(np.int32)
        self.sign = (op == ADD2).astype(np.int32) - (op == SUB2)
        self.kc, self.k, self.t = np.where(op == COND, k, 0).astype(np.int32), k, rules.t
        self.special = [(code, op == code) for code in (MOD, HALF, MAX2, MIN2) if (op == code).any()]
        self.reads_b = bool(self.sign.any() or self.kc.any() or any(c in (MAX2, MIN2) for c, _ in self.special))
        self.modulus = rules.modulus if rules.modulus.any() else None

    def value(self, a: np.ndarray, b: np.ndarray | None, cols: slice) -> np.ndarray:
        """Values (n, c) of the rules in columns ``cols`` from their sources' values ``a``, ``b`` (n, c)."""
        v = a * self.mul[:, cols] + self.add[:, cols]
        if self.reads_b:
            v += self.sign[:, cols] * b + self.kc[:, cols] * (b > self.t[:, cols])
        for code, where in self.special:
            w = where[:, cols]
            if code == MOD:
                v = np.where(w, a % self.k[:, cols], v)
            elif code == HALF:
                v = np.where(w, a >> 1, v)  # floor division by 2, negative values too
            else:
                v = np.where(w, (np.maximum if code == MAX2 else np.minimum)(a, b), v)
        return v if self.modulus is None else v % self.modulus


def simulate(start: np.ndarray, program: Program, sequential: bool, rounds: int) -> np.ndarray:
    """States after 0..rounds rounds (n, rounds + 1, V) int32, from ``start`` (n, V) in letter order. Parallel:
    every rule reads the previous round's values; sequential: in listing order, each reads the newest."""
    n, V = start.shape
    traj = np.empty((n, rounds + 1, V), np.int32)
    traj[:, 0] = start
    # int32: with at most MAX_VARS variables every value stays within 6 digits (the text raises beyond), and
    # a rule multiplies by at most 3
    state = start.astype(np.int32).reshape(-1)  # (n * V,) a copy, updated in place
    R = program.tgt.shape[1]
    steps = [slice(p, p + 1) for p in range(R)] if sequential else [slice(None)]
    for r in range(rounds):
        for cols in steps:  # parallel: one step reads all sources before any target is written
            b = state[program.s2[:, cols]] if program.reads_b else None
            state[program.tgt[:, cols]] = program.value(state[program.s1[:, cols]], b, cols)
        traj[:, r + 1] = state.reshape(n, V)
    return traj


def settled_round(traj: np.ndarray) -> np.ndarray:
    """Per sample, the first round r with state r == state r+1 (a fixed point), or -1 if none. (n,)"""
    same = (traj[:, 1:] == traj[:, :-1]).all(-1)  # (n, rounds)
    return np.where(same.any(1), same.argmax(1), -1)


# ---------------------------------------------------------------- text as byte pieces
PARALLEL_TEXT = "Each round applies every rule at once to the previous round's values."
SEQUENTIAL_TEXT = "Each round applies the rules one by one in the order listed, each using the newest values."
ANSWER_AS = " Answer as A=.., B=.., for every variable."


OP_TEXT = {ADD: " + ", SUB: " - ", MUL: " * ", MOD: " % ", HALF: " // 2", ADD2: " + ", SUB2: " - ", MAX2: ", ",
           MIN2: ", ", COND: " + ", COPY: ""}
MAX_K = 9  # rule constants are drawn in [1, 9] (_draw_constants)
_L = len(LETTERS)


def _head(op: int, tgt: int) -> str:
    return f"{LETTERS[tgt]} = " + {MAX2: "max(", MIN2: "min("}.get(op, "")


def _body(op: int, s1: int, s2: int, k: int) -> str:
    if op in BINARY:
        return LETTERS[s1] + OP_TEXT[op] + LETTERS[s2] + (")" if op in (MAX2, MIN2) else "")
    return LETTERS[s1] + OP_TEXT[op] + ("" if op in (HALF, COPY) else str(k))


# every rule's text in two pieces, by table: "D = max(" by (op, target); "C, A)" or "C + 3" by (op, s1, s2, k)
_HEAD = words([_head(op, tgt) for op in range(COND + 1) for tgt in range(_L)])
_BODY = words([_body(op, s1, s2, k) for op in range(COND + 1) for s1 in range(_L) for s2 in range(_L)
               for k in range(MAX_K + 1)])
_IF, _ELSE = words([f" if {x} > " for x in LETTERS]), words([f" else {x}" for x in LETTERS])


def state_text(rows: TextRows, state: np.ndarray, sep_last: str) -> None:
    """Append ``A=3, B=0, ...`` + sep_last: the values of ``state`` (n, V), in letter order."""
    V = state.shape[1]
    rows.sequence(words([f"{LETTERS[j]}=" for j in range(V)]), numbers(state), words([", "] * (V - 1) + [sep_last]))


def rule_text(rows: TextRows, rules: Listed) -> None:
    """Append the rules in listing order, e.g. ``D = C + 1 if A > 3 else C; B = max(A, C). ``"""
    op = rules.op
    head = op * _L + rules.tgt  # (n, R) index into _HEAD
    body = ((op * _L + rules.s1) * _L + rules.s2) * (MAX_K + 1) + rules.k  # (n, R) index into _BODY
    blocks = [(_HEAD[0][head], _HEAD[1][head]), (_BODY[0][body], _BODY[1][body])]
    cond = op == COND
    if cond.any():  # " if A > 3 else C"
        blocks += [only(cond, (_IF[0][rules.s2], 8)), only(cond, numbers(rules.t)),
                   only(cond, (_ELSE[0][rules.s1], 7))]
    rows.sequence(*blocks, words(["; "] * (op.shape[1] - 1) + [". "]))


# ---------------------------------------------------------------- one group, one chunk
def generate_group(rng: np.random.Generator, spec: CausalLoopSpec, level: int, n: int, V: int) -> dict:
    """``n`` samples of ``level`` with ``V`` variables: the text rows ``prompt`` and ``answer``, ``steps`` (n,) and
    ``trajectory`` (n, rounds + 1, V), the states after each round in letter order."""
    rules = draw_rules(rng, level, n, V, (spec.min_modulus, spec.max_modulus))
    R = rules.op.shape[1]
    cyclic = level in CYCLIC_LEVELS
    start = rng.integers(0, rules.modulus[:, None] if cyclic else 10, (n, V))  # by role
    order = np.argsort(rng.random((n, R)), 1)  # listing order of the rules (sequential update order)
    if cyclic:  # drawn before the simulation, in the order the seed's stream has always had
        ask_fixed = rng.random(n) < spec.fixed_point_fraction
        stated = rng.integers(1, spec.max_rounds + 1, n)
    letter_of = np.argsort(rng.random((n, V)), 1)  # role -> letter index
    start_letters = np.empty_like(start)
    np.put_along_axis(start_letters, letter_of, start, 1)
    listed = Listed(rules, order, letter_of)
    rounds = spec.max_rounds if cyclic else V  # acyclic: depth <= V - 1 rounds, one more shows it settled
    traj = simulate(start_letters, Program(listed, V), spec.update == "sequential", rounds)  # (n, rounds + 1, V)
    settled = settled_round(traj)
    if cyclic:
        fixed = (settled >= 1) & ask_fixed
        steps = np.where(fixed, settled, stated)
    else:
        assert (settled >= 0).all(), "an acyclic system did not settle"
        fixed, steps = np.ones(n, bool), settled
    return {"prompt": prompt_text(spec, listed, start_letters, fixed, steps),
            "answer": answer_text(traj[np.arange(n), steps]), "steps": steps, "trajectory": traj}


def prompt_text(spec: CausalLoopSpec, rules: Listed, start: np.ndarray, fixed: np.ndarray,
                steps: np.ndarray) -> TextRows:
    """The prompts of a group: ``start`` (n, V) values in letter order, ``fixed`` (n,) asks for the fixed point,
    else after ``steps`` (n,) rounds."""
    rows = TextRows(len(start))
    rows.text("Start: ")
    state_text(rows, start, ". ")
    rows.text("Rules: ")
    rule_text(rows, rules)
    update = PARALLEL_TEXT if spec.update == "parallel" else SEQUENTIAL_TEXT
    if rules.modulus.any():  # the cyclic levels
        rows.text(update + " All values are taken modulo ")
        rows.sequence(numbers(rules.modulus), (pack("."), 1))
    else:
        rows.text(update)
    asked = ~fixed  # a stated round count
    rows.text(" What are the values after ", asked)
    rows.pieces(*only(asked[:, None], numbers(steps[:, None])))
    rows.text(" round?" + ANSWER_AS, asked & (steps == 1))
    rows.text(" rounds?" + ANSWER_AS, asked & (steps != 1))
    rows.text(" What are the values once nothing changes?" + ANSWER_AS, fixed)  # after the (empty) count piece
    return rows


def answer_text(final: np.ndarray) -> TextRows:
    """``A=2, B=6, ...``: the values ``final`` (n, V) in letter order."""
    rows = TextRows(len(final))
    state_text(rows, final, "")
    return rows


_MIN_VARS = np.array([MIN_VARS.get(lv, 0) for lv in range(max(MIN_VARS) + 1)])


def _letter_strings(V: np.ndarray) -> pa.StringArray:
    """``A, B, ..`` up to each sample's variable count V (n,), flattened: one-letter Arrow strings (sum V,)."""
    letters = (np.arange(V.max())[None, :] < V[:, None]).nonzero()[1]  # (sum V,) letter index of each
    offsets = np.arange(len(letters) + 1, dtype=np.int32)
    return pa.StringArray.from_buffers(len(letters), pa.py_buffer(offsets),
                                       pa.py_buffer((ord("A") + letters).astype(np.uint8)))


def generate_chunk(rng: np.random.Generator, spec: CausalLoopSpec, n: int) -> pa.Table:
    """``n`` samples in draw order: level uniform over ``spec.levels``, V uniform per level."""
    rank = rng.integers(0, len(spec.levels), n)  # (n,) position of the sample's level in spec.levels
    levels = np.asarray(spec.levels)[rank]
    nvars = rng.integers(_MIN_VARS[levels], spec.max_vars + 1)
    key = rank * (MAX_VARS + 1) + nvars  # (n,) one value per (level, V) group, in the order groups are drawn
    by_group = np.argsort(key, kind="stable")  # (n,) sample indices, each group's in draw order
    keys, firsts = np.unique(key[by_group], return_index=True)
    groups = []
    for group_key, where in zip(keys, np.split(by_group, firsts[1:])):
        level, V = spec.levels[int(group_key) // (MAX_VARS + 1)], int(group_key) % (MAX_VARS + 1)
        groups.append((where, generate_group(rng, spec, level, len(where), V)))
    steps = np.zeros(n, np.int64)
    for where, g in groups:
        steps[where] = g["steps"]
    V = nvars.astype(np.int64)
    columns = {
        "prompt": render([(w, g["prompt"]) for w, g in groups], n),
        "answer": render([(w, g["answer"]) for w, g in groups], n, gap=True),  # may end in a piece
        "level": pa.array(levels.astype(np.int32)),
        "variables": pa.LargeListArray.from_arrays(np.concatenate([[0], np.cumsum(V)]), _letter_strings(V)),
        "steps": pa.array(steps.astype(np.int32)),
    }
    if spec.trajectory:
        trajs = [g["trajectory"] for _, g in groups]  # (k, rounds + 1, V) per group
        width = max(t.shape[2] for t in trajs)
        full = np.zeros((n, max(t.shape[1] for t in trajs), width), np.int32)
        for where, g in groups:
            full[where, :g["trajectory"].shape[1], :g["trajectory"].shape[2]] = g["trajectory"]
        keep = (np.arange(full.shape[1])[None, :, None] <= steps[:, None, None]) & \
               (np.arange(width)[None, None, :] < V[:, None, None])
        inner = pa.LargeListArray.from_arrays(
            np.concatenate([[0], np.cumsum(np.repeat(V, steps + 1))]), pa.array(full[keep]))
        columns["trajectory"] = pa.LargeListArray.from_arrays(np.concatenate([[0], np.cumsum(steps + 1)]), inner)
    return pa.table(columns)


def generate(spec: CausalLoopSpec | dict | None = None, progress: bool = False) -> pa.Table:
    """The dataset of ``spec`` as one Arrow table; the same spec gives the same table."""
    spec = coerce_causal_loop(spec)
    sizes = [min(spec.chunk_size, spec.n - i) for i in range(0, spec.n, spec.chunk_size)]
    seeds = np.random.SeedSequence(spec.seed).spawn(len(sizes))
    from tqdm.auto import tqdm

    tables = []
    with tqdm(total=spec.n, unit="sample", desc="causal_loop", disable=not progress) as bar:
        for size, seed in zip(sizes, seeds):
            tables.append(generate_chunk(np.random.default_rng(seed), spec, size))
            bar.update(size)
    return pa.concat_tables(tables)


def to_dataset(table: pa.Table):
    """An HF ``datasets.Dataset`` over the table."""
    import datasets

    return datasets.Dataset(table)


# ---------------------------------------------------------------- scoring
_ASSIGN = re.compile(r"\b([A-Z])\s*=\s*(-?\d+)")


def parse_assignments(text: str) -> dict[str, int]:
    """``A=1, B = -3`` -> {"A": 1, "B": -3}; the first value of a variable counts."""
    out: dict[str, int] = {}
    for name, value in _ASSIGN.findall(text):
        out.setdefault(name, int(value))
    return out


def score_answer(prediction: str, answer: str) -> tuple[bool, float]:
    """(exact, partial): partial = share of the answer's variables the prediction gives the right value
    (a missing variable counts wrong); exact = every one right. Extra variables are ignored."""
    want = parse_assignments(answer)
    if not want:
        raise ValueError(f"the reference answer {answer!r} holds no assignments like 'A=1'")
    got = parse_assignments(prediction)
    right = sum(got.get(k) == v for k, v in want.items())
    return right == len(want), right / len(want)


# ---------------------------------------------------------------- CLI
def compose_spec(overrides: list[str]) -> CausalLoopSpec:
    """``conf/tasks/causal_loop.yaml`` + Hydra ``key=value`` overrides -> validated spec."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name="causal_loop_schema", node=CausalLoopSpec)
    GlobalHydra.instance().clear()
    known = ", ".join(CausalLoopSpec.__dataclass_fields__)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR / "tasks"), version_base="1.3", job_name="causal_loop"):
            cfg = compose("causal_loop", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"invalid causal_loop override(s) {list(overrides)}: {err}; valid keys: {known}") from None
    finally:
        GlobalHydra.instance().clear()
    return coerce_causal_loop(OmegaConf.to_container(cfg, resolve=True))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("usage: python -m uzr.tasks.causal_loop [key=value ...]; keys:",
              ", ".join(CausalLoopSpec.__dataclass_fields__))
        return 0
    try:
        spec = compose_spec(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = generate(spec, progress=True)
    if spec.out is None:
        print(table.slice(0, 3).to_pylist())
        return 0
    to_dataset(table).save_to_disk(spec.out)
    print(f"wrote {table.num_rows} samples to {spec.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
