"""The schedule → FID store: an append-only JSON-lines file, the predictor's training data.

Line 1 is a header naming what every record was measured with; each further line is one record:

    {"format": "oms-lightning/schedule-fid-v1", "zoo": "<zoo fingerprint>", "settings": {n, seed, extractor, ...}}
    {"schedule": {...schedule_to_dict(schedule)...}, "key": "...", "cost": 0.0123, "nfe": 12, "fid": 41.7, "n": 1000,
     "extractor": "digits_classifier", "seed": 0, "zoo": "...", "settings": "<settings fingerprint>", "seconds": 9.8}

Records of different zoos (a retrained member) or FID settings (sample count, seed, extractor, reference split)
are not comparable, so opening a store whose header differs is an error, never a silent mix. `key` identifies
a schedule (solver, times rounded to 1e-9, members), so an interrupted generation skips what is done.

Durability: each record is one `write` of a whole line, flushed and fsync'ed, so a crash loses at most the
record in flight; its torn remains (a last line without newline, or unparsable) are skipped with a warning
when reading and cut off before the next append. Anything unparsable before the last line is corruption and
an error that names the line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text
from oms_lightning.schedule import ModelSchedule, schedule_key  # noqa: F401 - re-exported: the store's key

log = logging.getLogger(__name__)

FORMAT = "oms-lightning/schedule-fid-v1"
RECORD_KEYS = ("schedule", "key", "cost", "nfe", "fid", "n", "extractor", "seed", "zoo", "settings", "seconds")


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """Short sha256 of the settings as canonical JSON (key order does not matter)."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fid_settings(evaluator, n: int, seed: int) -> dict:
    """What makes FIDs comparable: sample count, noise seed, extractor (and its weights), the real split."""
    fp = dict(getattr(evaluator, "fingerprint", {}) or {})
    return {"n": int(n), "seed": int(seed), "extractor": evaluator.extractor_name,
            "split": getattr(evaluator, "split", None), "extractor_weights": fp.get("weights"),
            "real_images": fp.get("images"), "num_real": fp.get("num_images"),
            "features": fp.get("features")}


def _line_valid(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    return True

_TORN_REPORTED: set[Path] = set()


class RecordStore:
    """One schedule/FID JSON-lines file bound to a zoo fingerprint and FID settings (checked against its header).

    Creating the store writes the header atomically; opening an existing one only reads (a torn tail is
    repaired by the first `append`, not on open), so readers such as predictor training never modify it.
    """

    def __init__(self, path: str | os.PathLike, zoo_fingerprint: str, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.zoo = str(zoo_fingerprint)
        self.settings = json.loads(json.dumps(dict(settings), default=str))  # plain JSON values, as on disk
        self.settings_fingerprint = settings_fingerprint(self.settings)
        self._tail_checked = False
        if self.path.is_dir():
            raise UserError(f"record store {self.path} is a directory; set store.path= to a .jsonl file")
        if not self.path.exists() or self.path.stat().st_size == 0:
            header = {"format": FORMAT, "zoo": self.zoo, "settings": self.settings}
            atomic_write_text(self.path, json.dumps(header, allow_nan=False) + "\n")
            self._tail_checked = True
        else:
            self._check_header()

    # ------------------------------------------------------------------ header
    def _fix(self) -> str:
        return (f"delete {self.path} to start afresh, or keep it and write these records elsewhere "
                f"(another path: store.path=<file>.jsonl)")

    def _check_header(self) -> None:
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            header = json.loads(first) if first.endswith(b"\n") else None
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise UserError(f"{self.path} is not a schedule/FID record store: its first line is not a "
                            f"{FORMAT!r} header" + (f" (format {found!r})" if found else "")
                            + f"; {self._fix()}")
        if not isinstance(header.get("settings"), dict) or "zoo" not in header:
            raise UserError(f"{self.path} has a garbled header (needs 'zoo' and a 'settings' object); {self._fix()}")
        if header["zoo"] != self.zoo:
            raise UserError(f"{self.path} holds records of another zoo (fingerprint {header['zoo']}, this zoo is "
                            f"{self.zoo}): a member was retrained or the member set differs, so its FIDs do not "
                            f"apply; {self._fix()}")
        stored = header["settings"]
        if stored != self.settings:
            diffs = [f"{k}: stored {stored.get(k)!r}, now {self.settings.get(k)!r}"
                     for k in sorted(set(stored) | set(self.settings), key=str) if stored.get(k) != self.settings.get(k)]
            raise UserError(f"{self.path} was generated with other FID settings ({'; '.join(diffs)}), so its FIDs "
                            f"are not comparable; use the stored settings, or {self._fix()}")

    # ------------------------------------------------------------------ reading
    def _scan(self) -> tuple[list[dict], int, bool]:
        """(records, byte offset where the valid content ends, whether a torn tail follows it)."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline ("" if none)
        torn = bool(tail)
        if complete and not torn and not _line_valid(complete[-1]):  # unparsable last line, newline and all
            tail, complete, torn = complete[-1] + b"\n", complete[:-1], True
        records, end = [], 0
        for lineno, line in enumerate(complete, start=1):
            end += len(line) + 1
            if lineno == 1 or not line.strip():
                continue  # the header (checked on open) / a blank line
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{self.path} line {lineno} is not valid JSON (the file is corrupt, not merely cut "
                                f"short); remove that line by hand, or {self._fix()}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise UserError(f"{self.path} line {lineno} is not a schedule/FID record (no 'key'); remove that "
                                f"line by hand, or {self._fix()}")
            records.append(rec)
        if torn and self.path not in _TORN_REPORTED:  # once per file: every read of the store scans it
            _TORN_REPORTED.add(self.path)
            log.warning("%s: ignoring a torn last line (%d bytes; an interrupted write) — it is cut off at the next "
                        "append", self.path, len(tail))
        return records, end, torn

    def records(self) -> list[dict]:
        """Every complete record in file order (a torn last line is skipped with a warning)."""
        return self._scan()[0]

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def __len__(self) -> int:
        return len(self.records())

    # ------------------------------------------------------------------ writing
    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line, then flush and fsync (a crash loses at most this record)."""
        if not isinstance(record.get("key"), str):
            raise ValueError("a record needs a string 'key' (schedule_key(schedule))")
        rec = dict(record)
        fid = rec.get("fid")
        if isinstance(fid, float) and not math.isfinite(fid):
            rec["fid"] = None  # strict JSON; a non-finite FID is stored as null
        line = (json.dumps(rec, allow_nan=False) + "\n").encode()
        if not self._tail_checked:
            _, end, torn = self._scan()
            if torn:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
                log.info("%s: cut off the torn last line before appending", self.path)
            self._tail_checked = True
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def __repr__(self) -> str:
        return f"RecordStore({str(self.path)!r}, zoo={self.zoo}, settings={self.settings_fingerprint})"
