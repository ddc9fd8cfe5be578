"""Checkable questions: the built-in prompt set of the gate and facts QA (:mod:`uzr.qa.prompts`, with the answerable
prompts uzr computes itself in :mod:`uzr.qa.checkable`), facts QA by answer likelihood (:mod:`uzr.qa.facts`), the
attention-bound QA items whose answer is in the prompt (:mod:`uzr.qa.attention_bound`), and
generated answers judged against the fact tables (:mod:`uzr.qa.answers`)."""
