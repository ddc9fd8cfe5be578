"""The ``svf_eval`` stage: base and every expert on held-out items of every domain, and the adaptation
strategies on the mixed held-out prompts, each with a paired interval against the base model.

- **Accuracy matrix**: rows base + one expert per domain, columns the domains; every cell is greedy
  answers (:func:`uzr.generation.generate_answers`) checked by the domain's checker on the same
  ``svf.eval_items`` held-out items; each expert cell carries ``accuracy_difference(expert, base)``.
- **Strategies** on the union of those held-out items (mixed domains):
  ``oracle_domain`` (the true domain's expert: the ceiling), ``prompt`` (the student names the domain in
  answer to a fixed classification prompt, then that expert answers; no recognisable name: the base model),
  ``classifier`` (multinomial logistic regression on the student's mean-pooled final hidden state, trained
  on the training items' domains), ``cem`` (per domain, per-layer mixing coefficients of the experts found by
  CEM on ``svf.cem_shots`` training examples, scored by the mean log-likelihood of their reference answers).
  Greedy decoding is deterministic, so a routing strategy's answers are the chosen expert's answers from
  the matrix; only ``cem`` decodes again (its mixture is new).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from uzr.adapters.cem import cem
from uzr.adapters.domains import check
from uzr.adapters.reinforce import answer_logprobs
from uzr.adapters.stage import SVFArtifact, SVFStage, formatted, items_for
from uzr.adapters.svf import SVFEdit, SVFTrainable, layer_of, mix_masks
from uzr.attention import decoder_of
from uzr.evaluate.injection import run_injection
from uzr.generation import generate_answers
from uzr.hooks import injected
from uzr.intervals import accuracy_difference
from uzr.masks import pad_sequences
from uzr.qa.prompts import adds_special_tokens, format_prompt, resolve_format
from uzr.stages import UncachedStage
from uzr.timing import Stopwatch

log = logging.getLogger(__name__)
BASE = "base"
CLASSIFY = ("Which kind of question is this? Reply with one word: arithmetic (a word problem with numbers), "
            "facts (a question about the world) or rules (variables updated by rules).\n\nQuestion: {q}")
INJECTION_NOTE = ("attention injection needs a teacher and the harvest/controller stages, which this run does not "
                  "use: svf.injection=true (+experiment=svf_compare) adds its row on these items")
INJECTION_ROW = "attention injection (controller)"
CLASS_WORDS = {"arithmetic": "arithmetic", "facts": "facts", "causal_loop": "rules"}


def answers_correct(model, tok, items, svf, edit=None) -> list[bool]:
    texts, special = formatted(tok, items, svf.prompt_format)
    with injected(model, edit):
        out = generate_answers(model, tok, texts, svf.max_new_tokens, batch_size=16, add_special_tokens=special)
    return [check(it.domain, o["answer"], it.answer) for it, o in zip(items, out)]


class SVFEvalStage(UncachedStage):
    def report(self, run, artifact) -> dict:
        art = run.upstream(SVFStage)
        cfg, svf = run.cfg, run.cfg.svf
        model, tok = run.models.get("student")
        model.eval()
        held = {d: items_for(svf, d, "heldout", svf.eval_items, cfg.seed) for d in svf.domains}
        start = Stopwatch()
        correct: dict[str, dict[str, list[bool]]] = {}
        cell_cpu: dict[str, dict[str, float]] = {}  # CPU seconds of each cell's greedy answers
        for row, edit in [(BASE, None), *[(e, SVFEdit(art.decomp, x.masks())) for e, x in art.experts.items()]]:
            correct[row], cell_cpu[row] = {}, {}
            for d in svf.domains:
                clock = Stopwatch()
                correct[row][d] = answers_correct(model, tok, held[d], svf, edit)
                cell_cpu[row][d] = clock.read()["cpu_seconds"]
        matrix = {row: {d: _cell(c, correct[BASE][d]) if row != BASE else _cell(c) for d, c in cols.items()}
                  for row, cols in correct.items()}
        section = {"domains": list(svf.domains), "eval_items": {d: len(v) for d, v in held.items()}, "matrix": matrix,
                   **{f"matrix_{k}": v for k, v in start.read().items()}, "matrix_cell_cpu_seconds": cell_cpu}
        mixed = [it for d in svf.domains for it in held[d]]
        base_mixed = [c for d in svf.domains for c in correct[BASE][d]]
        params = art.experts[svf.domains[0]].num_parameters
        rows = {BASE: {"correct": base_mixed, "parameters": 0}}
        for e in art.experts:
            rows[f"expert:{e}"] = {"correct": [c for d in svf.domains for c in correct[e][d]], "parameters": params}
        routes = {}
        for strategy in svf.strategies:
            clock = Stopwatch()
            if strategy == "cem":
                ok, extra = cem_strategy(run, art, held, correct)
            else:
                choice = {"oracle_domain": lambda: [it.domain for it in mixed],
                          "prompt": lambda: prompt_routes(model, tok, mixed, svf),
                          "classifier": lambda: classifier_routes(run, model, tok, mixed)}[strategy]()
                routes[strategy] = choice
                ok = [correct[c][it.domain][held[it.domain].index(it)] if c in correct else correct[BASE][it.domain][held[it.domain].index(it)]
                      for it, c in zip(mixed, choice)]
                extra = {"routing_accuracy": float(np.mean([c == it.domain for it, c in zip(mixed, choice)])),
                         "routes": _confusion(mixed, choice)}
            n_params = params * len(svf.mixture or svf.domains) if strategy == "cem" else params
            rows[strategy] = {"correct": ok, "parameters": n_params, **clock.read(), **extra}
        rows.update(baseline_rows(run, held))
        if svf.injection:
            rows[INJECTION_ROW] = injection_row(run, held)
        table = {}
        for name, row in rows.items():
            entry = {"accuracy": float(np.mean(row["correct"])), "n": len(row["correct"]),
                     "trainable_parameters": row["parameters"]}
            if name != BASE:
                diff = accuracy_difference(row["correct"], base_mixed, seed=cfg.seed)
                entry.update(vs_base=diff.as_dict(), verdict=diff.verdict(higher_is_better=True))
            entry.update({k: v for k, v in row.items() if k not in ("correct", "parameters")})
            table[name] = entry
        section["comparison"] = table
        section["pairs"] = pairwise(rows, cfg.seed)
        section["not_compared"] = {} if svf.injection else {"attention injection": INJECTION_NOTE}
        if "svf_baselines" not in run.artifacts:
            section["not_compared"]["lora, ia3"] = "add the svf_baselines stage (stages=[svf,svf_baselines,svf_eval])"
        _tables(run, section)
        if svf.figure:
            run.images["svf_matrix"] = heatmap(run.out_dir / "figures" / "svf_accuracy_matrix.png", matrix, svf.domains)
        return section

    def present(self, run, section: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 160))
        for key, title in (("svf_matrix", "SVF accuracy matrix (held-out, greedy); expert − base [95% paired bootstrap]"),
                           ("svf_comparison", "SVF strategies on mixed held-out prompts, vs base [95% paired bootstrap]")):
            header, rows = run.tables[key]
            table = Table(title=title)
            for column in header:
                table.add_column(column)
            for row in rows:
                table.add_row(*[str(x) for x in row])
            console.print(table)


def _confusion(items, choice) -> dict[str, dict[str, int]]:
    """{true domain: {chosen expert (or base): count}}: where a routing strategy sends each domain's items."""
    out: dict[str, dict[str, int]] = {}
    for it, c in zip(items, choice):
        out.setdefault(it.domain, {}).setdefault(c, 0)
        out[it.domain][c] += 1
    return out


