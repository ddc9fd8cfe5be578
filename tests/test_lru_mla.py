"""The LRU/MLA ablation: models, cache, matched sizes, training on level-1 tasks, config validation, halting start."""

from __future__ import annotations

import json
import re

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import resolved
from uzr.config.lru_mla import GROUPS, LRUMLASpec
from uzr.reasoning.lru import initial_steps
from uzr.reasoning.mla import LatentAttention
from uzr.reasoning.tiny_lm import Shape, TinyLM, build, matched_widths
from uzr.tasks.causal_loop import generate, score_answer
from uzr.tasks.compact import BOS, EOS, SEP, CharCodec, compact_answer, compact_prompt

SMALL = LRUMLASpec(d_model=32, layers=2, heads=2, head_dim=8, rope_dim=4, kv_rank=16, max_steps=5)
VOCAB = CharCodec().vocab_size


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lru_layers(model: TinyLM) -> list[LatentAttention]:
    return [b.attn for b in model.blocks if isinstance(b.attn, LatentAttention) and b.attn.lru is not None]


@pytest.mark.parametrize("group", ["mla_lru_fixed", "mla_lru_act"])
def test_with_the_lru_off_c_and_d_reduce_to_b_exactly(group):
    ffn = matched_widths(SMALL, VOCAB)["mla"][0]
    torch.manual_seed(0)
    b = TinyLM(SMALL, Shape("mla", VOCAB, ffn))
    c = TinyLM(SMALL, Shape(group, VOCAB, ffn))
    missing, unexpected = c.load_state_dict(b.state_dict(), strict=False)
    assert not unexpected and missing and all(".lru." in k for k in missing)  # B + the LRU, nothing else
    ids = torch.randint(4, VOCAB, (3, 17))
    with torch.no_grad():
        on = c(ids).logits
        for attn in _lru_layers(c):
            attn.use_lru = False
        assert torch.equal(c(ids).logits, b(ids).logits)
    assert not torch.allclose(on, b(ids).logits, atol=1e-3)  # and the LRU on does change the model


