"""evaluate.position_buckets: bits per byte by token position on long texts (uzr/evaluate/positions.py)."""

from __future__ import annotations

import json
import math
from pydoc_data.topics import topics

import numpy as np
import pytest

from tests.conftest import resolved
from tests.test_pipeline import run_train
from uzr.evaluate.positions import (
    BucketSums,
    bucket_sums,
    buckets_by_end,
    document_order,
    edge_characters,
    long_texts,
    position_buckets,
    position_section,
    score_positions,
    student_nll,
    teacher_nll,
)
from uzr.report.table import position_lines
from uzr.text_bytes import predicted_bytes, token_bytes

EDGES = [0, 40, 100, 250]


@pytest.fixture(scope="module")
def pair(tiny_models):
    """(student, its tokenizer, teacher, its tokenizer): tiny Llama (characters, no BOS) and tiny Gemma 3 (BPE, BOS)."""
    return (*tiny_models["llama"], *tiny_models["gemma3"])


@pytest.fixture(scope="module")
def texts(pair):
    _, student_tok, _, _ = pair
    return long_texts([topics[name] for name in sorted(topics)[:12]], student_tok, EDGES[-1], 2)


def test_token_bytes_add_up_to_the_predicted_bytes():
    text = "é ab  cd"  # a 2-byte character, and spaces that no token covers
    offsets = [(0, 0), (0, 1), (2, 4), (6, 8), (8, 8)]  # BOS, é, ab, cd, a zero-width special
    assert token_bytes(text, offsets) == [0, 2, 3, 4, 0]  # " ab" and "  cd": the gap goes to the token after it
    assert sum(token_bytes(text, offsets)) == predicted_bytes(text, offsets) == len(text.encode())
    no_bos = [(0, 1), (2, 4), (6, 8)]  # token 0 is given: its character is not predicted
    assert token_bytes(text, no_bos) == [0, 2, 4] and predicted_bytes(text, no_bos) == 6


def test_long_texts_have_the_last_edge_in_student_tokens(pair, texts):
    _, student_tok, _, _ = pair
    assert len(texts) == 2 and texts[0] != texts[1]
    assert [len(student_tok(t)["input_ids"]) for t in texts] == [EDGES[-1]] * 2
    assert texts[0].startswith(topics[sorted(topics)[0]][:100])  # pieces in the order given, joined by blank lines


def test_document_order_keeps_a_documents_pieces_adjacent_and_in_order():
    ids = ["pydoc:b:10", "pydoc:a:2+w1", "pydoc:b:9", "pydoc:a:2", "pydoc:a:10", "odd"]
    assert [ids[i] for i in document_order(ids)] == ["odd", "pydoc:a:2", "pydoc:a:2+w1", "pydoc:a:10", "pydoc:b:9",
                                                     "pydoc:b:10"]


def test_position_buckets_split_positions_at_the_edges():
    assert position_buckets(8, [0, 3, 6]).tolist() == [0, 0, 1, 1, 1, 1, 1]  # positions 1..7; 6 and 7 join the last
    assert position_buckets(5, [0, 2, 4]).tolist() == [0, 1, 1, 1]


def test_teacher_tokens_go_to_the_bucket_where_they_end():
    text = "abcdefghij"
    student = [(i, i + 1) for i in range(10)]  # one character per token, no BOS
    teacher = [(0, 0), (0, 3), (3, 5), (5, 8), (8, 10)]  # BOS, "abc", "de", "fgh", "ij"
    characters = edge_characters(student, [0, 4, 6, 10])
    assert characters == [4, 6]  # buckets start at student positions 4 ("e") and 6 ("g")
    # "abc" ends at 3 (bucket 0); "de" straddles the edge at 4 and ends at 5 (bucket 1); "fgh" ends at 8 (bucket 2)
    buckets = buckets_by_end(teacher, characters)
    assert buckets.tolist() == [0, 1, 2, 2]
    sums = bucket_sums([1.0, 2.0, 3.0, 4.0], teacher, text, buckets, 3)
    assert sums.nll.tolist() == [1.0, 2.0, 7.0] and sums.bytes.tolist() == [3, 2, 5] and sums.tokens.tolist() == [1, 1, 2]
    # a token that ends exactly at an edge's character is complete before that bucket
    assert buckets_by_end([(0, 0), (0, 4), (4, 6)], characters).tolist() == [0, 1]


def test_the_students_own_tokens_by_end_are_its_tokens_by_position(pair, texts):
    _, student_tok, _, teacher_tok = pair
    for tok in (student_tok, teacher_tok):
        offsets = [tuple(o) for o in tok(texts[0], return_offsets_mapping=True)["offset_mapping"]]
        assert np.array_equal(buckets_by_end(offsets, edge_characters(offsets, EDGES)),
                              position_buckets(len(offsets), EDGES))


