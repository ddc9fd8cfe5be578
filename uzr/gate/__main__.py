"""``python -m uzr.gate RUN_A RUN_B [--setting constant|gated]``: pair two runs' generated answers
(:func:`uzr.gate.answers.compare_runs`)."""

from uzr.gate.answers import main

if __name__ == "__main__":
    main()
