"""Checkable reasoning tasks (DESIGN.md §9): the causal-loop generator and its scorer."""

from uzr.tasks.causal_loop import generate, parse_assignments, score_answer

__all__ = ["generate", "parse_assignments", "score_answer"]
