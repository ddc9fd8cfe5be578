"""Injection: the student's attention pulled toward a prior over keys at run time (DESIGN.md §6).

- :mod:`~uzr.injection.injector`: the :class:`~uzr.injection.injector.Injector` (a model edit on the
  ``uzr`` attention function) and the alpha schedules;
- :mod:`~uzr.injection.priors`: what is injected (``inject.source``: controller, student_self, uniform, stored rows);
- :mod:`~uzr.injection.oracle`: the live teacher oracle (``inject.source=teacher`` on texts without stored rows);
- :mod:`~uzr.injection.sinks`: attention sinks and ``inject.sinks=keep``.
"""
