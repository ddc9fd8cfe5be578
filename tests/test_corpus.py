"""Tests for uzr.corpus: grouping, splitting, error messages; all offline and fast."""

import json

import datasets
import pytest

from uzr import corpus as corpus_mod
from uzr.corpus import Corpus, CorpusNotAvailableError, CorpusSpec, load_corpus, validate_corpus_spec


def texts(c: Corpus) -> list[str]:
    return list(c.train["text"]) + list(c.heldout["text"])


def write(tmp_path, name, content) -> str:
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else lambda s: p.write_text(s, encoding="utf-8"))(content)
    return str(p)


def para(word: str, n: int) -> str:
    """A paragraph of n seven-character words (with spaces), e.g. 'a-0000 a-0001 ...'."""
    return " ".join(f"{word}-{i:04d}" for i in range(n))


# --------------------------------------------------------------------------- pydoc


def test_pydoc_all_texts_within_bounds():
    c = load_corpus(CorpusSpec(num_texts=0))
    t = texts(c)
    assert len(t) >= 300
    assert all(200 <= len(x) <= 1200 for x in t)
    assert all(x == x.strip() for x in t)
    assert c.stats["texts"] == len(t) == c.stats["available"]
    assert c.stats["train"] == len(c.train) and c.stats["heldout"] == len(c.heldout)
    assert c.stats["truncated"] > 0 and c.stats["windowed"] == 0
    assert len(c.heldout) == round(0.2 * len(t))
    assert set(c.train.column_names) == {"text", "source_id"}
    assert all(s.startswith("pydoc:") for s in c.train["source_id"])


def test_default_num_texts_and_split_sizes():
    c = load_corpus(CorpusSpec())
    assert (len(c.train), len(c.heldout)) == (160, 40)
    c = load_corpus(CorpusSpec(num_texts=2, heldout_fraction=0.9))  # heldout clamped, train keeps 1
    assert (len(c.train), len(c.heldout)) == (1, 1)


def test_deterministic_and_disjoint():
    a, b = load_corpus(CorpusSpec(seed=3)), load_corpus(CorpusSpec(seed=3))
    assert list(a.train["text"]) == list(b.train["text"])
    assert list(a.heldout["text"]) == list(b.heldout["text"])
    other = load_corpus(CorpusSpec(seed=4))
    assert list(other.heldout["text"]) != list(a.heldout["text"])
    for c in (a, other):
        assert not set(c.train["source_id"]) & set(c.heldout["source_id"])
        assert not set(c.train["text"]) & set(c.heldout["text"])


# --------------------------------------------------------------------------- text files


def test_text_file_blank_lines_counted_and_paragraphs_merged(tmp_path):
    body = "\n".join([para("a", 30), "", "   ", "\t", para("b", 12), "", para("c", 12), "  ", ""])
    spec = CorpusSpec(name="t", source="text_file", path=write(tmp_path, "x.txt", body), min_chars=150)
    c = load_corpus(spec)
    # 5 blank lines (one empty, three whitespace-only, one at the end); "b" is too short alone, so it
    # is merged with "c"; a is long enough by itself.
    assert c.stats["skipped_empty"] == 6
    assert c.stats["paragraphs"] == 3
    assert sorted(texts(c)) == sorted([para("a", 30), para("b", 12) + "\n\n" + para("c", 12)])
    assert {s.rsplit(":", 1)[1] for s in texts_ids(c)} == {"1", "5"}


def test_glob_reads_several_files(tmp_path):
    write(tmp_path, "1.txt", para("a", 40))
    write(tmp_path, "2.txt", para("b", 40))
    c = load_corpus(CorpusSpec(name="g", source="text_file", path=str(tmp_path / "*.txt")))
    assert c.stats["documents"] == 2 and sorted(texts(c)) == [para("a", 40), para("b", 40)]


