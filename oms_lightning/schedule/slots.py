"""The OMS-DPM reference code's encoding of a model schedule: K triplets of integers, one per step (`to_slots` /
`from_slots`). 0 is the null model (no NFE), i + 1 is `members[i]` of the zoo's sorted member list, so the
encoding of `to_slots(schedule, zoo.names)` is stable; a step's NFEs fill the first slots of its triplet.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from oms_lightning.schedule.model import ModelSchedule, ScheduleError, _as_list, _as_time

SLOTS_PER_STEP = 3


def to_slots(schedule: ModelSchedule, members: Sequence[str]) -> list[list[int]]:
    """K×3 ints: 0 = null, i+1 = members[i] (the zoo's sorted names); a step's NFEs fill its first slots."""
    index = _member_index(members)
    rows = []
    for k, s in enumerate(schedule.steps):
        if len(s.members) > SLOTS_PER_STEP:  # cannot happen for the known solvers; kept as a guard
            raise ScheduleError(f"step {k} has {len(s.members)} NFEs; the slot encoding holds {SLOTS_PER_STEP}")
        row = []
        for m in s.members:
            if m not in index:
                raise ScheduleError(f"step {k} uses member {m!r}, which is not in members {list(members)}")
            row.append(index[m] + 1)
        rows.append(row + [0] * (SLOTS_PER_STEP - len(row)))
    return rows


def from_slots(slots: Sequence[Sequence[int]], members: Sequence[str], times: Sequence[float],
               solver: str = "dpm_solver", meta: Mapping | None = None) -> ModelSchedule:
    """Decode K slot triplets over the K+1 time grid `times` (noisy → clean).

    Within a triplet the null slots are removed, so a step's order is its number of non-null slots (in
    their original order). A triplet that is all null is no step: its interval is merged into the next
    non-empty step, which then starts where the null run started (the sampler's state simply skips the
    empty step). Null triplets at the clean end are merged into the last non-empty step, which then ends
    at times[-1]. The result therefore always spans times[0] → times[-1]. All-null slots: ScheduleError.
    """
    index = _member_index(members)
    slots = _as_list(slots, "slots")
    grid = [_as_time(t, f"times[{i}]") for i, t in enumerate(_as_list(times, "times"))]
    if len(grid) != len(slots) + 1:
        raise ScheduleError(f"got {len(grid)} times for {len(slots)} slot rows; need K+1 = {len(slots) + 1}")
    for i, t in enumerate(grid):
        if not math.isfinite(t) or not 0.0 < t <= 1.0:
            raise ScheduleError(f"times[{i}] = {t!r} must be finite and in (0, 1]")
        if i and not t < grid[i - 1]:
            raise ScheduleError(f"times must be strictly decreasing; times[{i}] = {t!r} "
                                f"follows times[{i - 1}] = {grid[i - 1]!r}")
    names = list(index)
    decoded: list[list] = []  # [t_start, t_end, members]
    pending_start = None  # start of a run of null triplets
    for k, row in enumerate(slots):
        row = _as_list(row, f"slots row {k}")
        if len(row) != SLOTS_PER_STEP:
            raise ScheduleError(f"slots row {k} has {len(row)} entries; each step is a triplet of "
                                f"{SLOTS_PER_STEP} slots")
        used = []
        for j, v in enumerate(row):
            if hasattr(v, "item") and not isinstance(v, (int, float)):
                v = v.item()  # numpy / torch integer scalars
            if isinstance(v, bool) or not isinstance(v, int):
                raise ScheduleError(f"slots row {k} slot {j} must be an int, got {v!r}")
            if not 0 <= v <= len(names):
                raise ScheduleError(f"slots row {k} slot {j} is {v}; valid values are 0 (null) .. "
                                    f"{len(names)} (members {names})")
            if v:
                used.append(names[v - 1])
        if not used:
            if pending_start is None:
                pending_start = grid[k]
            continue
        t_start = grid[k] if pending_start is None else pending_start
        pending_start = None
        decoded.append([t_start, grid[k + 1], tuple(used)])
    if not decoded:
        raise ScheduleError(f"all {len(slots)} slot rows are null; a schedule needs at least one NFE")
    decoded[-1][1] = grid[-1]  # trailing null rows: extend the last step to the end of the grid
    return ModelSchedule(tuple(tuple(s) for s in decoded), solver, dict(meta or {}))


def _member_index(members: Sequence[str]) -> dict[str, int]:
    """Name → index for the slot encoding; the list must be the zoo's names, sorted and unique."""
    members = _as_list(members, "members")
    if not members or not all(isinstance(m, str) and m for m in members):
        raise ScheduleError(f"members must be a non-empty list of member names, got {members!r}")
    if members != sorted(set(members)):
        raise ScheduleError(f"members must be the zoo's names in sorted order without duplicates "
                            f"(so slot indices never silently permute), got {members}")
    return {m: i for i, m in enumerate(members)}
