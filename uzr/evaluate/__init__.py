"""Evaluation: bits per byte with and without injection, habit distance, next-token KL, facts QA, heatmaps.

:mod:`~uzr.evaluate.passes` holds the measurements on one text, :mod:`~uzr.evaluate.stage` the stage
that runs them over the held-out rows of the store beside the teacher's own numbers.
"""

from uzr.evaluate.passes import (
    HABITS,
    Evaluator,
    StudentPass,
    habit_gap,
    heatmap_figure,
    mean_dicts,
    next_token_kl,
    nonfinite_message,
    student_pass,
)

__all__ = ["HABITS", "Evaluator", "StudentPass", "habit_gap", "heatmap_figure", "mean_dicts", "next_token_kl",
           "nonfinite_message", "student_pass"]
