"""Sub-artifacts made through RunContext.artifact, typed access to upstream artifacts, and the key rule
(uzr.config.keys) that keeps every existing artifact's key: today's keys are pinned here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from uzr.cache import MANIFEST, content_key
from uzr.config.keys import KEYED_UNLESS_DEFAULT, NOT_KEYED, key_of, keyed_only_by
from uzr.runner import RunContext, artifact_keys, run
from uzr.stages import REGISTRY, StageInfo

from .conftest import resolved

# The keys the code had before the key rule (computed on the unchanged code with uzr.runner.artifact_keys): a
# change here re-keys artifacts people have cached, and must come with a bump of the stage's version.
PINNED = {
    ("+experiment=smoke",): {"harvest": "88ce5fe0c26a21fa", "controller": "18354a3572d07f25",
                             "gate": "1cb0365b2cf7930b"},
    # Prompt-level gates were re-keyed on purpose (issue 24): their labels now judge the teacher's answers against the
    # fact tables (prompt_labels_version 2 and gate.check_answers in the payload; version 3: plurals and continent
    # adjectives count); before: c101ea3f9e34900f, then 94c605268a1ab3b6.
    ("+experiment=smoke", "gate=prompt"): {"gate": "1c80f505baf580bf"},
    ("+experiment=smoke", "gate=prompt", "gate.check_answers=false"): {"gate": "0709f85fc673041a"},
    # harvest.layers (keyed as the effective set), log_every_n_steps (controller only), eval_alphas (never)
    ("+experiment=smoke", "trainer.log_every_n_steps=7", "gate.eval_alphas=[0.25]", "harvest.layers=[0,1,2]"): {
        "harvest": "7c58c2d96b644f1c", "controller": "8b16870a9a39ceb8", "gate": "8ea2d148b47f3f35"},
    # the generated-answer evaluation (never keyed): the smoke keys above
    ("+experiment=smoke", "gate.generated_answers=200", "gate.answer_tokens=8"): {
        "harvest": "88ce5fe0c26a21fa", "controller": "18354a3572d07f25", "gate": "1cb0365b2cf7930b"},
    # The seed's setting keeps the keys the default experiment had until issue 25 (head-mean targets, sinks replaced)
    ("+experiment=seed_uzr",): {"harvest": "c6a04ad6318cdb6f", "controller": "4e1f286b7ed112a5",
                                "gate": "51bef50acb267d85"},
    # The default moved on purpose to per-head targets with sinks kept (issue 25): its store holds per-head rows and its
    # controller predicts one distribution per head, so both are new artifacts (and the gate on that controller); then
    # it harvests 80 texts instead of 120 (the make-run budget, issue 25): new keys again (before: 333704ff39f3ad26,
    # 88c7bf8e47e833e8, 9b364c0a35482a2c; +experiment=adapt keeps the 120-text harvest)
    ("+experiment=default",): {"harvest": "04059918c66cd0bd", "controller": "019f2e7d355478a6",
                               "gate": "dd2662bc27119c7a"},
    ("+experiment=positive_control",): {"harvest": "99fbea071d25e8b5", "controller": "5d1bf75361eaaa10",
                                        "gate": "a4658d93547a4234"},
    # fields keyed only when not at their default
    ("+experiment=positive_control", "controller.target=per_head", "harvest.head_matching=output"): {
        "harvest": "5f9a2d99ef784a8a", "controller": "e1aeb31c9c2acf52", "gate": "fcc4f2bcc401348d"},
    ("+experiment=lru_mla",): {"lru_mla": "b53b23fed4ae3f96"},
    ("+experiment=lru_mla", "lru_mla.figure=false", "lru_mla.groups=[mla]"): {"lru_mla": "513b8414d307ce45"},
    ("+experiment=svf_default",): {"svf": "f0c97a6801c4306b", "svf_baselines": "ca4dadc921c2c087"},
    ("+experiment=svf_default", "teacher=tiny_gemma3", "student=tiny_qwen2", "svf.objective=distill",
     "svf.eval_items=7", "svf.lora_rank=2"): {"svf": "c5dfce4cf3c99df2", "svf_baselines": "981af1fac7c15992"},
}


@pytest.mark.parametrize("overrides", list(PINNED), ids=lambda o: " ".join(o))
def test_artifact_keys_are_the_ones_cached_before_the_key_rule(overrides):
    stages = list(PINNED[overrides])
    cfg = resolved(*overrides, f"stages=[{','.join(stages)}]")
    keys = artifact_keys(cfg, stages)
    assert {name: keys[name] for name in stages} == PINNED[overrides]


def test_lru_mla_group_keys_are_pinned_and_shared_by_every_group_list():
    from uzr.reasoning.groups import GROUP_KIND, GROUP_VERSION, group_payload

    def key(*overrides: str, group: str) -> str:
        return content_key(GROUP_KIND, group_payload(resolved("+experiment=lru_mla", *overrides), group), GROUP_VERSION)

    assert {g: key(group=g) for g in ("baseline", "mla", "mla_lru_fixed", "mla_lru_act")} == {
        "baseline": "15588b44c224c21c", "mla": "a4471c376ecf31b3", "mla_lru_fixed": "fe36d989fa1cab82",
        "mla_lru_act": "7dabd59abfb90e31"}
    assert key("lru_mla.groups=[mla]", "lru_mla.figure=false", group="mla") == "a4471c376ecf31b3"
    assert key("lru_mla.train_items=64", "lru_mla.eval_items=8", group="mla") == "7bcfd5dcdec9995d"


@dataclasses.dataclass
class Inner:
    width: int = 4
    note: str = dataclasses.field(default="", metadata=NOT_KEYED)


@dataclasses.dataclass
class Spec:
    lr: float = 0.1
    figure: bool = dataclasses.field(default=True, metadata=NOT_KEYED)
    target: str = dataclasses.field(default="mean", metadata=KEYED_UNLESS_DEFAULT)
    rank: int = dataclasses.field(default=1, metadata=keyed_only_by("baselines"))
    inner: Inner = dataclasses.field(default_factory=Inner)
    items: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


def test_key_of_follows_each_fields_metadata():
    spec = Spec(figure=False, inner=Inner(8, "x"))
    assert key_of(spec, "experts") == {"lr": 0.1, "inner": {"width": 8}, "items": [1, 2]}
    assert key_of(spec, "baselines") == {"lr": 0.1, "rank": 1, "inner": {"width": 8}, "items": [1, 2]}
    assert key_of(Spec(target="head"), "experts")["target"] == "head"  # keyed once it differs from its default
    keyed = key_of(spec, "experts")
    keyed["items"].append(3)
    assert spec.items == [1, 2]  # a copy: a payload never aliases the config


def test_a_sub_artifact_is_built_once_reused_after_and_recorded(tmp_path):
    cfg = resolved("+experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}")
    builds = []

    def build(folder: Path) -> dict:
        builds.append(folder)
        (folder / "part.json").write_text(json.dumps({"n": 3}))
        return {"rows": 3}

    first = RunContext(cfg, tmp_path / "run")
    folder, built = first.artifact("toy_part", {"n": 3}, build, version=1)
    again, built_again = first.artifact("toy_part", {"n": 3}, build, version=1)
    assert (built, built_again, again, len(builds)) == (True, False, folder, 1)
    key = content_key("toy_part", {"n": 3}, 1)
    assert folder == tmp_path / "cache" / "toy_part" / key and json.loads((folder / "part.json").read_text()) == {"n": 3}
    assert json.loads((folder / MANIFEST).read_text())["rows"] == 3  # build's extras reach the manifest
    # the run's record keeps "built by this run" although the second call reused it
    assert first.artifact_records() == {f"toy_part/{key}": {"key": key, "built": True, "path": str(folder)}}

    later = RunContext(cfg, tmp_path / "run2")  # another run: reused without building
    assert later.artifact("toy_part", {"n": 3}, build, version=1) == (folder, False) and len(builds) == 1
    assert later.sub_artifacts[f"toy_part/{key}"]["built"] is False
    other, built = later.artifact("toy_part", {"n": 3}, build, version=2)  # a new version is a new artifact
    assert built and other != folder and len(builds) == 2


def test_stored_memo_keeps_its_key_and_lists_it_as_a_sub_artifact(tmp_path):
    cfg = resolved("+experiment=smoke", f"paths.cache_dir={tmp_path}")
    ctx = RunContext(cfg, tmp_path / "run")
    ctx.info.update({"harvest": {"key": "88ce5fe0c26a21fa"}, "controller": {"key": "18354a3572d07f25"}})
    calls = []
    key = ("facts_qa", "edited", "controller", 0.5)
    assert ctx.stored(key, lambda: calls.append(1) or [0.25]) == [0.25]
    assert RunContext(cfg, tmp_path / "run2", info=dict(ctx.info)).stored(key, lambda: calls.append(1)) == [0.25]
    assert calls == [1]  # the second run read the cached value
    assert list(ctx.sub_artifacts) == ["memo/b605d9ba34c53f80"]  # the key the memo had before run.artifact


class ToyStage:
    def key_payload(self, cfg, upstream):
        return {"data": key_of(cfg.data, "toy")}

    def build(self, run, folder: Path) -> None:
        (folder / "toy.json").write_text(json.dumps({"num_texts": run.cfg.data.num_texts}))

    def load(self, run, folder: Path) -> dict:
        return json.loads((folder / "toy.json").read_text())

    def report(self, run, artifact: dict) -> dict:
        assert run.upstream(ToyStage) is artifact  # typed access hands back the loaded artifact itself
        folder, _ = run.artifact("toy_part", artifact, write_part, version=1)
        return {"part": folder.name}


def write_part(folder: Path) -> None:
    (folder / "part.txt").write_text("1")


class NotAStage:
    pass


def test_metrics_list_stage_and_sub_artifacts_built_then_reused(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", StageInfo("toy", (), ("data",), 1, f"{__name__}:ToyStage"))
    cfg = resolved("+experiment=smoke", "stages=[toy]", "logger=csv", f"paths.cache_dir={tmp_path / 'cache'}")
    first = run(cfg, tmp_path / "one", {}, "toy")
    part = f"toy_part/{first['toy']['part']}"
    assert list(first["artifacts"]) == ["toy", part]
    assert first["artifacts"]["toy"]["built"] and first["artifacts"][part]["built"]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["artifacts"] == first["artifacts"]
    second = run(cfg, tmp_path / "two", {}, "toy")
    assert not second["artifacts"]["toy"]["built"] and not second["artifacts"][part]["built"]


def test_upstream_names_the_missing_stage_and_rejects_unregistered_classes(tmp_path):
    from uzr.controller.stage import ControllerStage

    ctx = RunContext(resolved("+experiment=smoke"), tmp_path)
    with pytest.raises(LookupError, match=r"the 'controller' artifact is not loaded in this run \(loaded: none\)"
                                          r".*StageInfo.needs.*stages=\[\.\.\., controller\]"):
        ctx.upstream(ControllerStage)
    with pytest.raises(TypeError, match=r"tests.test_artifacts:NotAStage is not a registered stage"):
        ctx.upstream(NotAStage)
