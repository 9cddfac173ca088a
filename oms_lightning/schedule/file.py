"""A model schedule on disk: JSON, read and written by `save_schedule` / `load_schedule`.

The file is one JSON object tagged `"format": "oms-lightning/model-schedule-v1"` — the solver, the steps (t_start,
t_end and the member of every NFE) and `meta` — or `-v2` when the schedule carries IIA coefficients: v2 adds
`"correction"` (the `Correction`: its feature set, one row of coefficients per step, and the fingerprints of the
weights and of the plain schedule they were fitted for). A plain schedule is always written as v1, so every
version reads it; v1 files still load. The JSON is strict (no NaN / Infinity), and every malformed file is
refused with a ScheduleError naming the file and the offending key or step.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oms_lightning.io import atomic_write_text
from oms_lightning.schedule.model import Correction, ModelSchedule, ScheduleError

FORMAT = "oms-lightning/model-schedule-v1"
FORMAT_V2 = "oms-lightning/model-schedule-v2"   # v1 + optional IIA coefficients ("correction"); v1 files still load

_CORRECTION_KEYS = {"feature_set", "coefficients", "weights", "plain_key"}


def correction_to_dict(correction: Correction) -> dict:
    return {"feature_set": correction.feature_set, "coefficients": [list(r) for r in correction.coefficients],
            "weights": correction.weights, "plain_key": correction.plain_key}


def correction_from_dict(d: Any) -> Correction:
    if not isinstance(d, Mapping) or set(d) != _CORRECTION_KEYS:
        raise ScheduleError(f"'correction' must be an object with exactly the keys {sorted(_CORRECTION_KEYS)}, "
                            f"got {d!r}")
    return Correction(d["feature_set"], d["coefficients"], d["weights"], d["plain_key"])


def schedule_to_dict(schedule: ModelSchedule) -> dict:
    """v1 for a plain schedule (readable by every version), v2 when it carries IIA coefficients."""
    d = {
        "format": FORMAT if schedule.correction is None else FORMAT_V2,
        "solver": schedule.solver,
        "steps": [{"t_start": s.t_start, "t_end": s.t_end, "members": list(s.members)} for s in schedule.steps],
        "meta": dict(schedule.meta),
    }
    if schedule.correction is not None:
        d["correction"] = correction_to_dict(schedule.correction)
    return d


def schedule_from_dict(d: Any, source: str | os.PathLike | None = None) -> ModelSchedule:
    """Inverse of `schedule_to_dict`; `source` (e.g. the file) prefixes error messages."""
    where = f"{source}: " if source is not None else ""

    def fail(msg: str):
        raise ScheduleError(where + msg)

    if not isinstance(d, Mapping):
        fail(f"a model schedule must be a JSON object, got {type(d).__name__}")
    if "format" not in d:
        fail(f"not an oms-lightning model schedule (no 'format' key; expected {FORMAT!r})")
    if d["format"] not in (FORMAT, FORMAT_V2):
        fail(f"unsupported format {d['format']!r}; expected {FORMAT!r} or {FORMAT_V2!r}")
    allowed = {"format", "solver", "steps", "meta"} | ({"correction"} if d["format"] == FORMAT_V2 else set())
    extra = sorted(set(d) - allowed, key=str)
    if extra:
        fail(f"unexpected key(s) {extra}; allowed: {sorted(allowed)}")
    for key in ("solver", "steps"):
        if key not in d:
            fail(f"missing key {key!r}")
    if not isinstance(d["solver"], str):
        fail(f"'solver' must be a string, got {d['solver']!r}")
    if not isinstance(d["steps"], list):
        fail(f"'steps' must be a list, got {type(d['steps']).__name__}")
    meta = d.get("meta", {})
    if not isinstance(meta, Mapping):
        fail(f"'meta' must be an object, got {type(meta).__name__}")
    steps = []
    step_keys = {"t_start", "t_end", "members"}
    for k, s in enumerate(d["steps"]):
        if not isinstance(s, Mapping):
            fail(f"steps[{k}] must be an object with {sorted(step_keys)}, got {s!r}")
        missing = sorted(step_keys - set(s))
        if missing:
            fail(f"steps[{k}] is missing key(s) {missing}")
        extra = sorted(set(s) - step_keys, key=str)
        if extra:
            fail(f"steps[{k}] has unexpected key(s) {extra}")
        for name in ("t_start", "t_end"):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(f"steps[{k}].{name} must be a number, got {v!r}")
        mem = s["members"]
        if not isinstance(mem, list) or not all(isinstance(m, str) for m in mem):
            fail(f"steps[{k}].members must be a list of member names, got {mem!r}")
        steps.append((float(s["t_start"]), float(s["t_end"]), tuple(mem)))
    try:
        correction = correction_from_dict(d["correction"]) if "correction" in d else None
        return ModelSchedule(tuple(steps), d["solver"], dict(meta), correction)
    except ScheduleError as e:
        raise ScheduleError(where + str(e)) from None


def schedule_to_json(schedule: ModelSchedule, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity); ScheduleError if meta holds something JSON cannot represent."""
    try:
        return json.dumps(schedule_to_dict(schedule), indent=indent, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ScheduleError(f"schedule meta is not JSON-serialisable: {e}") from None


def schedule_from_json(text: str, source: str | os.PathLike | None = None) -> ModelSchedule:
    where = f"{source}: " if source is not None else ""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{where}invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return schedule_from_dict(d, source)


def save_schedule(schedule: ModelSchedule, path: str | os.PathLike) -> Path:
    """Write JSON atomically: serialised first, then one rename, so a failure leaves no partial file."""
    text = schedule_to_json(schedule) + "\n"
    path = Path(path)
    atomic_write_text(path, text)
    return path


def load_schedule(path: str | os.PathLike) -> ModelSchedule:
    path = Path(path)
    if not path.exists():
        raise ScheduleError(f"schedule file not found: {path}")
    if path.is_dir():
        raise ScheduleError(f"{path} is a directory, not a schedule file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{path}: cannot read schedule file ({e})") from None
    return schedule_from_json(text, source=path)
