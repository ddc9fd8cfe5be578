"""The svf config group: bad input fails at validation, before any model loads, naming the field."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from tests.conftest import resolved


def test_svf_default_experiment_resolves_and_is_not_in_the_default_stages():
    cfg = resolved("+experiment=svf_default")
    assert cfg.stages == ["svf", "svf_eval"] and cfg.student.name == "smollm2_135m"
    compare = resolved("+experiment=svf_compare")
    assert compare.stages == ["svf", "svf_baselines", "svf_eval"] and compare.name == "svf_compare"
    assert compare.svf.injection and not cfg.svf.injection  # the injection row needs a harvest: svf_compare only
    assert dataclasses.replace(compare.svf, injection=False) == cfg.svf
    assert cfg.svf.baselines == ["lora", "ia3"] and len(cfg.svf.baseline_lrs) >= 2
    assert cfg.svf.matrices == "mlp" and cfg.svf.clip == 1e-3 and cfg.svf.kl_weight == 0.0 and cfg.svf.lr == 1e-2
    assert (cfg.svf.reward, cfg.svf.baseline, cfg.svf.samples_per_prompt) == ("graded", "prompt_mean", 8)
    schema = resolved("stages=[svf]", "+svf=default").svf  # the schema keeps the reference's REINFORCE
    assert (schema.lr, schema.reward, schema.baseline, schema.objective) == (2e-3, "binary", "none", "reinforce")
    assert not {"svf", "svf_baselines", "svf_eval"} & set(resolved().stages)


@pytest.mark.parametrize("override, match", [
    ("svf.mixture=[facts,arithmetic,facts]", r"svf.mixture=.*\['facts'\] more than once"),
    ("svf.domains=[arithmetic,poetry]", r"svf.domains=.*unknown domain\(s\) \['poetry'\]; valid domains: arithmetic, facts, causal_loop"),
    ("svf.matrices=ffn", r"svf.matrices='ffn' is invalid; valid: mlp \| attn \| mlp\+attn"),
    ("svf.objective=ppo", r"svf.objective='ppo'"),
    ("svf.layers=[3,30]", r"svf.layers=\[3, 30\].*0..29"),
    ("svf.strategies=[prompt,vote]", r"svf.strategies=.*valid strategies: prompt, classifier, cem, oracle_domain"),
    ("svf.kl_weight=-1", r"svf.kl_weight"),
    ("svf.cem_population=4", r"svf.cem_population=4.*at least 2 elites"),
    ("svf.baselines=[lora,dora]", r"svf.baselines=.*\['dora'\]; valid baselines: lora, ia3"),
    ("svf.baselines=[lora,lora]", r"svf.baselines=.*repeated"),
    ("svf.baseline_lrs=[]", r"svf.baseline_lrs=\[\] is invalid; valid: a non-empty list of distinct numbers > 0"),
    ("svf.baseline_lrs=[0.001,-1]", r"svf.baseline_lrs=\[0.001, -1.0\]"),
    ("svf.val_items=0", r"svf.val_items=0 is invalid; valid: an integer >= 1"),
    ("svf.lora_rank=0", r"svf.lora_rank=0"),
])
def test_bad_svf_config_fails_before_any_model_loads(override, match):
    with pytest.raises(ValueError, match=match):
        resolved("+experiment=svf_default", override)


def write_meta(folder, **meta):
    folder.mkdir(parents=True)
    (folder / "expert.json").write_text(json.dumps(meta))
    return str(folder)


def test_experts_of_another_model_or_domain_or_duplicated_are_refused(tmp_path):
    ok = {"student": "smollm2_135m", "matrices": "mlp", "layers": list(range(30))}
    other = write_meta(tmp_path / "other", **{**ok, "student": "qwen2_5_0_5b", "domain": "facts"})
    with pytest.raises(ValueError, match=r"svf.experts.facts=.*student='qwen2_5_0_5b'.*student='smollm2_135m'"):
        resolved("+experiment=svf_default", f"+svf.experts.facts={other}")
    facts = write_meta(tmp_path / "facts", **{**ok, "domain": "facts"})
    with pytest.raises(ValueError, match=r"svf.experts.arithmetic=.*domain='facts'"):
        resolved("+experiment=svf_default", f"+svf.experts.arithmetic={facts}")
    with pytest.raises(ValueError, match=r"svf.experts.arithmetic=.*same expert as svf.experts.facts"):
        resolved("+experiment=svf_default", f"+svf.experts.facts={facts}", f"+svf.experts.arithmetic={facts}")
    with pytest.raises(ValueError, match=r"svf.experts.poetry: domain 'poetry' is not in svf.domains"):
        resolved("+experiment=svf_default", f"+svf.experts.poetry={facts}")
    with pytest.raises(ValueError, match=r"svf.experts.facts=.*cannot read"):
        resolved("+experiment=svf_default", f"+svf.experts.facts={tmp_path / 'missing'}")
    cfg = resolved("+experiment=svf_default", f"+svf.experts.facts={facts}")
    assert cfg.svf.experts == {"facts": facts}


def test_validation_does_not_import_torch():
    import subprocess

    code = ("import sys; from tests.conftest import resolved; resolved('+experiment=svf_default'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