@pytest.mark.parametrize("mode", ["truncate", "window"])
def test_long_texts_truncated_or_windowed(tmp_path, mode):
    words = [f"w-{i:04d}" for i in range(300)]  # one 2099-char paragraph of 7-char words
    short = para("s", 40)  # 279 chars
    path = write(tmp_path, "long.txt", " ".join(words) + "\n\n" + short)
    c = load_corpus(CorpusSpec(name="l", source="text_file", path=path, long_text=mode, max_chars=500))
    # The last space at or before offset 500 is at 496, after 71 words: each piece holds 71 whole words.
    windows = [" ".join(words[k : k + 71]) for k in range(0, 284, 71)]  # 16 words (111 chars) remain
    if mode == "truncate":
        assert (c.stats["truncated"], c.stats["windowed"], c.stats["too_short"]) == (1, 0, 0)
        assert sorted(texts(c)) == sorted([windows[0], short])
    else:
        assert (c.stats["truncated"], c.stats["windowed"], c.stats["too_short"]) == (0, 1, 1)
        assert sorted(texts(c)) == sorted([*windows, short])
        assert sorted(i.rsplit(":", 1)[1] for i in texts_ids(c)) == ["1", "1+w1", "1+w2", "1+w3", "3"]
    assert all(len(x) <= 500 for x in texts(c))


def test_text_without_spaces_is_hard_cut(tmp_path):
    cjk = "".join(chr(0x4E00 + i) for i in range(1000))  # distinct: equal windows would be deduplicated
    path = write(tmp_path, "cjk.txt", cjk)
    c = load_corpus(CorpusSpec(name="c", source="text_file", path=path, num_texts=0, long_text="window",
                               max_chars=300))
    assert sorted(texts(c)) == [cjk[0:300], cjk[300:600], cjk[600:900]]
    assert c.stats["too_short"] == 1  # the last 100 chars


def test_unicode_round_trips_unchanged(tmp_path):
    paras = [
        "Café déjà vu, naïve façade, Ångström, Straße, Łódź, smörgåsbord. " * 2,
        "Emoji: 🧪🚀👩‍🔬 and flags 🇯🇵🇫🇷, plus a ZWJ family 👨‍👩‍👧 and a keycap 1️⃣. " * 2,
        "中文文本，日本語のテキスト、한국어 텍스트。全角スペース\u3000も含む。" * 3,
        "עברית מימין לשמאל, العربية من اليمين إلى اليسار \u200fمع علامة RLM\u200f. " * 2,
    ]
    paras = [p.strip() for p in paras]
    path = write(tmp_path, "u.txt", "\n\n".join(paras) + "\n")
    c = load_corpus(CorpusSpec(name="u", source="text_file", path=path, min_chars=50, max_chars=2000))
    assert sorted(texts(c)) == sorted(paras)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = write(tmp_path, "bad.txt", b"hello\n\xff\xfe world")
    with pytest.raises(ValueError, match=r"bad\.txt.*UTF-8.*byte offset 6"):
        load_corpus(CorpusSpec(name="b", source="text_file", path=path))


def test_empty_corpus_error_says_why(tmp_path):
    path = write(tmp_path, "small.txt", "\n\n".join(["tiny paragraph"] * 12))
    with pytest.raises(ValueError, match=r"small\.txt.*12 paragraphs.*min_chars=200"):
        load_corpus(CorpusSpec(name="s", source="text_file", path=path))
    path = write(tmp_path, "blank.txt", "\n  \n\t\n")
    with pytest.raises(ValueError, match=r"blank\.txt.*no non-blank text.*4 empty"):
        load_corpus(CorpusSpec(name="s", source="text_file", path=path))


# --------------------------------------------------------------------------- jsonl


def test_jsonl_records(tmp_path):
    lines = [json.dumps({"text": para("a", 40), "id": 1}), "", json.dumps({"text": "  "}),
             json.dumps({"text": para("b", 40)}, ensure_ascii=False)]
    c = load_corpus(CorpusSpec(name="j", source="jsonl", path=write(tmp_path, "d.jsonl", "\n".join(lines))))
    assert sorted(texts(c)) == [para("a", 40), para("b", 40)]
    assert c.stats["skipped_empty"] == 2
    assert {s.rsplit(":", 2)[1] for s in texts_ids(c)} == {"1", "4"}  # line numbers of the records


