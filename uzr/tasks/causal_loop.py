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

Generation is vectorised: a chunk's samples are grouped by (level, V), their rules drawn and simulated
as numpy arrays over the group, and their text built as a matrix of token ids over a small vocabulary
that :func:`render` turns into an Arrow string column without a Python loop over samples.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uzr.config.tasks import CYCLIC_LEVELS, MIN_VARS, CausalLoopSpec, coerce_causal_loop

LETTERS = "ABCDEFGH"

# ---------------------------------------------------------------- rules
COPY, ADD, SUB, MUL, MOD, HALF, ADD2, SUB2, MAX2, MIN2, COND = range(11)
BINARY = (ADD2, SUB2, MAX2, MIN2)
UNARY_OPS = {1: (ADD, SUB, MUL), 2: (ADD, SUB, MUL, MOD, HALF, COPY), 3: (ADD, SUB, MUL),
             4: (ADD, SUB, MUL, MOD, HALF, COPY)}
COND_FRACTION = 1 / 3  # level 4: share of unary rules made conditional on another variable
MAX_ABS = 999_999  # numbers are rendered with at most 6 digits


def apply_rule(op, a, b, k, t):
    """Value of a rule, elementwise: ``op`` code, ``a`` = its first source, ``b`` its second source (the
    condition variable of ``COND``), ``k`` its constant, ``t`` the condition threshold. Python semantics
    for ``%`` and ``//`` (floor), as numpy's integer ops."""
    return np.select(
        [op == COPY, op == ADD, op == SUB, op == MUL, op == MOD, op == HALF,
         op == ADD2, op == SUB2, op == MAX2, op == MIN2],
        [a, a + k, a - k, a * k, a % np.maximum(k, 1), a // 2,
         a + b, a - b, np.maximum(a, b), np.minimum(a, b)],
        default=np.where(b > t, a + k, a))


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


def step(state: np.ndarray, rules: Rules, order: np.ndarray | None) -> np.ndarray:
    """One round. state: (n, V) int64 by role. ``order`` (n, R): listing order for sequential update
    (rule indices); None = parallel. Returns the new state (n, V)."""
    def value(src_state, idx):
        pick = (lambda a: a[:, idx]) if order is None else (lambda a: np.take_along_axis(a, idx, 1))
        a = np.take_along_axis(src_state, pick(rules.s1), 1)
        b = np.take_along_axis(src_state, pick(rules.s2), 1)
        v = apply_rule(pick(rules.op), a, b, pick(rules.k), pick(rules.t))
        m = rules.modulus[:, None]
        return np.where(m > 0, v % np.maximum(m, 1), v), pick(rules.tgt)

    if order is None:  # all rules at once, from the previous values
        v, tgt = value(state, slice(None))
        new = state.copy()
        np.put_along_axis(new, tgt, v, 1)
        return new
    new = state.copy()
    for p in range(order.shape[1]):  # in listed order, each from the newest values
        v, tgt = value(new, order[:, p:p + 1])
        np.put_along_axis(new, tgt, v, 1)
    return new


def simulate(start: np.ndarray, rules: Rules, order: np.ndarray | None, rounds: int) -> np.ndarray:
    """States after 0..rounds rounds: (rounds + 1, n, V)."""
    traj = [start]
    for _ in range(rounds):
        traj.append(step(traj[-1], rules, order))
    return np.stack(traj)


def settled_round(traj: np.ndarray) -> np.ndarray:
    """Per sample, the first round r with state r == state r+1 (a fixed point), or -1 if none. (n,)"""
    same = (traj[1:] == traj[:-1]).all(-1)  # (rounds, n)
    return np.where(same.any(0), same.argmax(0), -1)


# ---------------------------------------------------------------- text as token ids
PARALLEL_TEXT = "Each round applies every rule at once to the previous round's values."
SEQUENTIAL_TEXT = "Each round applies the rules one by one in the order listed, each using the newest values."
VOCAB = ["", "-", *"0123456789", *LETTERS, "=", ", ", ". ", "; ", " = ", " + ", " - ", " * ", " % ", " // 2",
         "max(", "min(", ")", " if ", " > ", " else ", "Start: ", "Rules: ", PARALLEL_TEXT, SEQUENTIAL_TEXT,
         " All values are taken modulo ", ".", " What are the values once nothing changes?",
         " What are the values after ", " round?", " rounds?", " Answer as A=.., B=.., for every variable."]
ID = {w: i for i, w in enumerate(VOCAB)}
PAD, DIGIT0, LETTER0 = ID[""], ID["0"], ID["A"]
TOKEN = np.uint8  # token ids (the vocabulary has < 256 words)
_VOCAB_ARROW, _EMPTY = pa.array(VOCAB, pa.large_string()), pa.scalar("", pa.large_string())
OP_TOKEN = {ADD: " + ", SUB: " - ", MUL: " * ", MOD: " % ", HALF: " // 2", ADD2: " + ", SUB2: " - ",
            MAX2: ", ", MIN2: ", ", COND: " + "}
