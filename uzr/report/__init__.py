"""Reports: the results table of one run (:mod:`uzr.report.table`), and the report of a sweep
(``python -m uzr.report``: :mod:`uzr.report.sweep`, figures in :mod:`uzr.report.figures`)."""
