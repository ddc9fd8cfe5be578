"""Bytes of text a causal LM predicts: the denominator of bits per byte (tokenizer-free)."""

from __future__ import annotations


def predicted_bytes(text: str, offsets: list[tuple[int, int]]) -> int:
    """UTF-8 bytes of ``text`` covered by tokens 1..S-1 (token 0 is given, not predicted).

    With a zero-width BOS at position 0 every character is predicted; without one, the first token's
    characters are not, so two tokenizers are compared on (almost) the same characters.
    """
    starts = [start for start, end in offsets[1:] if end > start]
    if not starts:
        return 0
    return len(text[min(starts):max(end for _, end in offsets)].encode("utf-8"))


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes each token of ``offsets`` (in text order) predicts, so that ``sum(token_bytes(...)) == predicted_bytes(...)``.

    Token 0 is given: 0 bytes. The first predicted token (of 1..S-1) with characters counts from its start;
    every later one from the furthest end seen so far to its own end, so characters between tokens (a space the
    offsets leave out) go with the token after them. Zero-width tokens (specials) count 0.
    """
    out, covered = [0] * len(offsets), None
    for index, (start, end) in enumerate(offsets[1:], 1):
        if end <= start:
            continue
        begin = start if covered is None else covered
        if end > begin:
            out[index] = len(text[begin:end].encode("utf-8"))
        covered = max(begin, end)
    return out
