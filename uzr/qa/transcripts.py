"""The built-in prompt set as chat transcripts: texts to harvest for the controller the live demo uses.

The default controller learns the teacher's attention on plain prose (pydoc) and the live demo runs it on the
student's chat template, whose tokens it never saw: at the last prompt position its top keys are template tokens,
with almost none of its mass on the first token where the student puts most of its own (experiments/live_demo).
``data=chat_prompts`` harvests what the demo shows instead: each text is one prompt of the built-in set
(:mod:`uzr.qa.prompts`) in the student's chat format followed by a short answer — the fact-table answer, or a
refusal for a prompt without one. Train and held-out texts follow the prompt set's own split, so the held-out
prompts that the gate and the generated-answer table evaluate are never harvested.
"""

from __future__ import annotations

from uzr.qa.prompts import Prompt, PromptSet, answer_prefix, format_prompt, resolve_format

REFUSAL = "I don't know."


def transcript(prompt: Prompt, tokenizer, style: str = "auto") -> str:
    """One prompt as the student sees it in the demo, followed by its answer (``"Paris."``) or :data:`REFUSAL`."""
    answer = f"{prompt.answer}." if prompt.answer else REFUSAL
    return format_prompt(prompt.question, tokenizer, style) + answer_prefix(resolve_format(tokenizer, style)) + answer


def prompt_transcripts(tokenizer, seed: int = 0, heldout_fraction: float = 0.25, style: str = "auto"
                       ) -> dict[str, list[tuple[str, str]]]:
    """``{"train": [(prompt id, text), ...], "heldout": [...]}``: every prompt of ``PromptSet(seed,
    heldout_fraction)`` as a :func:`transcript`, on its own side of the set's split."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for p in PromptSet(seed, heldout_fraction).all:
        out[p.split].append((f"prompts:{p.id}", transcript(p, tokenizer, style)))
    return out