def baseline_rows(run, held: dict) -> dict:
    """``<method> (oracle domain)`` rows: each domain's LoRA / IA3 adapter (stage ``svf_baselines``) answers that
    domain's held-out items, the counterpart of the ``oracle_domain`` strategy."""
    svf = run.cfg.svf
    model, tok = run.models.get("student")
    rows = {}
    for method, per in (run.artifacts.get("svf_baselines") or {}).items():
        clock = Stopwatch()
        ok = [c for d in svf.domains for c in answers_correct(model, tok, held[d], svf, per[d].edit(model))]
        rows[f"{method} (oracle domain)"] = {
            "correct": ok, "parameters": per[svf.domains[0]].plan.parameters, **clock.read(), "lr": {d: b.meta["lr"] for d, b in per.items()},
            "layers": list(per[svf.domains[0]].plan.layers)}
    return rows


def injection_row(run, held: dict) -> dict:
    """The student with the controller's attention injected (``inject.*``, ``alpha.*``; the harvest and controller
    artifacts cached, or built when missing) answering every domain's held-out items; its trainable parameters are
    the controllers'."""
    cfg, svf = run.cfg, run.cfg.svf
    injection = run_injection(run)  # controllers and sinks (inject.sinks=keep), as in the evaluate stage
    controllers = injection.source
    model, tok = run.models.get("student")
    clock = Stopwatch()
    # prompt_len=None: decoding steps count from each prompt's prefill, as in generation elsewhere
    injector = injection.injector(prompt_len=None)
    ok = [c for d in svf.domains for c in answers_correct(model, tok, held[d], svf, injector)]
    return {"correct": ok, "parameters": sum(p.numel() for c in controllers.values() for p in c.parameters()),
            **clock.read(), "layers": sorted(controllers), "alpha": cfg.alpha.value,
            "schedule": cfg.alpha.schedule, "mode": cfg.inject.mode, "sinks": cfg.inject.sinks}


