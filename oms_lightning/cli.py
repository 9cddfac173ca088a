"""Shared by the Hydra entry points: user mistakes end with one clear line and a non-zero exit code."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

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


def check_config_groups(argv: list[str], configs: str | Path) -> None:
    """Refuse an unknown option of a config group (`model=huge`) with one line listing the known ones, before Hydra
    answers with its own multi-line message and exit 1. Sweeps (`-m model=a,b`) check every value; other sweep
    syntax (`choice(...)`, globs) is left to Hydra."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        folder = Path(configs) / key
        if not sep or not folder.is_dir() or value in ("", "null") or any(c in value for c in "()*[]"):
            continue
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        unknown = [v for v in value.split(",") if v not in known]
        if unknown:
            print(f"error: unknown {key} {unknown[0]!r}; choose one of: {', '.join(known)} (configs/{key}/)",
                  file=sys.stderr)
            sys.exit(2)
