"""Latency profiles: per member, the median seconds of one forward pass of a batch, how steady that measurement
was, and what it was measured on; and the cost model that prices a schedule from them (OMS-DPM's).

    profile = load_or_profile(zoo, "checkpoints/digits/latency.json", batch_size=256)   # see zoo.profiler
    cost = profile.cost(schedule)                # seconds per batch: the members' latencies summed over all NFEs

A routed multi-decoder member runs a different decoder per stage, so its NFEs are priced by the stage their
time falls in. Profiles are stored as JSON (`PROFILE_FORMAT`); files written before spreads were recorded still
load (with no spreads, so they count as quiet). Measuring a profile, and caching it, is `zoo.profiler`'s job.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.stages import stage_index
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text
from oms_lightning.schedule import ModelSchedule
from oms_lightning.zoo.devices import dtype_name
from oms_lightning.zoo.members import Zoo, routed_nets

PROFILE_FORMAT = "oms-lightning/latency-profile-v1"
MAX_SPREAD = 0.25  # a member whose speed moved more than this (relative) while measured makes a profile noisy
_ADDED_KEYS = ("spread", "spread_limit", "routed", "noise")  # absent from older v1 files (still load)


def is_finite_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _checked_latency(latency: Any) -> dict[str, float]:
    if not isinstance(latency, Mapping) or not latency:
        raise ValueError("latency must be a non-empty mapping of member name → seconds")
    for k, v in latency.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"latency[{k!r}] must map a name to a number of seconds, got {v!r}")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"latency[{k!r}] must be finite and positive, got {v!r}")
    return {k: float(v) for k, v in sorted(latency.items())}


def _checked_routed(routed: Any, names: Sequence[str]) -> dict[str, dict]:
    if not isinstance(routed, Mapping):
        raise ValueError(f"routed must be a mapping, got {routed!r}")
    out = {}
    for name, entry in routed.items():
        if name not in names or not isinstance(entry, Mapping) or set(entry) != {"boundaries", "latency"}:
            raise ValueError(f"routed[{name!r}] must be a profiled member's {{'boundaries', 'latency'}}, got {entry!r}")
        boundaries, latency = list(entry["boundaries"]), list(entry["latency"])
        if len(latency) != len(boundaries) + 1 or not all(is_finite_number(v) and v > 0 for v in latency):
            raise ValueError(f"routed[{name!r}]: need one positive latency per stage ({len(boundaries) + 1}), "
                             f"got {latency!r}")
        out[name] = {"boundaries": [float(b) for b in boundaries], "latency": [float(v) for v in latency]}
    return out


def _checked_spread(spread: Any, names: Sequence[str]) -> dict[str, float]:
    if not isinstance(spread, Mapping):
        raise ValueError(f"spread must be a mapping of member name → relative spread, got {spread!r}")
    for k, v in spread.items():
        if k not in names:
            raise ValueError(f"spread[{k!r}] is for a member the profile has no latency for")
        if not is_finite_number(v) or v < 0:
            raise ValueError(f"spread[{k!r}] must be a finite non-negative number, got {v!r}")
    return {k: float(v) for k, v in sorted(spread.items())}


@dataclass(frozen=True)
class LatencyProfile:
    """Median seconds per forward pass of one batch, per member, how steady each was, and what it was measured on.

    `spread[name]` is how far the member's speed moved while it was measured (see `zoo.profiler`); it is
    empty for profiles measured before spreads were recorded. `spread_limit` is the largest spread accepted as
    quiet when the profile was measured or reused; `noisy` says whether some member exceeded it.
    """

    latency: dict[str, float]
    batch_size: int
    device_name: str
    dtype: str
    zoo_fingerprint: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    spread: dict[str, float] = field(default_factory=dict)
    spread_limit: float = MAX_SPREAD
    # a routed multi-decoder member's cost depends on t (each NFE runs its stage's decoder): member → {"boundaries":
    # [...], "latency": [seconds per stage]}, with the zoo's noise schedule to place every NFE (`cost`)
    routed: dict[str, dict] = field(default_factory=dict)
    noise: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "latency", _checked_latency(self.latency))
        object.__setattr__(self, "spread", _checked_spread(self.spread, tuple(self.latency)))
        if not is_finite_number(self.spread_limit) or self.spread_limit < 0:
            raise ValueError(f"spread_limit must be a finite non-negative number, got {self.spread_limit!r}")
        object.__setattr__(self, "spread_limit", float(self.spread_limit))
        object.__setattr__(self, "routed", _checked_routed(self.routed, tuple(self.latency)))
        if self.routed and not isinstance(self.noise, Mapping):
            raise ValueError("a profile with routed multi-decoder members needs the zoo's noise schedule (noise)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        for name in ("device_name", "dtype", "zoo_fingerprint", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        self.created_at()  # parses, or ValueError

    def created_at(self) -> datetime:
        dt = datetime.fromisoformat(self.created)
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)

    @property
    def worst_spread(self) -> float:
        """The largest member spread; 0 when none was recorded (an old profile counts as quiet)."""
        return max(self.spread.values(), default=0.0)

    @property
    def noisy(self) -> bool:
        return self.worst_spread > self.spread_limit

    def noisy_members(self, limit: float | None = None) -> dict[str, float]:
        """Members whose spread exceeds `limit` (default: spread_limit), noisiest first."""
        limit = self.spread_limit if limit is None else limit
        over = [(n, v) for n, v in self.spread.items() if v > limit]
        return dict(sorted(over, key=lambda item: -item[1]))

    def cost(self, model_schedule: ModelSchedule) -> float:
        """Seconds per batch of the schedule: the sum of its members' latencies over all NFEs, where an NFE of a
        routed multi-decoder member costs the latency of the stage its time falls in."""
        if not any(m in self.routed for m in model_schedule.member_names):
            return model_schedule.cost(self.latency)
        times = get_solver(model_schedule.solver).nfe_times(model_schedule.times, model_schedule.orders,
                                                            self._noise_schedule)
        total = model_schedule.cost({m: (0.0 if m in self.routed else v) for m, v in self.latency.items()})
        for m, t in zip(model_schedule.members_per_nfe, times):
            if m in self.routed:
                stage = int(stage_index(torch.tensor(t, dtype=torch.float32), self.routed[m]["boundaries"]))
                total += self.routed[m]["latency"][stage]
        return total

    @functools.cached_property
    def _noise_schedule(self) -> VPSchedule:
        return VPSchedule.from_dict(dict(self.noise))

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> "LatencyProfile":
        if not isinstance(d, Mapping) or d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a latency profile (expected format {PROFILE_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(_ADDED_KEYS) - set(d))
        if missing:
            raise ValueError(f"latency profile is missing key(s) {missing}")
        return cls(**{k: d[k] for k in names if k in d})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyProfile":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"latency profile not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path} is not a valid latency profile ({e}); delete it to measure again") from None

    def matches(self, zoo: Zoo, batch_size: int, device_name: str) -> bool:
        return (self.zoo_fingerprint == zoo.fingerprint() and self.batch_size == batch_size
                and self.device_name == device_name and self.dtype == dtype_name(zoo.dtype)
                and set(self.latency) == set(zoo.names) and set(self.routed) == set(routed_nets(zoo)))
