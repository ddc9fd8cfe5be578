"""Bits per byte on more text domains than the run's own corpus (``evaluate.domains``), each with its interval.

A domain is a ``conf/data`` option (``korean``, ``licenses``, ...). It is harvested as its own corpus by the
harvest stage itself (same build, same key rules, an ordinary ``harvest`` artifact in the cache, so a later run
that trains on that data with the same settings reuses it): the domain's texts are shuffled by its seed as
usual, and the first ``evaluate.num_texts`` of them (all when 0) form the held-out split; the store's train
split keeps one text, because a store needs one. The controllers never see a domain's texts.

Each domain's held-out texts then go through :func:`~uzr.evaluate.texts.score_settings` with the evaluate
stage's settings (plain and injected student): bits per byte of student, injected student and teacher, and the
paired bootstrap interval of injected minus student over that domain's texts.
"""

from __future__ import annotations

import dataclasses

from uzr.config.corpus import CorpusSpec, domain_spec
from uzr.harvest.stage import HarvestStage
from uzr.harvest.store import HarvestStore
from uzr.intervals import bits_per_byte_difference
from uzr.stages import REGISTRY

# heldout_fraction for a domain store: round(f * n) = n for every n a corpus has, clamped to n - 1 by the corpus
# (one text left for the train split)
_ALL_BUT_ONE = 1 - 1e-9


def evaluation_corpus(spec: CorpusSpec, num_texts: int) -> CorpusSpec:
    """``spec`` cut to ``num_texts`` held-out texts (0: all) plus the one train text a store needs."""
    return dataclasses.replace(spec, num_texts=num_texts + 1 if num_texts else 0, heldout_fraction=_ALL_BUT_ONE)


def domain_store(run, name: str) -> tuple[HarvestStore, str]:
    """The harvest store of domain ``name`` for this run's models and harvest settings (built when missing) and
    its key: an ordinary ``harvest`` artifact, keyed and built by the harvest stage with the domain as its data."""
    cfg = dataclasses.replace(run.cfg, data=evaluation_corpus(domain_spec(name), run.cfg.evaluate.num_texts))
    domain_run = dataclasses.replace(run, cfg=cfg)  # shares the run's models, memo and artifact records
    stage = HarvestStage()
    folder, _ = domain_run.artifact("harvest", stage.key_payload(cfg, {}), lambda f: stage.build(domain_run, f),
                                    version=REGISTRY["harvest"].version)
    return stage.load(domain_run, folder), folder.name  # the folder is named by the key


def domain_metrics(scores, plain: str, injected: str, cut: str, oracle: str | None = None) -> dict:
    """One domain's section: bits per byte of student, injected student and teacher, the paired interval of
    injected minus student (``scores``: a :class:`~uzr.evaluate.texts.TextScores`). ``oracle``: the setting that
    injected the teacher's own attention beside the run's source (``evaluate.oracle``), reported as ``oracle`` with
    its interval against the student and the injected student's against it (how far the source is from its
    ceiling)."""
    out = {"bits_per_byte": {"student": scores.bits_per_byte(plain), "injected": scores.bits_per_byte(injected),
                             "teacher": scores.teacher_bits_per_byte()},
           "num_texts": len(scores.bytes), "bytes": sum(scores.bytes), "cut": cut,
           # per text, so that two runs on the same texts (e.g. sinks keep vs replace) can be paired afterwards
           "per_text": {"bytes": list(scores.bytes), "nll_student": scores.settings[plain].nll,
                        "nll_injected": scores.settings[injected].nll}}
    if oracle is not None:
        out["bits_per_byte"]["oracle"] = scores.bits_per_byte(oracle)
        out["per_text"]["nll_oracle"] = scores.settings[oracle].nll
    if scores.bytes:
        pairs = {"injected_minus_student": (injected, plain)}
        if oracle is not None:
            pairs.update(oracle_minus_student=(oracle, plain), injected_minus_oracle=(injected, oracle))
        for name, (a, b) in pairs.items():
            difference = bits_per_byte_difference(scores.settings[a].nll, scores.settings[b].nll, scores.bytes)
            out["bits_per_byte"][name] = {**difference.as_dict(), "verdict": difference.verdict(higher_is_better=False)}
    return out
