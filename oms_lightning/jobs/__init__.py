"""The commands, one module per entry point (compose config → build → run → report): train, sample, search,
optimize_steps, fit_coefficients, cluster_stages, report. No job imports another job (tests/test_layout.py): what
jobs share lives in the library below, and `common.py` (not a job) loads the zoo and schedule two of them sample."""
