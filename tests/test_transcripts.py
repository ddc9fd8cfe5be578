"""data.source=prompts: the built-in prompt set as the student's chat turns, split as the gate splits it."""

import pytest

from tests.conftest import resolved
from uzr.config import validate
from uzr.corpus import load_corpus
from uzr.qa.prompts import PromptSet, format_prompt
from uzr.qa.transcripts import REFUSAL, transcript

SPEC = {"name": "chat_prompts", "source": "prompts", "num_texts": 0, "seed": 0, "heldout_fraction": 0.25}


class ChatTokenizer:
    """A tokenizer with a chat template and nothing else: transcripts need only ``apply_chat_template``."""

    chat_template = "yes"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|user|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


def test_transcripts_are_the_prompt_sets_split_in_chat_format_with_the_fact_answer():
    corpus = load_corpus(SPEC, ChatTokenizer())
    prompts = PromptSet(0, 0.25).all
    by_id = {f"prompts:{p.id}": p for p in prompts}
    for split in ("train", "heldout"):
        ids = list(getattr(corpus, split)["source_id"])
        assert {by_id[i].split for i in ids} == {split}
        assert len(ids) == sum(p.split == split for p in prompts)
    france = next(t for t in corpus.train["text"] if "capital of France?" in t)
    assert france == "<|user|>What is the capital of France?<|end|><|assistant|>Paris."
    mars = next(p for p in prompts if not p.answerable)
    assert transcript(mars, ChatTokenizer()).endswith("<|assistant|>" + REFUSAL)
    assert transcript(prompts[0], None, "qa") == format_prompt(prompts[0].question) + f" {prompts[0].answer}."


def test_num_texts_samples_both_sides_in_proportion_and_deterministically():
    a, b = (load_corpus({**SPEC, "num_texts": 100}, ChatTokenizer()) for _ in range(2))
    assert (a.stats["train"], a.stats["heldout"]) == (77, 23)
    assert list(a.train["text"]) == list(b.train["text"])


def test_the_corpus_needs_the_student_tokenizer_and_the_gates_split():
    with pytest.raises(ValueError, match="student tokenizer"):
        load_corpus(SPEC, None)
    with pytest.raises(ValueError, match="gate.prompt_seed"):
        validate(resolved("+experiment=live_demo", "data.seed=1"))
    validate(resolved("+experiment=live_demo"))