def test_buckets_add_up_to_the_whole_texts_bits_per_byte(pair, texts):
    student, student_tok, teacher, teacher_tok = pair
    scored = score_positions(texts, EDGES, student, student_tok, teacher, teacher_tok, 8, None)
    sums = scored["sums"]
    assert set(sums) == {"teacher", "student"} and set(scored["seconds"]) == {"teacher", "student"}
    for text, s_sums, t_sums in zip(texts, sums["student"], sums["teacher"]):
        s_enc, t_enc = student_tok(text, return_offsets_mapping=True), teacher_tok(text, return_offsets_mapping=True)
        whole_student = float(student_nll(student, _ids(s_enc), 8, None).double().sum())
        whole_teacher = float(teacher_nll(teacher, _ids(t_enc)).double().sum())
        assert s_sums.bytes.sum() == predicted_bytes(text, [tuple(o) for o in s_enc["offset_mapping"]])
        assert t_sums.bytes.sum() == predicted_bytes(text, [tuple(o) for o in t_enc["offset_mapping"]])
        assert s_sums.nll.sum() == pytest.approx(whole_student, rel=1e-9)
        assert t_sums.nll.sum() == pytest.approx(whole_teacher, rel=1e-9)
        assert s_sums.tokens.tolist() == [39, 60, 150]  # positions 1-39, 40-99, 100-249
        assert (t_sums.bytes > 0).all() and t_sums.tokens.sum() == len(t_enc["input_ids"]) - 1
    section = position_section(sums, EDGES, 200, None)
    buckets = section["buckets"]
    assert list(buckets) == ["0-40", "40-100", "100-250"]
    assert [b["beyond_student_context"] for b in buckets.values()] == [False, False, True]
    for role in ("student", "teacher"):
        bytes_key = "bytes" if role == "student" else "teacher_bytes"
        bits = sum(b["bits_per_byte"][role] * b[bytes_key] for b in buckets.values())
        total = sum(b[bytes_key] for b in buckets.values())
        assert bits / total == pytest.approx(section["whole_bits_per_byte"][role], rel=1e-12)
    whole = sum(float(s.nll.sum()) for s in sums["student"]) / math.log(2) / sum(int(s.bytes.sum()) for s in sums["student"])
    assert section["whole_bits_per_byte"]["student"] == pytest.approx(whole, rel=1e-12)
    gap = buckets["0-40"]["bits_per_byte"]["teacher"] - buckets["0-40"]["bits_per_byte"]["student"]
    assert buckets["0-40"]["teacher_minus_student"] == pytest.approx(gap)


def test_one_text_gives_no_interval():
    """Resampling one text gives a zero-width interval around its own value: reported as no interval at all."""
    sums = {role: [BucketSums(np.array([nll]), np.array([100]), np.array([50]))]
            for role, nll in (("teacher", 60.0), ("student", 70.0), ("injected", 69.0))}
    difference = position_section(sums, [0, 51], None, None)["buckets"]["0-51"]["injected_minus_student"]
    assert difference["estimate"] == pytest.approx(-1.0 / (100 * math.log(2)))
    assert "low" not in difference and difference["verdict"].startswith("no interval: one text")
    lines = position_lines({"buckets": {"0-51": {"beyond_student_context": False, "teacher_minus_student": None,
                                                  "injected_minus_student": difference}}}, "injection")
    assert lines == [f"injection, tokens 0-51: bits per byte {difference['estimate']:+.4f} ({difference['verdict']}); "
                     "teacher - student —"]


def _ids(enc):
    import torch

    return torch.tensor([enc["input_ids"]])


@pytest.mark.parametrize(("edges", "fix"), [
    ("[0,1024,512]", "sort them: [0, 512, 1024]"),
    ("[-512,0,512]", "drop the negative edges: [0, 512]"),
    ("[512,1024]", "start at 0: [0, 512, 1024]"),
    ("[0,512,512]", "drop the repeated edges"),
    ("[0]", "add an end"),
])
def test_bad_bucket_edges_fail_at_validation_with_the_fix(edges, fix):
    with pytest.raises(ValueError, match="evaluate.position_buckets") as err:
        resolved("+experiment=smoke", f"evaluate.position_buckets={edges}")
    assert fix in str(err.value)


def test_bad_position_texts_and_data_fail_at_validation():
    from uzr.config.evaluate import EvaluateSpec, validate_position_buckets

    with pytest.raises(ValueError, match="give whole token positions"):  # Hydra refuses a float; a spec built in code
        validate_position_buckets(EvaluateSpec(position_buckets=[0, 0.5]))
    with pytest.raises(ValueError, match="evaluate.position_texts=0"):
        resolved("+experiment=smoke", "evaluate.position_texts=0")
    with pytest.raises(ValueError, match="evaluate.position_data: 'nope' is not a data option"):
        resolved("+experiment=smoke", "evaluate.position_data=nope")
    with pytest.raises(FileNotFoundError, match="evaluate.position_data"):
        resolved("+experiment=smoke", "evaluate.position_data=file:/no/such/file.txt")
    assert resolved("+experiment=smoke", "evaluate.position_buckets=[0,512]").evaluate.position_buckets == [0, 512]


def test_smoke_run_reports_position_buckets_with_intervals(tmp_path):
    proc = run_train(tmp_path, "+experiment=smoke", "stages=[harvest,controller,evaluate]", "evaluate.facts_qa=false",
                     "evaluate.figure=false", "logger=csv", "evaluate.position_buckets=[0,64,192]",
                     "evaluate.position_texts=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bits per byte, tokens 64-192 (3 long texts)" in proc.stdout
    assert "injection (controller), tokens 0-64: bits per byte" in proc.stdout
    section = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluate"]["position_buckets"]
    assert section["num_texts"] == 3 and section["texts"] == "pydoc: texts outside the run's train split"
    assert section["edges"] == [0, 64, 192] and set(section["seconds"]) == {"teacher", "student", "injected"}
    for bucket in section["buckets"].values():
        interval = bucket["injected_minus_student"]
        assert interval["n"] == 3 and interval["low"] <= interval["estimate"] <= interval["high"]
        bpb = bucket["bits_per_byte"]
        assert interval["estimate"] == pytest.approx(bpb["injected"] - bpb["student"], abs=1e-12)
    per_text = section["per_text"]
    assert [sum(t["tokens"]) for t in per_text["student"]] == [191] * 3  # positions 1..191 of 192-token texts
