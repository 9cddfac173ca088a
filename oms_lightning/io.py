"""Kill-safe file writes, inter-process locks and the reader of the project's tagged JSON files.

Every file the project writes goes through `atomic_path`: the bytes go to a temporary file *next to the target*
(never under $TMPDIR, which may be another filesystem where a "move" is a copy over the old file), are fsynced,
and replace the target in one rename. A kill at any moment leaves either the old file or the new one, never a
torn one, and the previous file stays in place until the new one is complete.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from oms_lightning.errors import UserError

TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is fsynced and replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a result file should read like any other
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphans(folder: str | os.PathLike, name: str) -> int:
    """Delete temporary files a killed `atomic_path` left for `folder/name`; returns how many."""
    orphans = list(Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"))
    for p in orphans:
        p.unlink(missing_ok=True)
    return len(orphans)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, so that plain text and JSON writers do not pay for importing torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextmanager
def file_lock(path: str | os.PathLike, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (created if missing), released on exit or when the process dies.
    `waiting(holder)` is called once if another process holds it, so a user sees why nothing happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                f.seek(0)
                waiting(f.read().strip() or "another process")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_tagged_json(path: str | os.PathLike, fmt: str, kind: str, fix: str) -> dict:
    """The JSON object of one of the project's tagged files (`{"format": fmt, ...}`: stages, AYS steps), or a
    UserError naming the file, what is wrong with it and `fix`. The caller checks the content."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{kind} file {path} is unreadable or not JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        found = d.get("format") if isinstance(d, dict) else None
        raise UserError(f"{path} is not an oms-lightning {kind} file (format {found!r}, expected {fmt!r}); {fix}")
    return d