@pytest.mark.parametrize("group", GROUPS)
def test_decoding_with_the_kv_or_latent_cache_equals_full_recompute(group):
    torch.manual_seed(1)
    model = build(SMALL, group, VOCAB, seed=1).eval()
    for attn in _lru_layers(model):  # a halting unit that reads the state: positions halt at different steps
        torch.nn.init.normal_(attn.lru.halt.weight, std=1.0)
        torch.nn.init.normal_(attn.lru.mix.weight, std=0.3)
    ids = torch.randint(4, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids)
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        for i in range(6, 14):
            out = model(ids[:, i:i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=1e-5)
    if group == "mla_lru_act":
        halted = full.refined[0].halted.steps
        assert halted.min() < halted.max()  # the check covers positions that halted early and late


def test_groups_are_matched_in_parameters_and_the_latent_cache_is_smaller():
    widths = matched_widths(LRUMLASpec(), VOCAB)
    counts = [p for _, p in widths.values()]
    assert max(counts) - min(counts) <= 0.02 * max(counts)
    assert widths["mla"][0] > widths["mla_lru_fixed"][0]  # the LRU's parameters come out of B's MLP width
    mha, mla = (build(SMALL, g, VOCAB, 0).eval() for g in ("baseline", "mla"))
    ids = torch.randint(4, VOCAB, (1, 9))
    with torch.no_grad():
        kv, latent = mha(ids, use_cache=True).cache[0], mla(ids, use_cache=True).cache[0]
    assert latent.c_kv.numel() + latent.k_pe.numel() < kv.k.numel() + kv.v.numel()


def test_compact_encoding_keeps_what_the_scorer_reads():
    table = generate({"n": 200, "levels": [1, 2, 3, 4], "seed": 3, "max_vars": 5, "update": "sequential"})
    for prompt, answer in zip(table["prompt"].to_pylist(), table["answer"].to_pylist()):
        short = compact_prompt(prompt)
        assert " " not in short and short.split("|")[2] == "s"
        assert score_answer(compact_answer(answer), answer) == (True, 1.0)
    assert compact_prompt("Start: A=1, B=2. Rules: B = A + 1 if A > 0 else A. Each round applies every rule at once "
                          "to the previous round's values. All values are taken modulo 7. What are the values after "
                          "3 rounds? Answer as A=.., B=.., for every variable.") == "A=1,B=2|B=A+1?A>0:A|p|%7|r3"
    ids, sep = CharCodec().sequences(["Start: A=1, B=2, C=3. Rules: B = A + 1. Each round applies every rule at once "
                                      "to the previous round's values. What are the values once nothing changes?"],
                                     ["A=1, B=2, C=3"])
    assert ids[0, 0] == BOS and ids[0, sep[0]] == SEP and CharCodec().decode(ids[0, sep[0] + 1:]) == "A=1,B=2,C=3"
    assert ids[0, sep[0] + 12] == EOS


def test_tiny_lru_model_trains_above_chance_on_level_1(one_thread):
    """Chance: the best context-free predictor of an answer character (its unigram frequency over the training
    answers). Beating the best prompt-blind *answer* takes far longer than a test (experiments/lru_mla/README.md)."""
    from collections import Counter

    from uzr.reasoning.training import AblationModule, evaluate, loader, make_items

    spec = LRUMLASpec(levels=[1], max_vars=3, train_items=1600, eval_items=200, d_model=32, layers=1, heads=2,
                      head_dim=8, rope_dim=4, kv_rank=16, max_steps=3, epochs=2, batch_size=32, lr=1e-2,
                      warmup_steps=10)
    train, seen = make_items(spec, spec.train_items, seed=0)
    heldout, _ = make_items(spec, spec.eval_items, seed=1, exclude=seen)
    model = build(spec, "mla_lru_act", VOCAB, seed=0)
    data = loader(train, spec.batch_size, seed=0)
    L.seed_everything(0, verbose=False)
    L.Trainer(max_epochs=spec.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, deterministic=True).fit(
        AblationModule(model, spec, spec.epochs * len(data)), train_dataloaders=data)
    scores = evaluate(model, heldout)
    answer_tokens = Counter(t for ids, sep in zip(train.ids, train.sep) for t in ids[sep + 1:] if t != 0)
    freq = np.asarray(list(answer_tokens.values()), float) / sum(answer_tokens.values())
    chance_bits, chance_acc = float(-(freq * np.log2(freq)).sum()), float(freq.max())
    bits = sum(scores["nll"]) / sum(scores["tokens"]) / np.log(2)
    acc = sum(scores["tokens_right"]) / sum(scores["tokens"])
    assert bits < chance_bits - 0.5 and acc > chance_acc + 0.2, (bits, chance_bits, acc, chance_acc)
    assert all(1 <= n <= spec.max_steps for n in scores["iterations"])


@pytest.mark.parametrize("override, match", [
    ("lru_mla.groups=[mla,transformer]", r"lru_mla.groups=.*transformer.*valid: distinct groups from baseline, mla"),
    ("lru_mla.kv_rank=0", r"lru_mla.kv_rank=0 is invalid; valid: an integer >= 1"),
    ("lru_mla.threshold=1.5", r"lru_mla.threshold=1.5 is invalid; valid: a number in \(0, 1\]"),
    ("lru_mla.levels=[1,5]", r"lru_mla.levels=\[1, 5\] is invalid; valid: distinct levels from \[1, 2, 3, 4\]"),
    ("lru_mla.max_vars=3", r"lru_mla.max_vars=3 is invalid; valid: an integer in \[4, 8\]"),
    ("lru_mla.rope_dim=3", r"lru_mla.rope_dim=3 is invalid; valid: an even integer"),
    ("lru_mla.ponder_weight=-1", r"lru_mla.ponder_weight=-1"),
])
def test_bad_ablation_config_fails_before_training_naming_the_field(override, match, monkeypatch):
    import uzr.reasoning.groups as groups

    monkeypatch.setattr(groups, "train_group", lambda *a, **k: pytest.fail("validation must come before training"))
    with pytest.raises(ValueError, match=match):
        resolved("+experiment=lru_mla", override)


def test_experiment_resolves_to_the_ablation_stage_only():
    cfg = resolved("+experiment=lru_mla")
    assert cfg.stages == ["lru_mla"] and cfg.lru_mla.groups == list(GROUPS)
    assert "lru_mla" not in resolved().stages


def test_halting_bias_of_the_design_cannot_halt_before_t_max():
    """The measurement behind "halting never stops early": at b = -2 (DESIGN.md §9), threshold 0.99 and T_max = 8,
    ACT needs ceil(0.99 / 0.119) = 9 > 8 steps, so every position runs 8; the ablation's b = -1 starts at 4."""
    from uzr.reasoning import LatentReasoningUnit

    assert initial_steps(-2.0, 0.99, 8) == 8 and initial_steps(-1.0, 0.99, 8) == 4
    c = torch.randn(2, 7, 16)
    for bias, expected in ((-2.0, 8.0), (-1.0, 4.0), (-1.0 + 1e-3, 4.0)):
        lru = LatentReasoningUnit(16, max_steps=8, halt_bias=bias)
        assert lru(c).halted.steps.float().mean().item() == expected


class _Killed(Exception):
    """Stands in for a kill: raised mid-epoch, after an epoch's checkpoint was written."""


def test_killed_group_training_resumes_and_ends_like_an_uninterrupted_one(tmp_path, one_thread, monkeypatch):
    """A group killed in its second epoch resumes from the first epoch's checkpoint in the artifact's work folder
    and ends with the uninterrupted training's weights, training log and held-out scores."""
    from uzr.reasoning import groups, training
    from uzr.runner import RunContext

    tiny = ["lru_mla.train_items=64", "lru_mla.eval_items=8", "lru_mla.epochs=3", "lru_mla.batch_size=32",
            "lru_mla.d_model=32", "lru_mla.heads=2", "lru_mla.head_dim=8", "lru_mla.rope_dim=4", "lru_mla.kv_rank=16",
            "lru_mla.max_steps=3", "lru_mla.warmup_steps=2"]

    def run_of(name: str):
        cfg = resolved("+experiment=lru_mla", *tiny, f"paths.cache_dir={tmp_path / name}")
        return RunContext(cfg, tmp_path / f"{name}_run")

    def trained(run):
        train, heldout = groups.datasets(run.cfg.lru_mla, run.cfg.seed)
        folder, _ = groups.cached_group(run, "mla_lru_act", train, heldout)
        return json.loads((folder / "group.json").read_text()), load_file(str(folder / "model.safetensors")), folder

    whole, whole_weights, _ = trained(run_of("whole"))

    def kill(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise _Killed

    killed = run_of("killed")
    monkeypatch.setattr(training.AblationModule, "on_train_batch_start", kill, raising=False)
    with pytest.raises(_Killed):
        trained(killed)
    assert list((tmp_path / "killed").glob("lru_mla_group/*.partial/checkpoints/last.ckpt")), "no checkpoint"
    monkeypatch.undo()
    resumed, resumed_weights, folder = trained(killed)
    assert resumed["resumed"] is True and whole["resumed"] is False
    assert json.loads((folder / "manifest.json").read_text())["resumed"] is True
    assert not (folder / "checkpoints").exists()
    for key in ("steps", "loss_by_epoch", "iterations_by_epoch", "exact", "partial", "iterations", "tokens_right"):
        assert resumed[key] == whole[key], key
    np.testing.assert_allclose(resumed["nll"], whole["nll"], rtol=1e-6)
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def test_dependency_order_writes_each_variable_once_it_has_settled():
    """answer_order=dependency: the answer's variables by the round from which each keeps its final value (ties by
    letter), so on the acyclic levels a rule's sources come before its target — except where the target's value
    settles early by coincidence (e.g. max(A, B) already right after one round); letter order keeps the generator's
    answer."""
    from uzr.reasoning.training import make_items

    spec = LRUMLASpec(levels=[1, 3], train_items=200)
    items, _ = make_items(spec, 200, seed=5)
    letters, _ = make_items(LRUMLASpec(levels=[1, 3], answer_order="letter"), 200, seed=5)
    table = generate({"n": 200, "levels": [1, 3], "seed": 5, "max_vars": spec.max_vars, "max_rounds": spec.max_rounds,
                      "trajectory": True})
    in_order = 0
    for answer, letter, prompt, reference, trajectory, steps in zip(
            items.answers, letters.answers, *(table[c].to_pylist() for c in ("prompt", "answer", "trajectory", "steps"))):
        assert letter == reference and score_answer(answer, reference) == (True, 1.0)
        names = [part.split("=")[0] for part in answer.split(", ")]
        settled = {chr(65 + j): min(r for r in range(steps + 1) if all(t[j] == trajectory[steps][j]
                                                                        for t in trajectory[r:steps + 1]))
                   for j in range(len(names))}
        assert names == sorted(names, key=lambda x: (settled[x], x))
        position = {x: i for i, x in enumerate(names)}
        in_order += all(position[source] < position[target] for target, expression in
                        (rule.split("=", 1) for rule in compact_prompt(prompt).split("|")[1].split(";"))
                        for source in set(re.findall(r"[A-H]", expression)))
    assert in_order >= 0.9 * len(items.answers)