_OP_TOKEN = np.full(COND + 1, PAD, TOKEN)
for _code, _word in OP_TOKEN.items():
    _OP_TOKEN[_code] = ID[_word]


def render(tokens: np.ndarray) -> pa.LargeStringArray:
    """Token ids (n, L) -> Arrow strings, one per row: the concatenation of the row's vocabulary words
    (gathered and joined by Arrow's kernels, no Python loop over rows)."""
    keep = tokens != PAD
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1, dtype=np.int64))])
    words = _VOCAB_ARROW.take(pa.array(tokens[keep]))
    return pc.binary_join(pa.LargeListArray.from_arrays(offsets, words), _EMPTY)


def _digits(values: np.ndarray) -> np.ndarray:
    a = np.abs(values)
    out = np.full((*values.shape, 7), PAD, TOKEN)
    out[..., 0] = np.where(values < 0, ID["-"], PAD)
    for i, p in enumerate(range(5, -1, -1)):
        out[..., i + 1] = np.where((a >= 10 ** p) | (p == 0), DIGIT0 + (a // 10 ** p) % 10, PAD)
    return out


_SMALL = 9999
_NUMBER_TABLE = _digits(np.arange(-_SMALL, _SMALL + 1))


def number_tokens(values: np.ndarray) -> np.ndarray:
    """Integers (...,) -> token ids (..., 7): sign, then up to 6 digits without leading zeros."""
    biggest = np.abs(values).max(initial=0)
    if biggest > MAX_ABS:
        raise OverflowError(f"a causal-loop value exceeds {MAX_ABS}; lower max_vars")
    return _NUMBER_TABLE[values + _SMALL] if biggest <= _SMALL else _digits(values)


def _const(token: str, n: int) -> np.ndarray:
    return np.full((n, 1), ID[token], TOKEN)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, 1, dtype=TOKEN, casting="unsafe")


def state_tokens(state: np.ndarray, sep_last: str) -> np.ndarray:
    """Values in letter order (n, V) -> ``A=3, B=0, ...`` + sep_last, as tokens (n, 10 V)."""
    n, V = state.shape
    nums = number_tokens(state)
    parts = []
    for j in range(V):
        parts += [_const(LETTERS[j], n), _const("=", n), nums[:, j], _const(", " if j < V - 1 else sep_last, n)]
    return _cat(parts)


def rule_tokens(rules: Rules, letter_of: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Tokens (n, 28) of rule index r (n,) per sample, e.g. ``D = C + 1 if A > 3 else C``."""
    def at(a):
        return np.take_along_axis(a, r[:, None], 1)[:, 0]
    op, k, t = at(rules.op), at(rules.k), at(rules.t)
    name = lambda role: LETTER0 + np.take_along_axis(letter_of, role[:, None], 1)  # noqa: E731
    s1, s2 = name(at(rules.s1)), name(at(rules.s2))
    binary, cond = np.isin(op, BINARY)[:, None], (op == COND)[:, None]
    opc = op[:, None]
    return _cat([
        name(at(rules.tgt)), _const(" = ", len(op)),
        np.where(opc == MAX2, ID["max("], np.where(opc == MIN2, ID["min("], PAD)),
        s1, _OP_TOKEN[opc], np.where(binary, s2, PAD),
        np.where(binary | (opc == HALF) | (opc == COPY), PAD, number_tokens(k)),
        np.where((opc == MAX2) | (opc == MIN2), ID[")"], PAD),
        np.where(cond, ID[" if "], PAD), np.where(cond, s2, PAD), np.where(cond, ID[" > "], PAD),
        np.where(cond, number_tokens(t), PAD), np.where(cond, ID[" else "], PAD), np.where(cond, s1, PAD)])


# ---------------------------------------------------------------- one group, one chunk
def generate_group(rng: np.random.Generator, spec: CausalLoopSpec, level: int, n: int, V: int) -> dict:
    """``n`` samples of ``level`` with ``V`` variables: token matrices ``prompt`` and ``answer``, ``steps``
    (n,) and ``trajectory`` (n, rounds + 1, V), the states after each round in letter order."""
    rules = draw_rules(rng, level, n, V, (spec.min_modulus, spec.max_modulus))
    R = rules.op.shape[1]
    cyclic = level in CYCLIC_LEVELS
    start = rng.integers(0, rules.modulus[:, None] if cyclic else 10, (n, V))
    order = np.argsort(rng.random((n, R)), 1)  # listing order of the rules (sequential update order)
    rounds = spec.max_rounds if cyclic else V  # acyclic: depth <= V - 1 rounds, one more shows it settled
    traj = simulate(start, rules, None if spec.update == "parallel" else order, rounds)
    settled = settled_round(traj)
    if cyclic:
        fixed = (settled >= 1) & (rng.random(n) < spec.fixed_point_fraction)
        steps = np.where(fixed, settled, rng.integers(1, spec.max_rounds + 1, n))
    else:
        assert (settled >= 0).all(), "an acyclic system did not settle"
        fixed, steps = np.ones(n, bool), settled
    letter_of = np.argsort(rng.random((n, V)), 1)  # role -> letter index
    traj_letters = np.empty_like(traj)
    np.put_along_axis(traj_letters, np.broadcast_to(letter_of, traj.shape), traj, 2)
    traj_letters = traj_letters.transpose(1, 0, 2)  # (n, rounds + 1, V)

    rule_parts = []
    for p in range(R):
        rule_parts += [rule_tokens(rules, letter_of, order[:, p]), _const("; " if p < R - 1 else ". ", n)]
    after = _cat([_const(" What are the values after ", n), number_tokens(steps),
                  np.where(steps[:, None] == 1, ID[" round?"], ID[" rounds?"])])
    settle = np.full_like(after, PAD)
    settle[:, 0] = ID[" What are the values once nothing changes?"]
    modulus = [_const(" All values are taken modulo ", n), number_tokens(rules.modulus), _const(".", n)]
    prompt = _cat([
        _const("Start: ", n), state_tokens(traj_letters[:, 0], ". "), _const("Rules: ", n), *rule_parts,
        _const(PARALLEL_TEXT if spec.update == "parallel" else SEQUENTIAL_TEXT, n), *(modulus if cyclic else []),
        np.where(fixed[:, None], settle, after), _const(" Answer as A=.., B=.., for every variable.", n)])
    answer = state_tokens(traj_letters[np.arange(n), steps], "")
    return {"prompt": prompt, "answer": answer, "steps": steps, "trajectory": traj_letters}


_MIN_VARS = np.array([MIN_VARS.get(lv, 0) for lv in range(max(MIN_VARS) + 1)])


def _scatter(rows: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """(index, token matrix (k, w)) pairs -> one (n, max w) matrix, rows at their index, padded."""
    out = np.full((n, max(m.shape[1] for _, m in rows)), PAD, TOKEN)
    for index, m in rows:
        out[index, :m.shape[1]] = m
    return out


def generate_chunk(rng: np.random.Generator, spec: CausalLoopSpec, n: int) -> pa.Table:
    """``n`` samples in draw order: level uniform over ``spec.levels``, V uniform per level."""
    levels = np.asarray(spec.levels)[rng.integers(0, len(spec.levels), n)]
    nvars = rng.integers(_MIN_VARS[levels], spec.max_vars + 1)
    groups = []
    for level in spec.levels:
        for V in range(MIN_VARS[level], spec.max_vars + 1):
            where = np.flatnonzero((levels == level) & (nvars == V))
            if len(where):
                groups.append((where, generate_group(rng, spec, level, len(where), V)))
    steps = np.zeros(n, np.int64)
    for where, g in groups:
        steps[where] = g["steps"]
    V = nvars.astype(np.int64)
    columns = {
        "prompt": render(_scatter([(w, g["prompt"]) for w, g in groups], n)),
        "answer": render(_scatter([(w, g["answer"]) for w, g in groups], n)),
        "level": pa.array(levels.astype(np.int32)),
        "variables": pa.LargeListArray.from_arrays(
            np.concatenate([[0], np.cumsum(V)]),
            pa.array(np.asarray(list(LETTERS))[(np.arange(V.max())[None, :] < V[:, None]).nonzero()[1]])),
        "steps": pa.array(steps.astype(np.int32)),
    }
    if spec.trajectory:
        trajs = [g["trajectory"] for _, g in groups]  # (k, rounds + 1, V) per group
        width = max(t.shape[2] for t in trajs)
        full = np.zeros((n, max(t.shape[1] for t in trajs), width), np.int64)
        for where, g in groups:
            full[where, :g["trajectory"].shape[1], :g["trajectory"].shape[2]] = g["trajectory"]
        keep = (np.arange(full.shape[1])[None, :, None] <= steps[:, None, None]) & \
               (np.arange(width)[None, None, :] < V[:, None, None])
        inner = pa.LargeListArray.from_arrays(
            np.concatenate([[0], np.cumsum(np.repeat(V, steps + 1))]), pa.array(full[keep].astype(np.int32)))
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

    from uzr.config.run import CONF_DIR

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
