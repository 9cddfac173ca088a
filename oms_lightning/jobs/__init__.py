"""The commands: one module per entry point (compose config → build → run → report). No job imports another job:
what two jobs share lives in the library below (`common.py` holds what every job builds: device, zoo, evaluator,
logging)."""