def pairwise(rows: dict, seed: int) -> dict:
    """Every two rows but base, on the same mixed held-out items: ``"A − B"`` -> accuracy difference
    [95% paired bootstrap], McNemar p and verdict, so that e.g. SVF and LoRA are ranked only when their paired
    interval excludes 0. ``rows``: name -> {"correct": (n,) bools in the base row's item order}."""
    names = [name for name in rows if name != BASE]
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = accuracy_difference(rows[a]["correct"], rows[b]["correct"], seed=seed)
            out[f"{a} − {b}"] = {**diff.as_dict(), "verdict": diff.verdict(higher_is_better=True)}
    return out


def _cell(c: list[bool], base: list[bool] | None = None) -> dict:
    out = {"accuracy": float(np.mean(c)) if c else None, "n": len(c), "correct": [bool(x) for x in c]}
    if base is not None and c:
        diff = accuracy_difference(c, base)
        out.update(vs_base=diff.as_dict(), verdict=diff.verdict(higher_is_better=True))
    return out


def _tables(run, section: dict) -> None:
    domains = section["domains"]
    rows = []
    for row, cols in section["matrix"].items():
        cells = []
        for d in domains:
            c = cols[d]
            text = f"{c['accuracy']:.3f}"
            if "vs_base" in c:
                v = c["vs_base"]
                text += f" {v['estimate']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
            cells.append(text)
        rows.append([row, *cells])
    run.tables["svf_matrix"] = (["setting", *domains], rows)
    comp = []
    for name, e in section["comparison"].items():
        v = e.get("vs_base")
        comp.append([name, f"{e['accuracy']:.3f}", f"{e['n']}",
                     f"{v['estimate']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" if v else "-",
                     e.get("verdict", "-"), f"{e['trainable_parameters']}",
                     f"{e['routing_accuracy']:.3f}" if "routing_accuracy" in e else "-"])
    run.tables["svf_comparison"] = (["setting", "accuracy", "n", "vs base", "verdict", "trainable params",
                                     "routing acc."], comp)


def heatmap(path, matrix: dict, domains) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(matrix)
    values = np.array([[matrix[r][d]["accuracy"] for d in domains] for r in names])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(domains), 1.2 + 0.5 * len(names)))
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(domains)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w" if values[i, j] < 0.5 else "k")
    ax.set_xlabel("held-out domain")
    ax.set_title("SVF experts: accuracy")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- strategies
def prompt_routes(model, tok, items, svf) -> list[str]:
    """The student's own answer to a fixed classification prompt -> a domain (or ``base`` when unclear)."""
    style = resolve_format(tok, svf.prompt_format)
    texts = [format_prompt(CLASSIFY.format(q=it.question), tok, style) for it in items]
    out = generate_answers(model, tok, texts, 8, batch_size=16, add_special_tokens=adds_special_tokens(style))
    routes = []
    for o in out:
        said = o["answer"].lower()
        hits = [(m.start(), d) for d, w in CLASS_WORDS.items() if d in svf.domains for m in [re.search(w, said)] if m]
        routes.append(min(hits)[1] if hits else BASE)
    return routes


