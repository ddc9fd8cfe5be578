"""``python -m uzr.report outputs/multirun/<sweep> [--name NAME] [--out DIR]``: see :mod:`uzr.report.sweep`."""

from uzr.report.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
