"""Offline tokenizers for tests and tiny models: built in memory in milliseconds, no download.

Two deliberately different kinds, so that tests exercise token alignment (DESIGN.md §4, §10):

- ``"bpe"``: byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder), 512 tokens trained on
  the English help texts that ship with every Python (``pydoc_data.topics``). A TemplateProcessing
  post-processor prepends ``<s>``, a zero-width special at offset (0, 0), like Llama/Qwen-style BOS.
  Offsets are not trimmed: the leading space of ``" word"`` belongs to its token, so the non-special
  tokens' spans partition the text (a character split into several byte tokens gives each of them
  the same span, e.g. the four byte tokens of an emoji all carry (8, 9)).
- ``"char"``: character-level Unigram over printable ASCII and Latin-1 letters, with byte fallback
  (SentencePiece/Llama style): any other run of characters becomes its UTF-8 byte tokens
  ``<0xNN>``, all carrying the run's span. No BOS is added.

Both define ``</s>`` (eos) and ``<pad>``, are deterministic (same vocab on every call and in every
process), return character offsets into the input with ``return_offsets_mapping=True``, and pad on
either side (set ``tokenizer.padding_side = "left"``).
"""

from __future__ import annotations

import functools
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

KINDS = ("bpe", "char")
MODEL_MAX_LENGTH = 1_000_000_000  # tiny models set their own position limit; never truncate silently here
_BPE_VOCAB_SIZE = 512


def _train_bpe() -> Tokenizer:
    from pydoc_data.topics import topics

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)  # sorted: deterministic order
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _char_unigram() -> Tokenizer:
    chars = sorted(set(string.printable) | {chr(c) for c in range(0xA1, 0x100)})
    specials = ["<unk>", "<pad>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # the names Unigram's byte_fallback looks up
    # Only single characters are pieces, so the Viterbi segmentation is one token per known character.
    vocab = [(t, 0.0) for t in specials + byte_tokens] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


@functools.cache
def _serialized(kind: str) -> str:
    if kind == "bpe":
        return _train_bpe().to_str()
    if kind == "char":
        return _char_unigram().to_str()
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def build_tiny_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh transformers fast tokenizer of the given kind (``"bpe"`` or ``"char"``).

    The trained model is cached per process; each call returns a new wrapper object, so settings
    such as ``padding_side`` changed by one caller never leak into another.
    """
    special = {"eos_token": "</s>", "pad_token": "<pad>"}
    special |= {"bos_token": "<s>"} if kind == "bpe" else {"unk_token": "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_serialized(kind)), model_max_length=MODEL_MAX_LENGTH, **special
    )