@torch.no_grad()
def pooled_states(model, tok, texts, batch_size: int = 16) -> np.ndarray:
    """(N, D) mean over each text's tokens of the final hidden state; texts run ``batch_size`` at a time,
    right-padded, the padding left out of the mean (equal to one text at a time up to float rounding)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_sequences([tok(t)["input_ids"] for t in texts[start:start + batch_size]],
                                  tok.pad_token_id or 0)  # (b, S) right-padded
        ids, mask = ids.to(device), mask.to(device)
        h = decoder_of(model)(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (b, S, D)
        out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().numpy())  # (b, D)
    return np.concatenate(out)


def classifier_routes(run, model, tok, items) -> list[str]:
    """Multinomial logistic regression (full-batch Adam, seeded) on mean-pooled final hidden states."""
    cfg, svf = run.cfg, run.cfg.svf
    train = [it for d in svf.domains for it in items_for(svf, d, "train", svf.train_items, cfg.seed)]
    x_tr = torch.tensor(pooled_states(model, tok, formatted(tok, train, svf.prompt_format)[0]))
    x_te = torch.tensor(pooled_states(model, tok, formatted(tok, items, svf.prompt_format)[0]))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    y = torch.tensor([svf.domains.index(it.domain) for it in train])
    torch.manual_seed(cfg.seed)
    lin = torch.nn.Linear(x_tr.shape[1], len(svf.domains))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(svf.classifier_epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin((x_tr - mu) / sd), y).backward()
            opt.step()
    with torch.no_grad():
        pred = lin((x_te - mu) / sd).argmax(-1).tolist()
    return [svf.domains[p] for p in pred]


def cem_strategy(run, art: SVFArtifact, held: dict, correct: dict) -> tuple[list[bool], dict]:
    """Per domain: CEM over (experts, layers) coefficients on ``cem_shots`` training examples, then greedy
    answers of that domain's held-out items with the mixture."""
    cfg, svf = run.cfg, run.cfg.svf
    model, tok = run.models.get("student")
    names = list(svf.mixture or svf.domains)
    masks = [art.experts[d].masks() for d in names]
    layers = sorted({layer_of(n) for n in masks[0]})
    scorer = SVFTrainable(art.decomp)
    ok_all, coeffs = [], {}
    for domain in svf.domains:
        shots = items_for(svf, domain, "train", svf.cem_shots, cfg.seed + 1)
        texts, special = formatted(tok, shots, svf.prompt_format)
        prompts = [tok(t, add_special_tokens=special)["input_ids"] for t in texts]
        answers = [tok(" " + it.answer if not special else it.answer, add_special_tokens=False)["input_ids"] for it in shots]
        n_tokens = sum(len(a) for a in answers)

        def fitness(a: np.ndarray, prompts=prompts, answers=answers, n_tokens=n_tokens) -> float:
            scorer.set_masks(mix_masks(masks, torch.tensor(a, dtype=torch.float32).reshape(len(names), len(layers))))
            with torch.no_grad(), injected(model, scorer):
                totals, _ = answer_logprobs(model, prompts, answers, tok.pad_token_id or 0)
            return float(totals.sum()) / n_tokens

        init = np.full(len(names) * len(layers), 1.0 / len(names))  # the reference's initial values (1/K each)
        initial = fitness(init)
        res = cem(fitness, init, svf.cem_population, svf.cem_elite_ratio, svf.cem_iterations, 0.0, 1.0, cfg.seed)
        coeffs[domain] = {"best_fitness": res.score, "initial_fitness": initial,
                          "mean_coefficient_per_expert": dict(zip(names, res.best.reshape(len(names), -1).mean(1).round(3).tolist()))}
        mixture = mix_masks(masks, torch.tensor(res.best, dtype=torch.float32).reshape(len(names), len(layers)))
        ok_all += answers_correct(model, tok, held[domain], svf, SVFEdit(art.decomp, mixture))
    return ok_all, {"cem": coeffs}
