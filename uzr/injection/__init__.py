"""Injection: the student's attention pulled toward a prior over keys at run time (DESIGN.md §6).

- :mod:`~uzr.injection.injector`: the :class:`~uzr.injection.injector.Injector` (a model edit on the
  ``uzr`` attention function) and the alpha schedules;
- :mod:`~uzr.injection.priors`: what is injected (``inject.source``: controller, student_self, uniform, stored rows,
  emphasis);
- :mod:`~uzr.injection.emphasis`: a QA prompt's marked spans as student tokens (``inject.source=emphasis``);
- :mod:`~uzr.injection.qa_edits`: the injected student's per-batch edit on QA prompts, for each source;
- :mod:`~uzr.injection.oracle`: the live teacher oracle (``inject.source=teacher`` on texts without stored rows);
- :mod:`~uzr.injection.sinks`: attention sinks and ``inject.sinks=keep``.
"""
