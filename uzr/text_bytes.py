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
