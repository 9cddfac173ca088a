"""Progress that reads well wherever it goes: a live tqdm bar on a terminal; redirected to a file or a pipe, one
plain line every `PLAIN_EVERY` seconds and one at the end, so a log holds events instead of redraws.

    with progress(total=len(todo), desc="schedule→FID", unit="schedule") as bar:
        bar.update(); bar.set_postfix(fid=3.2)

`PlainProgressBar` does the same for Lightning's Trainer (its own bar redraws every step).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, Iterable

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

PLAIN_EVERY = 30.0   # seconds between two plain progress lines


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable | None = None, **kw: Any):
    """tqdm on a terminal, `PlainProgress` otherwise (same calls: update, set_postfix, write, close, iteration)."""
    if on_terminal(kw.get("file")):
        return tqdm(iterable, dynamic_ncols=True, **kw)
    return PlainProgress(iterable, **kw)


def write(message: str) -> None:
    """A message line that does not tear a live bar."""
    tqdm.write(message) if on_terminal() else print(message, flush=True)


class PlainProgress:
    """The subset of tqdm the project uses, as plain lines: `desc: 12/40 (30 %), 8 s, 1.5/s, key=value`."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, leave: bool = True, every: float = PLAIN_EVERY, file=None, **_ignored: Any):
        self.iterable, self.desc, self.unit, self.disable, self.leave = iterable, desc, unit, disable, leave
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.every, self.file = total, 0, every, file
        self.postfix: dict[str, Any] = {}
        self.started = self.last = time.monotonic()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:
        self.postfix = kw

    def set_description(self, desc: str, refresh: bool = False) -> None:
        self.desc = desc

    @staticmethod
    def write(message: str) -> None:
        print(message, flush=True)

    def close(self) -> None:
        if not self.disable and self.leave and self.n:
            self._line()
        self.disable = True

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}"
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done}, {elapsed:.0f} s{rate}{extra}", file=self.file or sys.stderr, flush=True)
        self.last = time.monotonic()


class PlainProgressBar(ProgressBar):
    """Lightning's progress as plain lines (for logs): the step, its share of max_steps, speed and the logged
    losses, every `every` seconds, and one line when fit ends."""

    def __init__(self, every: float = PLAIN_EVERY):
        super().__init__()
        self.every, self._enabled, self._last, self._started, self._first_step = every, True, 0.0, 0.0, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = self._last = time.monotonic()
        self._first_step = trainer.global_step   # a resumed run counts its own speed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._enabled and time.monotonic() - self._last >= self.every:
            self._line(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._line(trainer)

    def _line(self, trainer) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._started
        step, most = trainer.global_step, trainer.max_steps
        share = f"/{most} ({100 * step / most:.0f} %)" if most and most > 0 else ""
        metrics = "".join(f", {k}={float(v):.4g}" for k, v in self.get_metrics(trainer, trainer.lightning_module).items()
                          if k != "v_num" and _is_number(v))
        print(f"train: step {step}{share}, {elapsed:.0f} s, "
              f"{(step - self._first_step) / elapsed if elapsed else 0:.2f} steps/s{metrics}",
              flush=True)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def job_log(job: str) -> Callable[[str], None]:
    """A job's log: one flushed line per event, prefixed by the job's name (`[search] …`)."""
    def log(msg: str) -> None:
        print(f"[{job}] {msg}", flush=True)
    return log


@contextlib.contextmanager
def lightning_quiet():
    """Without Lightning's INFO lines (accelerator found, `max_epochs` reached) for a Trainer that is a step of a
    larger job (the search fits its predictor once per budget): they tell that job's user nothing. Warnings pass."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        yield
    finally:
        rank_zero.setLevel(level)


STAGE_SECONDS: dict[str, float] = {}   # where a run's time went, by stage (the search's summary.json: stage_seconds)


@contextlib.contextmanager
def stage(name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.perf_counter() - started


def waiting_for(holder: str) -> None:
    """What a search prints while a file lock of its cache is held by another run (`io.file_lock(waiting=...)`)."""
    job_log("search")(f"waiting for another search on the same cache ({holder}); its results will be reused")