def texts_ids(c: Corpus) -> list[str]:
    return list(c.train["source_id"]) + list(c.heldout["source_id"])


@pytest.mark.parametrize(
    "bad_line, message",
    [("{not json", r"d\.jsonl:3: line 3 is not valid JSON"),
     ('{"body": "x"}', r"d\.jsonl:3: line 3 has no field 'text'"),
     ('["text"]', r"d\.jsonl:3: line 3 has no field 'text'"),
     ('{"text": 5}', r"d\.jsonl:3: line 3 field 'text' is int")],
)
def test_jsonl_bad_line_names_line(tmp_path, bad_line, message):
    good = json.dumps({"text": para("a", 40)})
    path = write(tmp_path, "d.jsonl", "\n".join([good, good, bad_line, good]))
    with pytest.raises(ValueError, match=message):
        load_corpus(CorpusSpec(name="j", source="jsonl", path=path))


# --------------------------------------------------------------------------- hub


def test_hub_rows_grouped_like_wikitext(monkeypatch):
    rows = ["", " = Title = \n", "", f" {para('a', 40)} \n", "", f" {para('b', 40)} \n", ""]
    seen = {}

    def fake_load(hub_id, config, split):
        seen.update(hub_id=hub_id, config=config, split=split)
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(corpus_mod.datasets, "load_dataset", fake_load)
    spec = CorpusSpec(name="w", source="hub", hub_id="x/wiki", hub_config="raw", hub_split="test")
    c = load_corpus(spec)
    assert seen == {"hub_id": "x/wiki", "config": "raw", "split": "test"}
    assert sorted(texts(c)) == sorted([f"= Title = \n\n {para('a', 40)}", para("b", 40)])
    assert c.stats["skipped_empty"] == 4


def test_hub_offline_not_cached_is_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/wiki' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(corpus_mod.datasets, "load_dataset", offline)
    with pytest.raises(CorpusNotAvailableError, match=r"'x/wiki'.*offline.*data=pydoc or a local file"):
        load_corpus(CorpusSpec(name="w", source="hub", hub_id="x/wiki"))


# --------------------------------------------------------------------------- validation


def test_missing_path_named_before_reading(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*does not exist"):
        validate_corpus_spec(CorpusSpec(name="m", source="text_file", path=missing))
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl.*matches no file"):
        load_corpus(CorpusSpec(name="m", source="jsonl", path=str(tmp_path / "*.jsonl")))


@pytest.mark.parametrize(
    "overrides, message",
    [({"source": "csv"}, r"corpus\.source='csv'.*\['pydoc', 'text_file', 'jsonl', 'hub', 'packaged', 'prompts'\]"),
     ({"long_text": "drop"}, r"corpus\.long_text='drop'.*\['truncate', 'window', 'tokens'\]"),
     ({"num_texts": 1}, r"corpus\.num_texts=1.*>= 2.*0 for all"),
     ({"num_texts": -5}, r"corpus\.num_texts=-5"),
     ({"heldout_fraction": 0.0}, r"corpus\.heldout_fraction=0\.0.*\(0, 1\)"),
     ({"heldout_fraction": 1}, r"corpus\.heldout_fraction=1 .*\(0, 1\)"),
     ({"seed": -1}, r"corpus\.seed=-1.*>= 0"),
     ({"min_chars": 0}, r"corpus\.min_chars=0.*>= 1"),
     ({"max_chars": 100}, r"corpus\.max_chars=100.*>= min_chars=200"),
     ({"name": ""}, r"corpus\.name=''"),
     ({"source": "text_file"}, r"corpus\.path=None.*'text_file' needs a file"),
     ({"source": "hub"}, r"corpus\.hub_id=None.*needs a dataset id"),
     ({"bogus": 1}, r"unknown keys \['bogus'\]")],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_corpus_spec({"name": "v", **overrides})


def test_validate_accepts_dictconfig():
    from omegaconf import OmegaConf

    spec = validate_corpus_spec(OmegaConf.structured(CorpusSpec(num_texts=10)))
    assert isinstance(spec, CorpusSpec) and spec.num_texts == 10
