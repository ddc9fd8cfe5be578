"""The ``svf`` config group: singular-value experts (Transformer²) trained per domain, mixed, compared.

Torch-free; :func:`validate_svf` checks every field, and the experts named in ``svf.experts`` against the
student (reading their JSON metadata only), before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from uzr.config.checks import check_bool, check_choice, check_float, check_int, invalid, is_int, is_number
from uzr.config.groups import ConfigGroup
from uzr.config.keys import NOT_KEYED, keyed_only_by

DOMAINS = ("arithmetic", "facts", "causal_loop")
MATRICES = ("mlp", "attn", "mlp+attn")
OBJECTIVES = ("reinforce", "distill")
REWARDS = ("binary", "graded")
BASELINES_REINFORCE = ("none", "prompt_mean")  # uzr.adapters.domains.reward: the reference's ±1, or 2 * partial credit - 1
STRATEGIES = ("prompt", "classifier", "cem", "oracle_domain")
PROMPT_FORMATS = ("qa", "chat", "auto")
BASELINES = ("lora", "ia3")  # peft adapters at the SVF expert's parameter budget (uzr.adapters.peft_edit)


@dataclass
class SVFSpec:
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))  # one expert per domain
    matrices: str = "mlp"  # mlp | attn | mlp+attn (the reference adapts MLP matrices only)
    layers: list[int] | None = None  # decoder layers adapted (None = every layer)
    # reinforce: rewards from the domain's checker (svf.reward); distill: KL(teacher || student) of the next-token
    # distributions over the teacher's greedy answers to the training prompts (needs a teacher sharing the
    # student's vocabulary)
    objective: str = "reinforce"
    reward: str = "binary"  # binary: the reference's ±1 | graded: 2 * partial credit - 1 (uzr.adapters.domains.credit)
    # none: REINFORCE on the raw reward (the reference) | prompt_mean: minus the mean reward of the prompt's samples,
    # so a prompt whose samples all score alike adds nothing (needs samples_per_prompt >= 2)
    baseline: str = "none"
    init_z: float = 0.1  # the reference's init_val; uniform, so the initial expert is the base model exactly
    lr: float = 2e-3  # Adam, the reference's
    clip: float = 1e-3  # gradient-norm clip, the reference's
    kl_weight: float = 0.0  # KL(base || expert) on the sampled answers; the reference's default is off
    samples_per_prompt: int = 4  # sampled answers per training prompt
    prompts_per_step: int = 4
    epochs: int = 2  # passes over the train_items training prompts of a domain (a checkpoint after each)
    train_items: int = 32  # training prompts per domain
    # held-out prompts per domain (every expert, strategy and the base model see the same): the evaluation only
    eval_items: int = field(default=40, metadata=NOT_KEYED)
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling temperature of the training answers (evaluation is greedy)
    heldout_fraction: float = 0.25  # train / held-out split of each domain (a hash of the question)
    prompt_format: str = "auto"  # qa | chat | auto (chat when the tokenizer has a chat template)
    causal_levels: list[int] = field(default_factory=lambda: [1])  # causal-loop levels asked
    causal_max_vars: int = 3
    # Pre-trained experts {domain: folder holding expert.json + expert.safetensors}, used instead of training.
    # Keyed by the sha256 of each expert's weights instead (uzr.adapters.stage).
    experts: dict[str, str] = field(default_factory=dict, metadata=NOT_KEYED)
    # The evaluation (stage svf_eval, not cached) from here on; only the LoRA / IA3 fields below key svf_baselines.
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), metadata=NOT_KEYED)
    # domains whose experts CEM mixes (None = every domain); distinct
    mixture: list[str] | None = field(default=None, metadata=NOT_KEYED)
    cem_population: int = field(default=32, metadata=NOT_KEYED)
    cem_elite_ratio: float = field(default=0.2, metadata=NOT_KEYED)
    cem_iterations: int = field(default=50, metadata=NOT_KEYED)
    # few-shot examples per domain that CEM scores a mixture on (taken from train)
    cem_shots: int = field(default=4, metadata=NOT_KEYED)
    # full-batch epochs of the pooled-hidden-state domain classifier
    classifier_epochs: int = field(default=200, metadata=NOT_KEYED)
    figure: bool = field(default=True, metadata=NOT_KEYED)
    # LoRA / IA3 baselines (stage svf_baselines): same domains, objective, items, epochs and clip as the experts, as
    # many layers as fit in one expert's parameter count; lr chosen per method and domain on val_items validation
    # prompts (train split, after the training prompts), never on the held-out items.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata=keyed_only_by("svf_baselines"))
    baseline_lrs: list[float] = field(default_factory=lambda: [5e-4, 2e-3, 1e-2],
                                      metadata=keyed_only_by("svf_baselines"))
    val_items: int = field(default=16, metadata=keyed_only_by("svf_baselines"))
    lora_rank: int = field(default=1, metadata=keyed_only_by("svf_baselines"))
    # svf_eval also scores the attention-injected student (the controller of the harvest / controller stages, at the
    # run's inject.* and alpha.* settings, cached or built) on the same held-out items: +experiment=svf_compare
    injection: bool = field(default=False, metadata=NOT_KEYED)


def validate_svf(s: SVFSpec, student_name: str | None = None, num_layers: int | None = None) -> None:
    """Raise ValueError naming the ``svf.<field>``, its value and what is valid."""

    def key(name: str) -> str:
        return f"svf.{name}"

    def bad(name: str, valid: str) -> ValueError:
        return invalid(key(name), getattr(s, name), valid)

    unknown = [d for d in s.domains if d not in DOMAINS]
    if not s.domains or unknown:
        raise ValueError(f"svf.domains={list(s.domains)!r}: unknown domain(s) {unknown}; valid domains: {', '.join(DOMAINS)}")
    if len(set(s.domains)) != len(s.domains):
        raise bad("domains", "each domain at most once (one expert per domain)")
    check_choice(key("matrices"), s.matrices, MATRICES)
    check_choice(key("objective"), s.objective, OBJECTIVES)
    check_choice(key("baseline"), s.baseline, BASELINES_REINFORCE,
                 " | ".join(BASELINES_REINFORCE) + " (REINFORCE's reward baseline)")
    if s.baseline == "prompt_mean" and is_int(s.samples_per_prompt) and s.samples_per_prompt < 2:
        raise bad("samples_per_prompt", "an integer >= 2 with svf.baseline=prompt_mean (one sample is its own mean)")
    check_choice(key("reward"), s.reward, REWARDS,
                 " | ".join(REWARDS) + " (binary: the reference's ±1; graded: 2 * partial credit - 1)")
    if s.layers is not None:
        if not s.layers or len(set(s.layers)) != len(s.layers):
            raise bad("layers", "null (every layer) or a non-empty list of distinct layer indices")
        if num_layers is not None and any(not 0 <= x < num_layers for x in s.layers):
            raise bad("layers", f"indices in 0..{num_layers - 1} (the student's layers)")
    for name in ("lr", "clip", "temperature"):
        check_float(key(name), getattr(s, name), low=0, open_low=True, valid="a number > 0")
    check_float(key("kl_weight"), s.kl_weight, low=0, valid="a number >= 0 (0 = off, the reference's default)")
    for name in ("samples_per_prompt", "prompts_per_step", "epochs", "train_items", "eval_items", "max_new_tokens",
                 "cem_iterations", "cem_shots", "classifier_epochs", "causal_max_vars"):
        check_int(key(name), getattr(s, name), minimum=1)
    bad_baselines = [x for x in s.baselines if x not in BASELINES]
    if bad_baselines or len(set(s.baselines)) != len(s.baselines):
        raise ValueError(f"svf.baselines={list(s.baselines)!r}: unknown or repeated {bad_baselines or 'entries'}; "
                         f"valid baselines: {', '.join(BASELINES)} (or [] for none)")
    lrs = list(s.baseline_lrs)
    if not lrs or any(not is_number(v) or v <= 0 for v in lrs) or len(set(lrs)) != len(lrs):
        raise bad("baseline_lrs", "a non-empty list of distinct numbers > 0 (the learning rates swept)")
    for name in ("val_items", "lora_rank"):
        check_int(key(name), getattr(s, name), minimum=1)
    if not 0 < s.heldout_fraction < 1:
        raise bad("heldout_fraction", "a number in (0, 1)")
    check_choice(key("prompt_format"), s.prompt_format, PROMPT_FORMATS)
    if not s.causal_levels or any(lv not in (1, 2, 3, 4) for lv in s.causal_levels):
        raise bad("causal_levels", "a non-empty list drawn from [1, 2, 3, 4]")
    bad_strategies = [x for x in s.strategies if x not in STRATEGIES]
    if bad_strategies or len(set(s.strategies)) != len(s.strategies):
        raise ValueError(f"svf.strategies={list(s.strategies)!r}: unknown or repeated {bad_strategies or 'entries'}; "
                         f"valid strategies: {', '.join(STRATEGIES)}")
    if s.mixture is not None:
        dup = sorted({d for d in s.mixture if list(s.mixture).count(d) > 1})
        if dup:
            raise ValueError(f"svf.mixture={list(s.mixture)!r} lists the expert(s) {dup} more than once; a mixture "
                             "needs distinct experts (the reference's Llama-3 config repeats one)")
        missing = [d for d in s.mixture if d not in s.domains]
        if len(s.mixture) < 2 or missing:
            raise ValueError(f"svf.mixture={list(s.mixture)!r}: needs >= 2 distinct experts from svf.domains="
                             f"{list(s.domains)} (not there: {missing})")
    if s.cem_population < 2 or not 2 <= int(s.cem_elite_ratio * s.cem_population) <= s.cem_population:
        raise ValueError(f"svf.cem_population={s.cem_population} x svf.cem_elite_ratio={s.cem_elite_ratio} must "
                         "keep at least 2 elites")
    check_bool(key("injection"), s.injection)
    _validate_experts(s, student_name)


def _validate_experts(s: SVFSpec, student_name: str | None) -> None:
    """Every pre-trained expert: a known domain, distinct folders, made for this student and these matrices."""
    folders: dict[str, str] = {}
    for domain, folder in s.experts.items():
        key = f"svf.experts.{domain}"
        if domain not in s.domains:
            raise ValueError(f"{key}: domain {domain!r} is not in svf.domains={list(s.domains)}; valid domains: "
                             f"{', '.join(DOMAINS)}")
        resolved = str(Path(folder).expanduser().resolve())
        if resolved in folders:
            raise ValueError(f"{key}={folder!r} is the same expert as svf.experts.{folders[resolved]}: experts must "
                             "be distinct")
        folders[resolved] = domain
        meta_path = Path(resolved) / "expert.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{key}={folder!r}: cannot read {meta_path} ({err}); point it to a folder holding "
                             "expert.json and expert.safetensors") from None
        want = {"student": student_name, "matrices": s.matrices, "domain": domain}
        for field_name, now in want.items():
            if now is not None and meta.get(field_name) != now:
                raise ValueError(f"{key}={folder!r} is an expert for {field_name}={meta.get(field_name)!r}, this run "
                                 f"needs {field_name}={now!r}: it was made for another model or setting")
        if s.layers is not None and meta.get("layers") != sorted(s.layers):
            raise ValueError(f"{key}={folder!r} adapts layers {meta.get('layers')}, svf.layers={sorted(s.layers)}")


def vocabulary_source(spec) -> tuple | None:
    """What fixes a model spec's vocabulary, known without loading it: the tiny tokenizer's name or the GGUF
    package file; ``None`` for hub models (two hub ids may share one vocabulary: compared once loaded)."""
    if spec.source == "tiny":
        return ("tiny", spec.tokenizer)
    if spec.source == "gguf_package":
        return ("gguf_package", spec.gguf_package, spec.gguf_file)
    return None


def validate_distill(s: SVFSpec, teacher, student) -> None:
    """``svf.objective=distill`` needs a teacher group whose vocabulary is the student's (next-token
    distributions are compared token for token)."""
    if s.objective != "distill":
        return
    fix = ("use a teacher that shares the student's tokenizer (e.g. teacher=gemma3_270m student=gemma3_270m, the "
           "positive-control pair, or teacher=tiny_gemma3 student=tiny_qwen2), or svf.objective=reinforce")
    if teacher is None:
        raise ValueError(f"svf.objective='distill' reads the teacher group, which this config lacks; add "
                         f"teacher=<option>: {fix}")
    a, b = vocabulary_source(teacher), vocabulary_source(student)
    if a is not None and b is not None and a != b:
        raise ValueError(f"svf.objective='distill' needs one vocabulary, but teacher={teacher.name} ({a[-1]}) and "
                         f"student={student.name} ({b[-1]}) tokenize differently: {fix}")


def injection_needs(cfg) -> dict[str, str]:
    """The svf_eval stage's needs that depend on settings: the controller (and its harvest) for the injection row."""
    if cfg.svf is None or not cfg.svf.injection:
        return {}
    return {"controller": "svf.injection=true scores the attention-injected student, which needs the controller"}


def validate_svf_injection(cfg) -> None:
    """``svf.injection=true`` injects the controller at ``alpha.*`` without a gate."""
    if cfg.svf.injection and cfg.alpha is not None and cfg.alpha.schedule == "gated":
        raise ValueError("svf.injection=true with alpha.schedule='gated': the SVF table injects the controller "
                         "without the gate stage; valid schedules here: constant, linear, cosine, entropy_local")


def validate_svf_group(cfg) -> None:
    """The svf group, with the student's depth and vocabulary and the teacher when the run reads them."""
    student = cfg.student
    validate_svf(cfg.svf, student and student.name, student and student.loaded_layers)
    validate_distill(cfg.svf, cfg.teacher, student)
    validate_svf_injection(cfg)


CONFIG_GROUPS = (ConfigGroup("svf", SVFSpec, validate_svf_group),)
