"""Offline tiny tokenizers and the teacher -> student token alignment (DESIGN.md §4)."""

from __future__ import annotations

import pytest
import torch

from uzr.harvest.align import TokenAligner
from uzr.models.tokenizers import _serialized, _train_bpe, build_tiny_tokenizer

TEXTS = [
    "café naïve Ångström",
    "🙂👍🏽",
    "東京は日本の首都です",
    "مرحبا بالعالم",
    "שלום עולם",
    "31415926535897932384",
    "def f(x):\n    return  x + 1\t# done\n\n",
    "Mixed: €🙂 ok, naïve 東京 and 12345.",
]


@pytest.fixture(scope="module")
def toks():
    return {k: build_tiny_tokenizer(k) for k in ("bpe", "char")}


def random_causal(*lead: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random causal attention rows (..., n, n), each summing to 1."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*lead, n, n, generator=g) * 3
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


# ---------------------------------------------------------------- tokenizers


def test_unknown_kind_names_valid_kinds():
    with pytest.raises(ValueError, match="bpe.*char"):
        build_tiny_tokenizer("wordpiece")


def test_tokenizers_differ_and_define_specials(toks):
    bpe, char = toks["bpe"], toks["char"]
    text = "The quick brown fox jumps over the lazy dog."
    n_bpe, n_char = len(bpe(text)["input_ids"]), len(char(text)["input_ids"])
    assert n_bpe != n_char and n_char == len(text)  # char: one token per ASCII character, no BOS
    enc = bpe(text, return_offsets_mapping=True)
    assert enc["input_ids"][0] == bpe.bos_token_id and enc["offset_mapping"][0] == (0, 0)
    assert char.bos_token is None and char(text)["input_ids"][0] != char.pad_token_id
    for tok in (bpe, char):
        assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.model_max_length >= 10**6


def test_tokenizers_are_deterministic_and_cached(toks):
    assert _train_bpe().to_str() == _serialized("bpe")  # a fresh training run gives the same vocab
    again = build_tiny_tokenizer("bpe")
    assert again is not toks["bpe"] and again.get_vocab() == toks["bpe"].get_vocab()


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("text", TEXTS)
def test_offsets_reconstruct_text(toks, kind, text):
    tok = toks[kind]
    enc = tok(text, return_offsets_mapping=True)
    spans = [tuple(o) for o in enc["offset_mapping"] if o[1] > o[0]]
    # byte tokens of one character (or of a byte-fallback run) repeat the same span: count it once
    unique = [s for i, s in enumerate(spans) if i == 0 or s != spans[i - 1]]
    assert "".join(text[s:e] for s, e in unique) == text
    assert all(b[0] == a[1] for a, b in zip(unique, unique[1:]))  # contiguous, no gaps or overlaps
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_left_padding(kind):
    tok = build_tiny_tokenizer(kind)
    tok.padding_side = "left"
    texts = ["short", "a much longer sentence than that"]
    batch = tok(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    single = tok(texts[0])["input_ids"]
    n_pad = batch["input_ids"].shape[1] - len(single)
    assert n_pad > 0
    assert batch["input_ids"][0, :n_pad].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * n_pad + [1] * len(single)
    assert batch["input_ids"][0, n_pad:].tolist() == single
    assert build_tiny_tokenizer(kind).padding_side == "right"  # a fresh wrapper: the setting did not leak


# ---------------------------------------------------------------- alignment: identity


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("text", TEXTS)
def test_identical_tokenizers_give_identity(toks, kind, text):
    al = TokenAligner.from_text(text, toks[kind], toks[kind])
    n = al.n_student
    assert al.identity and al.n_teacher == n
    assert torch.equal(al.query_map, torch.arange(n))
    assert torch.equal(al.key_transfer, torch.eye(n))
    p = random_causal(2, 3, n=n)
    out = al.align(p)
    assert torch.equal(out, p) and out.data_ptr() != p.data_ptr()
    stats = torch.randn(4, n)
    assert torch.equal(al.gather_query_stats(stats), stats)
    d = al.diagnostics
    assert d["identity"] and d["dropped_mass_mean"] == 0.0 and d["self_fallback_rows"] == 0


def test_identity_from_offsets_with_shared_byte_spans():
    # byte tokens sharing spans must not be smeared over each other when both sides agree
    off = [(0, 0), (0, 1), (0, 1), (1, 2)]
    al = TokenAligner(off, off)
    assert al.identity and torch.equal(al.key_transfer, torch.eye(4))


# ---------------------------------------------------------------- alignment: mismatched tokenizers


@pytest.mark.parametrize("pair", [("bpe", "char"), ("char", "bpe")])
@pytest.mark.parametrize("text", TEXTS)
def test_mismatched_alignment_invariants(toks, pair, text):
    teacher, student = toks[pair[0]], toks[pair[1]]
    al = TokenAligner.from_text(text, teacher, student)
    T, S = al.n_teacher, al.n_student
    assert not al.identity and (len(al.teacher_input_ids), len(al.student_input_ids)) == (T, S)
    assert al.query_map.shape == (S,) and al.key_transfer.shape == (T, S)
    assert (al.query_map.diff() >= 0).all() and al.query_map.max() < T
    # both tokenizers cover every character, so each character-bearing teacher key keeps all its mass
    bearing = torch.tensor([e > s for s, e in teacher(text, return_offsets_mapping=True)["offset_mapping"]])
    torch.testing.assert_close(al.key_transfer[bearing].sum(1), torch.ones(int(bearing.sum())))
    out = al.align(random_causal(3, n=T, seed=len(text)))
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(3, S), atol=1e-5, rtol=0)
    assert (out >= 0).all() and out.triu(1).eq(0).all()
    d = al.diagnostics
    assert (d["n_teacher"], d["n_student"], d["identity"]) == (T, S, False)
    assert 0.0 <= d["dropped_mass_mean"] <= 1.0


@pytest.mark.parametrize("pair", [("bpe", "char"), ("char", "bpe"), ("bpe", "bpe")])
def test_leading_block_equals_the_leading_block_of_the_full_alignment(toks, pair):
    """Student rows < n read only teacher rows and keys < teacher_rows(n): aligning that teacher block
    gives the full alignment's leading (n, n) block, and n >= S gives the full alignment itself."""
    text = TEXTS[-1] + " " + TEXTS[6]
    al = TokenAligner.from_text(text, toks[pair[0]], toks[pair[1]])
    T, S = al.n_teacher, al.n_student
    p = random_causal(2, n=T, seed=3)
    full = al.align(p)
    assert al.leading(S) is al and al.leading(S + 5) is al and al.teacher_rows(S) == T
    for n in (1, 2, S // 3, S - 1):
        block = al.leading(n)
        t = al.teacher_rows(n)
        assert (block.n_student, block.n_teacher) == (n, t) and t == int(al.query_map[n - 1]) + 1
        assert block.identity == al.identity and (t == n if al.identity else t <= T)
        got = block.align(p[..., :t, :t])
        assert got.shape == (2, n, n)
        torch.testing.assert_close(got, full[..., :n, :n], atol=1e-6, rtol=1e-5)
        assert block.diagnostics["n_student"] == n
    assert al.leading(S // 3).teacher_rows(S // 3) < T  # the cut really drops teacher rows
    with pytest.raises(ValueError, match="teacher tokens"):
        al.leading(S // 3).align(p)  # the full teacher map is not the leading block


def test_byte_tokens_align_byte_for_byte(toks):
    # "€🙂": bpe gives 3 + 4 byte tokens with spans (0,1) and (1,2); the char tokenizer falls back to
    # 7 byte tokens all spanning (0,2). Bytes must map one to one, not by equal shares of characters.
    al = TokenAligner.from_text("€🙂", toks["bpe"], toks["char"])
    assert (al.n_teacher, al.n_student) == (8, 7)  # teacher has BOS
    assert torch.equal(al.key_transfer, torch.cat([torch.zeros(1, 7), torch.eye(7)]))
    assert al.query_map.tolist() == list(range(1, 8))


def test_hand_worked_example():
    # teacher "ab|cd", student "a|bc|d"
    al = TokenAligner([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)])
    assert al.query_map.tolist() == [0, 1, 1]  # "a" ends inside "ab"; "bc" and "d" end inside "cd"
    torch.testing.assert_close(al.key_transfer, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    p = torch.tensor([[1.0, 0.0], [0.4, 0.6]])
    # row "a":  "ab" -> a 0.5, bc 0.5 (future)         -> [1, 0, 0]
    # row "bc": [0.4, 0.6] -> [0.2, 0.2 + 0.3, 0.3(d, future)] -> [0.2, 0.5] / 0.7
    # row "d":  same teacher row, nothing in the future  -> [0.2, 0.5, 0.3]
    expected = torch.tensor([[1.0, 0.0, 0.0], [2 / 7, 5 / 7, 0.0], [0.2, 0.5, 0.3]])
    torch.testing.assert_close(al.align(p), expected)
    assert al.diagnostics["dropped_mass_mean"] == pytest.approx((0.5 + 0.3 + 0.0) / 3)
    torch.testing.assert_close(al.gather_query_stats(torch.tensor([7.0, 9.0])), torch.tensor([7.0, 9.0, 9.0]))


def test_uncovered_characters_join_the_next_token():
    # teacher offsets trimmed of whitespace ("a", "b" in "a b"), student covers the space
    al = TokenAligner([(0, 1), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    torch.testing.assert_close(al.key_transfer, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    assert al.query_map.tolist() == [0, 1, 1]


def test_batched_align_matches_per_slice():
    al = TokenAligner([(0, 0), (0, 3), (3, 4), (4, 6)], [(0, 2), (2, 4), (4, 5), (5, 6)])
    p = random_causal(2, 3, n=4, seed=1)
    out = al.align(p)
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(out[a, b], al.align(p[a, b]))


# ---------------------------------------------------------------- special-token policy


def test_teacher_bos_without_student_bos_is_dropped():
    al = TokenAligner([(0, 0), (0, 1), (1, 2)], [(0, 1), (1, 2)])
    assert al.query_map.tolist() == [1, 2]
    assert torch.equal(al.key_transfer, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    expected = torch.tensor([[1.0, 0.0], [0.3 / 0.8, 0.5 / 0.8]])  # BOS mass 0.5 and 0.2 dropped
    torch.testing.assert_close(al.align(p), expected)
    d = al.diagnostics
    assert d["dropped_mass_mean"] == pytest.approx(0.35) and d["self_fallback_rows"] == 0


def test_bos_maps_to_bos():
    al = TokenAligner([(0, 0), (0, 2)], [(0, 0), (0, 1), (1, 2)])
    assert al.query_map.tolist() == [0, 1, 1]
    torch.testing.assert_close(al.key_transfer, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    p = torch.tensor([[1.0, 0.0], [0.4, 0.6]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [4 / 7, 3 / 7, 0.0], [0.4, 0.3, 0.3]])
    torch.testing.assert_close(al.align(p), expected)
    assert al.diagnostics["self_fallback_rows"] == 0


def test_student_bos_without_teacher_bos_falls_back_to_self():
    al = TokenAligner([(0, 1), (1, 2)], [(0, 0), (0, 1), (1, 2)])
    assert al.query_map.tolist() == [0, 0, 1]
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.7]])
    torch.testing.assert_close(al.align(p), expected)
    al.align(p.expand(4, 2, 2))
    assert al.diagnostics["self_fallback_rows"] == 1 + 4  # accumulated over both calls


def test_trailing_student_special_reads_previous_query():
    al = TokenAligner([(0, 0), (0, 1), (1, 2)], [(0, 0), (0, 2), (0, 0)], student_special=[True, False, True])
    assert al.query_map.tolist() == [0, 2, 2]
    assert al.key_transfer[:, 2].eq(0).all()  # an end-of-text special receives no key mass


# ---------------------------------------------------------------- from_text truncation


@pytest.mark.parametrize("pair", [("bpe", "char"), ("char", "bpe")])
def test_truncation_cuts_teacher_to_student_characters(toks, pair):
    teacher, student = toks[pair[0]], toks[pair[1]]
    text = "Alignment truncates the teacher to the characters the student still sees, " * 3
    al = TokenAligner.from_text(text, teacher, student, max_length=20)
    assert al.n_student == 20 == len(al.student_input_ids)
    full_t = teacher(text, return_offsets_mapping=True)
    covered = max(e for s, e in student(text, return_offsets_mapping=True)["offset_mapping"][:20])
    T = al.n_teacher
    assert al.teacher_input_ids.tolist() == full_t["input_ids"][:T]
    assert full_t["offset_mapping"][T - 1][0] < covered <= full_t["offset_mapping"][T][0]
    out = al.align(random_causal(n=T))
    torch.testing.assert_close(out.sum(-1), torch.ones(20), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_align_on_gpu_matches_cpu():
    al = TokenAligner([(0, 0), (0, 3), (3, 4), (4, 6)], [(0, 2), (2, 4), (4, 5), (5, 6)])
    p = random_causal(2, n=4, seed=2)
    out = al.align(p.cuda().half())  # any float dtype in, float32 out
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), al.align(p.half()), atol=1e-6, rtol=0)
    assert al.gather_query_stats(torch.arange(4.0).cuda()).device.type == "cuda"
    assert al.diagnostics["self_fallback_rows"] == 0
