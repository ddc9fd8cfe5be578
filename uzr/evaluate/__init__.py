"""Evaluation: bits per byte with and without injection, habit distance, next-token KL, facts QA, heatmaps.

:mod:`~uzr.evaluate.passes` holds what is measured on one text, :mod:`~uzr.evaluate.texts` the one
function that scores any list of settings over held-out texts, and :mod:`~uzr.evaluate.stage` the
stage that reports them beside the teacher's own numbers. :mod:`~uzr.evaluate.injection` sets up the run's injection
(controllers, sinks, ``inject.heads``), :mod:`~uzr.evaluate.heads` profiles heads one at a time (``inject.heads=auto``).
"""

from uzr.evaluate.passes import HABITS, StudentPass, habit_gap, heatmap_figure, next_token_kl, student_pass
from uzr.evaluate.texts import PLAIN, Setting, TextScores, heldout_rows, injection_setting, score_settings

__all__ = ["HABITS", "PLAIN", "Setting", "StudentPass", "TextScores", "habit_gap", "heatmap_figure",
           "heldout_rows", "injection_setting", "next_token_kl", "score_settings", "student_pass"]
