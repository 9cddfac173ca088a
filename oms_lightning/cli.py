"""Shared by the Hydra entry points: user mistakes end with one clear line and a non-zero exit code."""
from __future__ import annotations

import functools
import sys

from oms_lightning.errors import UserError


def exit_on_user_error(task):
    """Wrap a Hydra task so a UserError prints `error: <what and how to fix>` and exits with status 2."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes through Hydra's handler: no traceback

    return wrapper
