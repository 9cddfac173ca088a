"""Shared by the Hydra entry points: user mistakes end with one clear line and a non-zero exit code."""
from __future__ import annotations

import functools
import logging
import shutil
import sys
from pathlib import Path

from oms_lightning.errors import UserError


def exit_on_user_error(task):
    """Wrap a Hydra task so a UserError prints `error: <what and how to fix>` and exits with status 2, and a failed
    run leaves no run folder that holds nothing but Hydra's own files."""

    @functools.wraps(task)
    def wrapper(cfg):
        one_line_per_event()
        try:
            return task(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            remove_empty_run_folder()
            sys.exit(2)  # SystemExit passes through Hydra's handler: no traceback

    return wrapper


# Messages a user can do nothing about on a normal run (regexes on the start of the warning or log message).
SILENCED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",        # Lightning's own use of a torch API
    r"When using the `ThroughputMonitor`, you need to define a `flops_per_batch`",  # we report images/s, not FLOPs
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # step-based training
    r"You're resuming from a checkpoint that ended before the epoch ended",  # steps, not epochs, are the unit
)
SILENCED_LOGS = ("💡 Tip:",)  # Lightning advertising its cloud logger


def one_line_per_event() -> None:
    """Lightning prints every INFO record through its own console handler *and* propagates it to the root logger
    that Hydra configured (console + the run's .log file), so each event appeared twice: keep Hydra's."""
    import warnings

    import lightning  # noqa: F401 - its import installs the handler removed here

    root, lightning_log = logging.getLogger(), logging.getLogger("lightning")
    if root.handlers:
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)
    for handler in root.handlers + lightning_log.handlers:
        handler.addFilter(_drop_silenced)
    for pattern in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _drop_silenced(record) -> bool:
    return not str(record.getMessage()).lstrip().startswith(SILENCED_LOGS)


class ConsoleFormatter(logging.Formatter):
    """The terminal's log lines (configs/hydra/job_logging/oms.yaml): an INFO record is its message alone, like the
    jobs' own `[search] …` lines; anything worse says `warning:` / `error:` first. The run folder's .log file keeps
    Hydra's timestamps and logger names."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def remove_empty_run_folder() -> None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    folder = Path(hydra.runtime.output_dir)
    hydra_own = {".hydra", f"{hydra.job.name}.log"}  # what Hydra itself puts in a run folder
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= hydra_own:
        shutil.rmtree(folder, ignore_errors=True)


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
