"""Checkable questions: the built-in prompt set of the gate and facts QA (:mod:`uzr.qa.prompts`, with the answerable
prompts uzr computes itself in :mod:`uzr.qa.checkable`) and facts QA by answer likelihood (:mod:`uzr.qa.facts`)."""
