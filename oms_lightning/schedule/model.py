"""The model schedule (OMS-DPM, Liu et al., ICML 2023): which zoo member runs at every network evaluation.

A `ModelSchedule` is K solver steps from noisy to clean. Step k covers the time interval
(t_start, t_end) with t_start > t_end, and has one member name per NFE: `members[j]` is the model used by
NFE j of that step, so the step's order is `len(members)`. Consecutive steps are contiguous (step k's
t_end is step k+1's t_start), and every time lies in (0, 1] (continuous VP time).

The solver names and how many NFEs a step may have come from `SOLVER_REGISTRY`
(`oms_lightning.diffusion.solvers`): singlestep dpm_solver 1-3 per step (each NFE may use another member),
multistep dpm_solver++ / dpm_solver++3m and ddim exactly 1, EDM's heun exactly 2.

Steps are numbered from 0 (the noisy end) in messages. Member names are only checked against a zoo in
`validate(known_members=...)`; construction checks everything else.

A schedule may carry IIA coefficients (`Correction`: feature set, one row per step, and the fingerprints of the
weights and times they were fitted for). `meta` is a free-form JSON object (cost, fid, data, zoo, ...) that takes
no part in equality.

This module is the data type alone: its JSON file form is `oms_lightning.schedule.file` (`save_schedule`,
`load_schedule`), the OMS-DPM slot encoding `oms_lightning.schedule.slots` (`to_slots`, `from_slots`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oms_lightning.diffusion.solvers import SolverError, SolverSpec, get_solver
from oms_lightning.errors import UserError

_TIME_TOL = 1e-12


class ScheduleError(UserError, ValueError):
    """An invalid model schedule or schedule file; the message says which step / value / file is wrong."""


def _solver(name: Any) -> SolverSpec:
    """The registry entry, as a ScheduleError so that schedule callers catch one exception type."""
    try:
        return get_solver(name)
    except SolverError as e:
        raise ScheduleError(str(e)) from None


def _as_time(value: Any, what: str) -> float:
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:
            value = value.item()  # numpy / torch scalars
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{what} must be a number, got {value!r}")
    return float(value)


def _as_members(members: Any) -> tuple[str, ...]:
    if isinstance(members, str):
        members = (members,)
    try:
        members = tuple(members)
    except TypeError:
        raise ScheduleError(f"members must be a sequence of member names, got {members!r}") from None
    for j, m in enumerate(members):
        if not isinstance(m, str) or not m:
            raise ScheduleError(f"NFE {j}: member names must be non-empty strings, got {m!r}")
    return members


@dataclass(frozen=True)
class Step:
    """One solver step from t_start (noisier) to t_end (cleaner); NFE j uses `members[j]`."""

    t_start: float
    t_end: float
    members: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "t_start", _as_time(self.t_start, "t_start"))
        object.__setattr__(self, "t_end", _as_time(self.t_end, "t_end"))
        object.__setattr__(self, "members", _as_members(self.members))

    @property
    def order(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Correction:
    """IIA coefficients of one schedule (Zhang, Kenta, Kleijn, ICLR 2024): `coefficients[k]` holds one float per
    feature of `feature_set` (the solver registry's IIA_FEATURE_SETS) for step k. They are fitted for exact
    weights and times, so they carry both: `weights` is `Zoo.fingerprint(member_names)` at fitting time and
    `plain_key` the `schedule_key` of the uncorrected schedule (its solver, times and members)."""

    feature_set: str
    coefficients: tuple[tuple[float, ...], ...]
    weights: str
    plain_key: str

    def __post_init__(self):
        try:
            rows = tuple(tuple(float(c) for c in row) for row in self.coefficients)
        except (TypeError, ValueError):
            raise ScheduleError(f"IIA coefficients must be one list of numbers per step, got {self.coefficients!r}") \
                from None
        object.__setattr__(self, "coefficients", rows)
        for name in ("feature_set", "weights", "plain_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ScheduleError(f"IIA correction: {name} must be a non-empty string, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ModelSchedule:
    """K steps from noisy to clean, each with its time interval and the member name of every NFE; optionally the
    IIA coefficients of every step (`correction`), which take part in equality and in `schedule_key`."""

    steps: tuple[Step, ...]
    solver: str = "dpm_solver"
    meta: dict = field(default_factory=dict, compare=False)
    correction: Correction | None = None

    def __post_init__(self):
        steps = self.steps
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise ScheduleError(f"steps must be a sequence of Step, got {type(steps).__name__}")
        coerced = []
        for k, s in enumerate(steps):
            try:
                if isinstance(s, Step):
                    coerced.append(s)
                elif isinstance(s, Mapping):
                    coerced.append(Step(s.get("t_start"), s.get("t_end"), s.get("members", ())))
                elif isinstance(s, (tuple, list)) and len(s) == 3:
                    coerced.append(Step(*s))
                else:
                    raise ScheduleError(f"must be a Step or (t_start, t_end, members), got {s!r}")
            except ScheduleError as e:
                raise ScheduleError(f"step {k}: {e}") from None
        object.__setattr__(self, "steps", tuple(coerced))
        if not isinstance(self.meta, Mapping):
            raise ScheduleError(f"meta must be a dict, got {type(self.meta).__name__}")
        object.__setattr__(self, "meta", dict(self.meta))
        self._check_structure()
        if self.correction is not None:
            self._check_correction()

    def _check_correction(self) -> None:
        """The coefficients fit this solver, step count and feature set, and were fitted for these very times and
        members (the plain schedule's key); ScheduleError naming the step or what differs otherwise."""
        c = self.correction
        if not isinstance(c, Correction):
            raise ScheduleError(f"correction must be a Correction, got {type(c).__name__}")
        try:
            _solver(self.solver).check_coefficients([list(r) for r in c.coefficients], len(self.steps), c.feature_set)
        except SolverError as e:
            raise ScheduleError(str(e)) from None
        if c.plain_key != schedule_key(self.plain()):
            raise ScheduleError("the IIA coefficients were fitted for other times, members or solver than this "
                                "schedule's (a fingerprint mismatch): refit them with fit_coefficients.py")

    def plain(self) -> "ModelSchedule":
        """The same schedule without IIA coefficients."""
        return self if self.correction is None else dataclasses.replace(self, correction=None)

    def with_correction(self, feature_set: str, coefficients, weights: str) -> "ModelSchedule":
        """A copy carrying IIA coefficients fitted for these times and members, on the weights `weights`."""
        plain = self.plain()
        return dataclasses.replace(plain, correction=Correction(feature_set, coefficients, weights,
                                                                schedule_key(plain)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, steps: Iterable[Step | Sequence | Mapping], solver: str = "dpm_solver",
               meta: Mapping | None = None) -> "ModelSchedule":
        """Build and validate the structure; steps may be Step objects, (t_start, t_end, members) or dicts."""
        return cls(tuple(steps), solver, dict(meta or {}))

    @classmethod
    def from_times_and_members(cls, times: Sequence[float], members_per_step: Sequence[Sequence[str] | str],
                               solver: str = "dpm_solver", meta: Mapping | None = None) -> "ModelSchedule":
        """K+1 times (noisy → clean) and K member lists (a bare name means a 1-NFE step)."""
        times = _as_list(times, "times")
        members_per_step = _as_list(members_per_step, "members_per_step")
        if len(times) != len(members_per_step) + 1:
            raise ScheduleError(f"got {len(times)} times for {len(members_per_step)} steps; "
                                f"need K+1 = {len(members_per_step) + 1} times")
        return cls(tuple((times[k], times[k + 1], m) for k, m in enumerate(members_per_step)), solver, dict(meta or {}))

    @classmethod
    def single(cls, member: str, times: Sequence[float], solver: str = "dpm_solver",
               orders: int | Sequence[int] | None = None, meta: Mapping | None = None) -> "ModelSchedule":
        """One member at every NFE over the K+1 `times`.

        `orders` (an int for every step, or one per step) is the NFEs per step. Default: the solver's
        `default_nfe_per_step` in the registry (heun 2, the others 1; dpm_solver with order 1 is DDIM, pass e.g.
        orders=3 for DPM-Solver-3).
        """
        times = _as_list(times, "times")
        n_steps = len(times) - 1
        if orders is None:
            orders = _solver(solver).default_nfe_per_step
        if isinstance(orders, int) and not isinstance(orders, bool):
            orders = [orders] * max(n_steps, 0)
        orders = _as_list(orders, "orders")
        if len(orders) != n_steps:
            raise ScheduleError(f"got {len(orders)} orders for {n_steps} steps ({len(times)} times)")
        for k, o in enumerate(orders):
            if isinstance(o, bool) or not isinstance(o, int):
                raise ScheduleError(f"orders[{k}] must be an int, got {o!r}")
        return cls.from_times_and_members(times, [(member,) * o for o in orders], solver, meta)

    def with_meta(self, **entries: Any) -> "ModelSchedule":
        """A copy with `meta` updated by `entries` (the steps are shared)."""
        return dataclasses.replace(self, meta={**self.meta, **entries})

    # ------------------------------------------------------------------ views
    @property
    def nfe(self) -> int:
        return sum(len(s.members) for s in self.steps)

    @property
    def times(self) -> list[float]:
        """The K+1 step boundaries, noisy → clean."""
        return [self.steps[0].t_start] + [s.t_end for s in self.steps]

    @property
    def orders(self) -> list[int]:
        return [len(s.members) for s in self.steps]

    @property
    def members_per_nfe(self) -> list[str]:
        return [m for s in self.steps for m in s.members]

    @property
    def member_names(self) -> list[str]:
        return sorted({m for s in self.steps for m in s.members})

    def __len__(self) -> int:
        return len(self.steps)

    def cost(self, latency: Mapping[str, float]) -> float:
        """Σ over NFEs of latency[member] (OMS-DPM's cost model: solver arithmetic and switching are free)."""
        total = 0.0
        for k, s in enumerate(self.steps):
            for m in s.members:
                try:
                    total += float(latency[m])
                except KeyError:
                    raise ScheduleError(f"no latency for member {m!r} (step {k}); "
                                        f"known members: {_names(latency)}") from None
        return total

    # ------------------------------------------------------------------ validation
    def _check_structure(self, t_min: float = 0.0) -> None:
        if not self.steps:
            raise ScheduleError("empty schedule: a model schedule needs at least one step")
        spec = _solver(self.solver)
        lo, hi = spec.nfe_per_step
        for k, s in enumerate(self.steps):
            n = len(s.members)
            if not lo <= n <= hi:
                raise ScheduleError(f"step {k} has {n} member{'' if n == 1 else 's'}; {spec.rule}")
            for name in ("t_start", "t_end"):
                t = getattr(s, name)
                if not math.isfinite(t):
                    raise ScheduleError(f"step {k}: {name} is {t}; times must be finite")
                if not 0.0 < t <= 1.0:
                    raise ScheduleError(f"step {k}: {name} {t!r} is outside (0, 1]")
                if t < t_min:
                    raise ScheduleError(f"step {k}: {name} {t!r} is below t_min {t_min!r}")
            if not s.t_start > s.t_end:
                raise ScheduleError(f"step {k}: t_start {s.t_start!r} must be greater than t_end {s.t_end!r} "
                                    f"(steps run noisy → clean, times strictly decreasing)")
            if k > 0:
                prev = self.steps[k - 1].t_end
                if abs(s.t_start - prev) > _TIME_TOL:
                    raise ScheduleError(f"step {k} starts at t={s.t_start!r} but step {k - 1} ends at t={prev!r}; "
                                        f"steps must be contiguous")

    def validate(self, known_members: Iterable[str] | None = None, t_min: float = 0.0) -> "ModelSchedule":
        """Check the structure, that every time is ≥ t_min, and (if given) that every member is known.

        Returns self so it chains; raises ScheduleError naming the step and the offending value.
        """
        self._check_structure(t_min)
        if known_members is not None:
            known = set(known_members)
            for k, s in enumerate(self.steps):
                for j, m in enumerate(s.members):
                    if m not in known:
                        raise ScheduleError(f"step {k} NFE {j} uses unknown member {m!r}; "
                                            f"known members: {_names(known)}")
        return self

    # ------------------------------------------------------------------ display
    def compact(self) -> str:
        """E.g. 'dpm_solver: [small,small] [large]×3 [tiny,large,large] | t 1.0→0.001, NFE 8'."""
        parts: list[str] = []
        prev, run = None, 0
        for s in self.steps + (None,):
            key = s.members if s is not None else None
            if key == prev:
                run += 1
                continue
            if prev is not None:
                parts.append(f"[{','.join(prev)}]" + (f"×{run}" if run > 1 else ""))
            prev, run = key, 1
        t = self.times
        iia = f" + IIA {self.correction.feature_set}" if self.correction is not None else ""
        return f"{self.solver}{iia}: {' '.join(parts)} | t {t[0]!r}→{t[-1]!r}, NFE {self.nfe}"

    def __str__(self) -> str:
        return self.compact()


def schedule_key(schedule: ModelSchedule) -> str:
    """The one identity of a schedule — used by the record store, the score caches and the evolution's
    de-duplication: sha256 over its solver, times rounded to 1e-9 and members (not its meta)."""
    canon = {"solver": schedule.solver,
             "times": [round(float(t), 9) for t in schedule.times],
             "members": [list(s.members) for s in schedule.steps]}
    if schedule.correction is not None:  # (plain schedules keep the keys they always had)
        c = schedule.correction
        canon["correction"] = {"feature_set": c.feature_set,
                               "coefficients": [[round(v, 9) for v in row] for row in c.coefficients]}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------- helpers
def _as_list(x: Any, what: str) -> list:
    if isinstance(x, (str, bytes)):
        raise ScheduleError(f"{what} must be a sequence, got a string {x!r}")
    if hasattr(x, "tolist"):  # numpy arrays / torch tensors
        x = x.tolist()
    try:
        return list(x)
    except TypeError:
        raise ScheduleError(f"{what} must be a sequence, got {type(x).__name__}") from None


def _names(known: Iterable[str]) -> str:
    names = sorted(map(str, known))
    return ", ".join(names) if names else "(none)"

