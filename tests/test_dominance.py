"""Attention dominance (MDI / AEI, DESIGN.md §9): definitions, the streamed reducer against eager attention
maps (tiny Llama, Gemma 3 with sliding windows, a tiny LLaVA-style VLM with a synthetic image), token groups,
config validation, and the stage end to end on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uzr.attention import ScoreBlock
from uzr.dominance.groups import NEITHER, require_groups, span_labels
from uzr.dominance.indices import bootstrap_mean, consistency, indices, paired_difference, stage_layers
from uzr.dominance.measure import GroupMass

from .conftest import model_spec, resolved


# ------------------------------------------------------------------------------------------ definitions
def test_indices_of_a_hand_built_attention_row():
    # keys: BOS | T T | O O O O O O ; one query row: 0.2 on BOS, 0.3 + 0.3 on T, 0.2 spread over O
    probs = torch.tensor([[0.2, 0.3, 0.3, 0.05, 0.05, 0.05, 0.05, 0.0, 0.0]])
    groups = torch.zeros(1, 9, 2)
    groups[0, 1:3, 0] = 1
    groups[0, 3:9, 1] = 1
    reducer = GroupMass(groups)
    reducer.start(1, 1, 1, 9, "cpu")
    e = probs[None, None]  # (B, H, n, w), already normalised: inv_z = 1
    ones = torch.ones(1, 1, 1)
    reducer.add(ScoreBlock(0, 1, 0, 9, 8, False, e.log(), e, ones, ones, ones * 9, ones.bool(), ~ones.bool()))
    mass = reducer.finish()[0, 0, 0]
    assert torch.allclose(mass, torch.tensor([0.6, 0.2]))
    v = indices(mass[0], mass[1], 2, 6)
    # A_T = 0.6 / 0.8; MDI = (0.75 / 2) / (0.25 / 6) = 9; AEI_T = 0.75 / (2 / 8) = 3; AEI_O = 0.25 / (6 / 8) = 1/3
    assert v["A_T"] == pytest.approx(0.75) and v["A_O"] == pytest.approx(0.25)
    assert v["MDI"] == pytest.approx(9.0) and v["AEI_T"] == pytest.approx(3.0) and v["AEI_O"] == pytest.approx(1 / 3)
    assert consistency(v)


def test_balanced_attention_gives_one_and_consistency_flags_a_broken_row():
    v = indices([0.2, 0.5], [0.6, 0.0], [1, 3], [3, 3])  # per-token equal; all mass on T
    assert v["MDI"][0] == pytest.approx(1.0) and v["AEI_T"][0] == pytest.approx(1.0)
    assert np.isinf(v["MDI"][1]) and v["A_T"][1] == 1.0
    assert consistency(v).all()
    broken = {**v, "MDI": np.array([1.1, np.inf])}
    assert consistency(broken).tolist() == [False, True]


def test_stage_layers_default_and_explicit():
    assert stage_layers(30) == {"early": [0, 1], "middle": [14, 15], "late": [28, 29]}
    assert stage_layers(18, 1) == {"early": [0], "middle": [8], "late": [17]}
    assert stage_layers(32, 2, {"middle": [10, -1]})["middle"] == [10, 31]
    with pytest.raises(ValueError, match=r"dominance.late=\[40\]"):
        stage_layers(18, 2, {"late": [40]})


def test_bootstrap_and_paired_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 200)
    stats = bootstrap_mean(x, seed=1)
    assert stats["ci95"][0] < 2.0 < stats["ci95"][1] and stats["std"] == pytest.approx(x.std(ddof=1))
    assert paired_difference(x, x + 0.0)["verdict"] == "no difference"
    assert paired_difference(x + 0.5, x)["verdict"] == "higher"  # a constant shift is exact under pairing
    noise = paired_difference(x, rng.permutation(x))
    assert noise["ci95"][0] <= 0 <= noise["ci95"][1] or noise["verdict"] != "no difference"


# ------------------------------------------------------------------------------------------- token groups
def test_span_labels_majority_overlap_specials_and_gaps():
    offsets = [(0, 0), (0, 4), (4, 9), (9, 12), (12, 20), (20, 26)]
    special = [True, False, False, False, False, False]
    labels = span_labels(offsets, special, [[(0, 10)], [(12, 26)]])
    # BOS special; (4, 9) inside group 0; (9, 12) has 1 char in group 0, none in 1; (20, 26) in group 1
    assert labels.tolist() == [NEITHER, 0, 0, 0, 1, 1]
    assert span_labels([(8, 12)], [False], [[(8, 10)], [(10, 12)]]).tolist() == [NEITHER]  # a tie


def test_text_sample_puts_specials_and_template_in_neither_group(tiny_models):
    from uzr.dominance.samples import TEXT_GROUPS, text_sample

    _, tok = tiny_models["gemma3"]  # bpe tokenizer: BOS, no chat template ("...\nAnswer:")
    passage, instruction = "The quick brown fox jumps over the lazy dog.", "Summarise the passage above."
    prepared = text_sample(tok, passage, instruction)
    ids = prepared.inputs["input_ids"][0].tolist()
    answer = tok(" a fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = prepared.label_fn(answer)
    assert labels[0] == NEITHER and ids[0] == tok.bos_token_id
    assert labels[-1] == NEITHER  # the answer's end token
    text = {g: tok.decode([i for i, lab in zip(ids + answer, labels) if lab == k]) for k, g in enumerate(TEXT_GROUPS)}
    assert text["passage"].strip() == passage and text["instruction"].strip() == instruction
    assert text["answer"] == " a fox"
    template = tok.decode([i for i, lab in zip(ids, labels) if lab == NEITHER][1:])
    assert template.strip() == "Answer:"


def test_an_empty_group_fails_naming_it():
    from uzr.dominance.stage import split_data

    labels = np.array([NEITHER, 0, 0, 2, 2])  # instruction and answer tokens, no passage
    mass = np.zeros((1, 5, 3))
    with pytest.raises(ValueError, match=r"group 'passage' has no tokens in sample 3 of student"):
        split_data(labels, ("instruction", "passage", "answer"), mass, 3, "instruction_passage", "generated",
                   "sample 3 of student")
    with pytest.raises(ValueError, match=r"group 'answer' has no tokens in sample 0"):
        split_data(np.array([NEITHER, 0, 1, 1]), ("instruction", "passage", "answer"), np.zeros((1, 4, 3)), 4,
                   "prompt_answer", "generated", "sample 0")
    with pytest.raises(ValueError, match=r"group 'text' and 'image' has no tokens in x"):
        require_groups(np.array([NEITHER, NEITHER]), ("text", "image"), "x")


# ------------------------------------------------------------------------- streamed reducer vs eager maps
def eager_masses(model, inputs: dict, labels: np.ndarray) -> np.ndarray:
    """(L, S, G) head-mean group masses from eager full attention maps (the reference)."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
    onehot = torch.zeros(len(labels), 3, dtype=torch.float64)
    keep = torch.as_tensor(labels) >= 0
    onehot[keep, torch.as_tensor(labels)[keep]] = 1
    return torch.stack([a[0].double().mean(0) @ onehot for a in out.attentions]).numpy()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_group_mass_equals_eager_maps_with_generated_queries(tiny_models, family):
    from uzr.dominance.measure import run_sample
    from uzr.dominance.samples import text_sample

    model, tok = tiny_models[family]
    passage = "Objects are Python's abstraction for data. All data in a Python program is represented by objects."
    prepared = text_sample(tok, passage, "Summarise the passage above.")
    rec = run_sample(model, prepared.inputs, prepared.label_fn, 3, max_new_tokens=6, block_size=4,
                     pad_id=tok.pad_token_id)
    assert len(rec.answer_ids) >= 1
    ids = torch.tensor([prepared.inputs["input_ids"][0].tolist() + rec.answer_ids])
    labels = prepared.label_fn(rec.answer_ids)
    with torch.no_grad():  # the answer is the model's own greedy continuation
        again = model.generate(**prepared.inputs, max_new_tokens=6, min_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    assert again[0, prepared.inputs["input_ids"].shape[1]:].tolist() == rec.answer_ids
    ref = eager_masses(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)
    assert rec.row_mass.shape == ref.shape
    np.testing.assert_allclose(rec.row_mass, ref, atol=2e-6)
    if family == "gemma3":  # sliding layers (window 8): late answer rows see no passage key at all
        answer_rows = np.nonzero(labels == 2)[0]
        assert ref[0, answer_rows[-1], 1] == 0 and ref[1, answer_rows[-1], 1] > 0


@pytest.fixture(scope="module")
def tiny_llava():
    from uzr.dominance.sources import load_processor
    from uzr.models import load_model

    spec = model_spec("teacher/tiny_llava")
    model, tok = load_model(spec)
    return model, tok, load_processor(spec, tok)


def test_tiny_llava_image_groups_and_streamed_masses_equal_eager(tiny_llava):
    from uzr.dominance.groups import image_token_id
    from uzr.dominance.measure import run_sample
    from uzr.dominance.samples import synthetic_images, vision_sample
    from uzr.dominance.stage import split_data

    model, tok, processor = tiny_llava
    prompt = "Answer with the option's letter from the given choices directly."
    prepared = vision_sample(processor, model.config, synthetic_images(1, 32, 0)[0], prompt)
    ids = prepared.inputs["input_ids"][0].tolist()
    prompt_labels = prepared.label_fn([])
    image_id = image_token_id(model.config)
    assert ids.count(image_id) == 16 and (prompt_labels == 1).sum() == 16  # 32 px / 8 px patches, CLS dropped
    assert tok.decode([i for i, lab in zip(ids, prompt_labels) if lab == 0]).strip() == prompt
    assert prompt_labels[0] == NEITHER  # BOS
    rec = run_sample(model, prepared.inputs, prepared.label_fn, 3, max_new_tokens=4, block_size=8,
                     pad_id=tok.pad_token_id)
    labels = prepared.label_fn(rec.answer_ids)
    full = dict(prepared.inputs)
    full["input_ids"] = torch.tensor([ids + rec.answer_ids])
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    ref = eager_masses(model, full, labels)
    np.testing.assert_allclose(rec.row_mass, ref, atol=2e-6)
    for queries in ("generated", "prompt"):
        mass, sizes, n_q = split_data(labels, prepared.groups, rec.row_mass, rec.n_prompt, "text_image", queries, "s")
        rows = (labels == 2) if queries == "generated" else (labels == 0) & (np.arange(len(labels)) < rec.n_prompt)
        assert sizes == [int((labels == 0).sum()), 16] and n_q == rows.sum()
        np.testing.assert_allclose(mass, ref[:, rows][..., :2].sum(1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, message", [
    (["dominance.queries=all"], r"dominance.queries='all' is invalid: expected one of \['generated', 'prompt'\]"),
    (["dominance.models=[teacher,bogus]"], r"dominance.models\[\]='bogus' is invalid"),
    (["dominance.splits=[text_image]"], r"dominance.splits\[\]='text_image' is invalid"),
    (["dominance.late=[40]"], r"dominance.late=\[40\]: \[40\] outside the teacher's layers \(0..17"),
    (["inject.mode=mix"], "inject.mode='mix': dominance measures"),
    (["~inject"], r"read the 'inject' config group.*dominance.models includes 'injected'"),
    (["dominance.stage_width=0"], "dominance.stage_width=0 must be >= 1"),
    (["dominance.source=mmmu_pro", "dominance.models=[teacher]"],
     "needs a vision-language teacher, but teacher=gemma3_270m is a text model"),
    (["dominance.source=synthetic"], "uzr has no controller for them: drop 'injected'"),
])
def test_bad_dominance_config_fails_before_loading(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolved("+experiment=dominance_text", *overrides)


def test_experiments_resolve_and_injection_is_optional():
    text = resolved("+experiment=dominance_text")
    assert text.stages == ["dominance"] and text.dominance.models == ["teacher", "student", "injected"]
    plain = resolved("+experiment=dominance_text", "~inject", "~alpha", "dominance.models=[teacher,student]")
    assert plain.inject is None and plain.alpha is None  # no injection: no controller needed
    for name, model in (("dominance_llava", "llava_1_5_7b"), ("dominance_qwen_vl", "qwen2_5_vl_7b")):
        cfg = resolved(f"+experiment={name}")
        assert cfg.teacher.name == model and cfg.dominance.source == "mmmu_pro" and cfg.dominance.num_samples >= 100
    assert resolved("+experiment=dominance_llava").dominance.anchor == "llava_1_5_7b"
    assert "dominance" not in resolved("+experiment=default").stages


# --------------------------------------------------------------------------------------- stage end to end
def test_stage_end_to_end_on_tiny_vlm(tmp_path):
    import json

    from uzr.runner import run

    cfg = resolved("+experiment=smoke", "stages=[dominance]", "+dominance=synthetic", "teacher=tiny_llava",
                   "logger=csv", "dominance.num_samples=3", "dominance.queries=prompt", "dominance.stage_width=1",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    metrics = run(cfg, tmp_path / "run", {}, "test")
    section = metrics["dominance"]
    stats = section["settings"]["teacher"]["text_image"]
    assert stats["queries"] == "prompt" and stats["group_sizes"]["O"] == 16
    assert stats["stage_layers"] == {"early": [0], "middle": [1], "late": [3]}
    assert section["consistency"]["ok"] and section["consistency"]["checked"] == 3 * 4
    mdi = stats["stages"]["early"]["MDI"]
    assert mdi["n"] == 3 and mdi["ci95"][0] <= mdi["mean"] <= mdi["ci95"][1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "dominance_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert np.mean([r["MDI"][0] for r in rows]) == pytest.approx(mdi["mean"], rel=1e-4)  # early = layer 0
    assert (tmp_path / "run" / "figures" / "dominance_layers.png").stat().st_size > 0
    assert section["sweep_row"]["teacher/text_image/early/MDI"] == pytest.approx(mdi["mean"])


def test_sweep_report_tabulates_dominance_jobs(tmp_path):
    import csv
    import json

    import yaml

    from uzr.report.sweep import write_report

    sweep = tmp_path / "sweep"
    for num, (queries, alpha) in enumerate([("generated", 0.5), ("prompt", 0.5), ("generated", 1.0)]):
        job = sweep / f"{num}-dominance.queries={queries},alpha.value={alpha}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"dominance.queries={queries}"]))
        (job / "config.yaml").write_text(yaml.safe_dump({
            "name": "dominance_text", "alpha": {"schedule": "constant", "value": alpha},
            "inject": {"layers": [4], "mode": "bias"}, "dominance": {"queries": queries, "stage_width": 2}}))
        row = {"student/instruction_passage/early/MDI": 1.5 + num, "injected-student/instruction_passage/early/MDI": 0.1}
        (job / "metrics.json").write_text(json.dumps({"name": "x", "artifacts": {}, "dominance": {"sweep_row": row}}))
    result = write_report(sweep, tmp_path / "out", "dominance_sweep")
    with open(result["files"]["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["dominance.queries"] for r in rows) == ["generated", "generated", "prompt"]  # the varied key
    assert sorted(float(r["dominance student/instruction_passage/early/MDI"]) for r in rows) == [1.5, 2.5, 3.5]
    assert "dominance injected-student/instruction_passage/early/MDI" in result["files"]["markdown"].read_text()


def test_anchor_rows_compare_published_values_with_our_interval():
    from uzr.dominance.summary import anchor_comparison

    def stats(mean, lo, hi):
        return {"mean": mean, "std": 1.0, "ci95": [lo, hi], "n": 100, "dropped": 0}

    stages = {"early": {"MDI": stats(1.6, 1.4, 1.8), "AEI_T": stats(1.0, 0.9, 1.1)},
              "middle": {"MDI": stats(6.0, 5.0, 7.0), "AEI_T": stats(3.4, 3.0, 3.8)},
              "late": {"MDI": stats(4.5, 4.0, 5.0), "AEI_T": stats(2.0, 1.5, 2.5)}}
    settings = {"teacher": {"text_image": {"queries": "generated", "stages": stages}}}
    rows = anchor_comparison(settings, "llava_1_5_7b")
    paper = {(r["index"], r["stage"]): r for r in rows if r["reference_queries"] == "generated"}
    assert paper[("MDI", "early")]["published"] == 1.58 and paper[("MDI", "early")]["inside_interval"]
    assert not paper[("MDI", "middle")]["inside_interval"] and not paper[("AEI_T", "late")]["inside_interval"]
    reimpl = [r for r in rows if r["reference_queries"] == "prompt"]
    assert {r["stage"]: r["published"] for r in reimpl} == {"early": 2.19, "middle": 5.72, "late": 4.47}
    assert all(r["our_queries"] == "generated" for r in rows) and anchor_comparison(settings, None) == []


def test_vision_language_configs_load_with_the_image_text_class(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, LlavaConfig

    from uzr.models.loading import _auto_class

    LlavaConfig().save_pretrained(tmp_path / "vlm")
    LlamaConfig().save_pretrained(tmp_path / "lm")
    assert _auto_class(tmp_path / "vlm", {}) is AutoModelForImageTextToText
    assert _auto_class(tmp_path / "lm", {}) is AutoModelForCausalLM


def test_injected_setting_keeps_the_students_sinks_like_the_evaluate_stage(tmp_path):
    """``inject.sinks=keep`` reaches the dominance stage's injector: on the same samples and cached controller the
    injected student's MDI moves with the sinks while the plain student's does not."""
    from uzr.runner import run

    def mdi(*overrides):
        cfg = resolved("+experiment=smoke", "stages=[harvest,controller,dominance]", "+dominance=text",
                       "dominance.models=[student,injected]", "dominance.num_samples=3", "dominance.queries=prompt",
                       "dominance.stage_width=1", "evaluate.figure=false", "logger=csv",
                       f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
        settings = run(cfg, tmp_path / "run", {}, "test")["dominance"]["settings"]
        return {s: [st["MDI"]["mean"] for st in settings[s]["instruction_passage"]["stages"].values()]
                for s in ("student", "injected")}

    replace = mdi()
    keep = mdi("inject.sinks=keep", "inject.sink_ratio=1.005")  # tiny random models attend almost uniformly
    assert keep["student"] == replace["student"]
    assert keep["injected"] != pytest.approx(replace["injected"], rel=1e-6)
