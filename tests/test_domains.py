"""``evaluate.domains``: bits per byte per text domain, each harvested whole and reported with its own interval."""

from __future__ import annotations

import json

import pytest

from .conftest import resolved
from .test_pipeline import run_train


@pytest.mark.parametrize("domains, message", [
    ("[klingon]", r"evaluate\.domains: 'klingon' is not a data option; valid: chat_prompts, jsonl, korean, licenses, pydoc"),
    ("[jsonl]", r"evaluate\.domains: data option 'jsonl' needs \['path'\] set on the command line"),
    ("[korean,korean]", r"evaluate\.domains=\['korean', 'korean'\] names a domain twice"),
    ("[pydoc]", r"evaluate\.domains=\['pydoc'\] names the run's own data \('pydoc'\)"),
])
def test_bad_domains_fail_at_validation(domains, message):
    with pytest.raises(ValueError, match=message):
        resolved("+experiment=smoke", f"evaluate.domains={domains}")


def test_default_experiment_leaves_the_extra_domains_off_within_its_budget():
    # the first `make run` stays within 8 minutes only without them (docs/development.md); one override adds them
    assert resolved("+experiment=default").evaluate.domains == []
    assert resolved("+experiment=default", "evaluate.domains=[korean]").evaluate.domains == ["korean"]
    assert resolved("+experiment=smoke").evaluate.domains == []


def test_smoke_run_reports_each_domain_with_its_interval_on_whole_windows(tmp_path):
    from uzr.cache import ArtifactCache
    from uzr.harvest.store import HarvestStore

    proc = run_train(tmp_path, "+experiment=smoke", "stages=[harvest,controller,evaluate]", "evaluate.facts_qa=false",
                     "evaluate.figure=false", "logger=csv", "evaluate.domains=[korean]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bits per byte, korean (4 texts)" in proc.stdout and "injection (controller) on korean" in proc.stdout
    domains = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluate"]["domains"]
    assert list(domains) == ["pydoc", "korean"]
    korean = domains["korean"]
    assert (korean["num_texts"], korean["cut"], domains["pydoc"]["cut"]) == (4, "tokens", "truncate")
    bpb = korean["bits_per_byte"]
    interval = bpb["injected_minus_student"]
    assert interval["n"] == 4 and interval["low"] <= interval["estimate"] <= interval["high"]
    assert interval["estimate"] == pytest.approx(bpb["injected"] - bpb["student"], abs=1e-12)
    assert bpb["student"] > 0 and bpb["teacher"] > 0
    store = HarvestStore(ArtifactCache(tmp_path / "cache").path("harvest", korean["harvest_key"]))
    rows = store.rows("heldout")
    assert len(rows) == 4 and len(store.rows("train")) == 1  # the one train text a store needs
    assert all(int(rows[i]["truncated_tokens"]) == 0 and len(rows[i]["input_ids"]) <= 48 for i in range(4))
