"""The ``evaluate`` config group: held-out texts, facts QA, extra text and QA domains of the evaluate stage
(torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from uzr.config.checks import check_int, is_int
from uzr.config.corpus import domain_spec
from uzr.config.groups import ConfigGroup
from uzr.qa.attention_bound import KEYS, SPLITS, WORDS, context_override_capacity

# evaluate.qa_domains (uzr/evaluate/qa.py) and the items each scores when evaluate.qa_domain_items is 0
QA_DOMAIN_ITEMS = {"causal_loop": 64, "kv_retrieval": 200, "context_override": 200, "induction": 200}
QA_DOMAINS = tuple(QA_DOMAIN_ITEMS)


@dataclass
class EvaluateSpec:
    num_texts: int = 40  # held-out texts to evaluate (0 = all)
    figure: bool = True
    # Facts QA (uzr/qa/facts.py) on the held-out answerable prompts of the built-in set; the split and
    # prompt format are the gate's (gate.prompt_seed, gate.heldout_fraction, gate.prompt_format), so a
    # prompt-level gate never trains on a QA question.
    facts_qa: bool = True
    qa_prompts: int = 0  # held-out answerable prompts scored (0 = all)
    # Prompts per facts-QA forward pass (each brings its 4 candidates): larger amortises per-call overhead,
    # smaller bounds memory; the scores agree to float rounding for any value. 32 took the least CPU time
    # for SmolLM2-135M on the 93 held-out prompts (8: +37%, 16: +11-16%, 93: +5%; benchmarks/pipeline.py).
    qa_batch_size: int = 32
    # More text domains for bits per byte (conf/data options, e.g. [korean, licenses]), each harvested as its own
    # store (evaluate.num_texts texts) and reported with its own paired interval beside the run's data.
    domains: list[str] = field(default_factory=list)
    # Checkable QA domains scored like facts QA (teacher, student, injected student; 4 candidates, the right one by
    # summed log-likelihood; paired interval of injected minus student; uzr/evaluate/qa.py): causal_loop =
    # uzr.tasks.causal_loop items (levels 1-4, 2-4 variables, at most 3 rounds) whose 3 wrong candidates each move
    # one variable's value; kv_retrieval, context_override, induction = the attention-bound items of
    # uzr/qa/attention_bound.py (the answer is in the prompt), reported per length / position / relation too.
    # [] = none: the default experiment is at its time budget.
    qa_domains: list[str] = field(default_factory=list)
    # The ceiling beside the result: the teacher oracle (inject.source=teacher with the run's targets, layers, mode,
    # alpha, sinks and heads) scored as a further setting on the held-out texts and evaluate.domains, with its paired
    # interval against the student (uzr/evaluate/stage.py). Its rows come from the harvest store: a few more student
    # passes. Nothing is added when inject.source is teacher already.
    oracle: bool = False
    # the oracle on facts QA and evaluate.qa_domains too: prompts have no stored rows, so the teacher reads each one
    # live (uzr.injection.oracle.TeacherPrior). Off in the default experiment: for the packaged pair it took ~16 min
    # for the 203 facts-QA prompts on the shared 2-core CPU (~4.5 s per prompt at load 12-21,
    # experiments/transfer_controls), beyond make run's budget
    oracle_qa: bool = False
    qa_domain_items: int = 0  # items per QA domain; 0 = each domain's default (QA_DOMAIN_ITEMS)
    qa_domain_seed: int = 0  # generator seed of the QA domains' items
    # kv_retrieval passage lengths in facts, cycled (~13 student tokens each: 4 -> ~100 tokens, 16 -> ~250 with the
    # chat template; 128 -> ~1,700). The default keeps 200 items under ~10 min on the 2-core CPU (a pass of the
    # packaged pair costs ~6 CPU s per 1,000 tokens, three passes: teacher, student, injected); longer passages cost
    # in proportion, so measure them with fewer items (experiments/where_transfer_works)
    qa_kv_facts: list[int] = field(default_factory=lambda: [4, 8, 16])
    qa_induction_words: list[int] = field(default_factory=lambda: [16, 32, 64])  # induction list lengths, cycled
    # Where the models look on the attention-bound domains (uzr/evaluate/evidence.py): the share of the answer query's
    # passage attention that lands on the span holding the answer, per layer and head, for teacher, student and
    # injected student, on the first qa_evidence_items held-out items with such a span (one forward each).
    qa_evidence_mass: bool = False
    qa_evidence_items: int = 60
    # Bits per byte by token position on long texts (uzr/evaluate/positions.py): bucket edges in student token
    # positions, starting at 0 and increasing, e.g. [0, 512, 1024, 2048, 4096]; each long text is the last edge
    # long, so a bucket past the student's trained context (max_position_embeddings) measures it there. Teacher,
    # student and injected student per bucket, injected - student with its paired interval over the texts.
    # [] = off. Cost on the 2-core CPU: about 2 min per 4,096-token text for teacher, student and controller
    # (experiments/where_transfer_works); the oracle (inject.source=teacher) adds a live teacher pass per text.
    position_buckets: list[int] = field(default_factory=list)
    position_texts: int = 2  # long texts scored (fewer when the source runs out)
    # where the long texts come from: "" = the run's own data outside its train split (held-out texts and those
    # beyond data.num_texts), else a conf/data option or file:PATH (all its texts); joined in document order
    position_data: str = ""


def validate_evaluate(cfg) -> None:
    ev: EvaluateSpec = cfg.evaluate
    if ev.num_texts < 0:
        raise ValueError(f"evaluate.num_texts={ev.num_texts} must be >= 0 (0 = all held-out texts)")
    if ev.qa_prompts < 0:
        raise ValueError(f"evaluate.qa_prompts={ev.qa_prompts} must be >= 0 (0 = all held-out QA prompts)")
    if ev.qa_batch_size < 1:
        raise ValueError(f"evaluate.qa_batch_size={ev.qa_batch_size} must be >= 1 (prompts per facts-QA batch)")
    unknown = [d for d in ev.qa_domains if d not in QA_DOMAINS]
    if unknown or len(set(ev.qa_domains)) != len(ev.qa_domains):
        raise ValueError(f"evaluate.qa_domains={list(ev.qa_domains)} is invalid (unknown: {unknown}); valid: distinct "
                         f"names from {', '.join(QA_DOMAINS)}, or [] for none")
    if ev.oracle_qa and not ev.oracle:
        raise ValueError("evaluate.oracle_qa=true scores the oracle on QA beside its bits per byte: set evaluate.oracle=true "
                         "too (or evaluate.oracle_qa=false)")
    check_int("evaluate.qa_domain_items", ev.qa_domain_items, minimum=0)
    check_int("evaluate.qa_domain_seed", ev.qa_domain_seed, minimum=0)
    check_int("evaluate.qa_evidence_items", ev.qa_evidence_items, minimum=1)
    for key, lengths, most, what in (("qa_kv_facts", ev.qa_kv_facts, len(KEYS), "distinct keys"),
                                     ("qa_induction_words", ev.qa_induction_words, len(WORDS), "distinct words")):
        if not lengths or not all(is_int(n) and 4 <= n <= most for n in lengths):
            raise ValueError(f"evaluate.{key}={list(lengths)} is invalid; valid: a non-empty list of integers in "
                             f"[4, {most}] (3 wrong candidates from the same prompt; {most} {what})")
    if "context_override" in ev.qa_domains:
        most = min(context_override_capacity(ev.qa_domain_seed, split) for split in SPLITS)
        check_int("evaluate.qa_domain_items", ev.qa_domain_items or QA_DOMAIN_ITEMS["context_override"], maximum=most,
                  valid=f"an integer <= {most}, the distinct counterfactual items context_override has per split at "
                        f"evaluate.qa_domain_seed={ev.qa_domain_seed} (0 = the default {QA_DOMAIN_ITEMS['context_override']})")
    validate_position_buckets(ev)
    if len(set(ev.domains)) != len(ev.domains):
        raise ValueError(f"evaluate.domains={ev.domains} names a domain twice")
    for name in ev.domains:
        domain_spec(name)
    if cfg.data is not None and cfg.data.name in ev.domains:
        raise ValueError(f"evaluate.domains={ev.domains} names the run's own data ({cfg.data.name!r}), "
                         "which is evaluated anyway; drop it from evaluate.domains")


def validate_position_buckets(ev: EvaluateSpec) -> None:
    """``evaluate.position_buckets``: [] or integer edges from 0, increasing; ``position_texts`` >= 1;
    ``position_data`` "" or a text source."""
    edges = list(ev.position_buckets)
    fix = _position_fix(edges)
    if fix:
        raise ValueError(f"evaluate.position_buckets={edges} is invalid; valid: [] (off) or at least 2 integer edges "
                         f"in student token positions, from 0 and strictly increasing, e.g. [0, 512, 1024, 2048]; "
                         f"{fix}")
    check_int("evaluate.position_texts", ev.position_texts, minimum=1)
    if ev.position_data:
        domain_spec(ev.position_data, "evaluate.position_data")


def _position_fix(edges: list) -> str | None:
    """What is wrong with bucket edges and how to fix it; None when they are valid."""
    if not edges:
        return None
    if not all(is_int(e) for e in edges):
        return "give whole token positions"
    if any(e < 0 for e in edges):
        return f"drop the negative edges: {[e for e in edges if e >= 0]}"
    if len(set(edges)) != len(edges):
        return "drop the repeated edges"
    if sorted(edges) != edges:
        return f"sort them: {sorted(edges)}"
    if edges[0] != 0:
        return f"start at 0: {[0, *edges]}"
    return None if len(edges) >= 2 else "add an end, e.g. [0, 512]"


CONFIG_GROUPS = (ConfigGroup("evaluate", EvaluateSpec, validate_evaluate, always=True),)
