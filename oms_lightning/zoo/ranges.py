"""Valid time ranges of zoo members: a multi-decoder stage path is trained on its own stage only (PAPERS.md §4),
so it may run only at times inside that stage. One rule for schedule checks (`Zoo.check_time_ranges`) and for the
search, whose spaces move an out-of-range NFE to a member that may run there (`MemberRanges.replacement`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.errors import UserError

FULL = (0.0, 1.0)
STAGE_MARK = ".s"   # `multistage.s1`: stage 1's path (shared encoder + its decoder) of the member file multistage.ckpt


def split_member_name(name: str) -> tuple[str, int | None]:
    """(member file stem, stage index or None): `multistage.s1` → ("multistage", 1); `small` → ("small", None)."""
    base, mark, stage = name.rpartition(STAGE_MARK)
    if mark and base and stage.isdigit():
        return base, int(stage)
    return name, None


@dataclass(frozen=True)
class MemberRanges:
    """name → (lo, hi) for the members restricted to part of the time axis; the others may run anywhere.
    A range starting at 0 is closed [0, hi], any other is (lo, hi] — a time on a stage boundary belongs to the
    lower stage, as in `diffusion.stages.stage_index`."""

    ranges: tuple[tuple[str, float, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def of(self, name: str) -> tuple[float, float]:
        return next(((lo, hi) for n, lo, hi in self.ranges if n == name), FULL)

    def valid_at(self, name: str, t: float) -> bool:
        lo, hi = self.of(name)
        return (lo <= t if lo == 0.0 else lo < t) and t <= hi

    def out_of_range(self, schedule, noise) -> list[tuple[int, int, str, float]]:
        """(step, NFE of the step, member, t) of every NFE whose member may not run at its time; every NFE time
        counts (the registry's nfe_times: inner points of singlestep solvers and Heun's corrector included)."""
        if not any(m in {n for n, _, _ in self.ranges} for m in schedule.member_names):
            return []
        times = iter(get_solver(schedule.solver).nfe_times(schedule.times, schedule.orders, noise))
        return [(k, j, m, t) for k, step in enumerate(schedule.steps)
                for j, (m, t) in enumerate(zip(step.members, times)) if not self.valid_at(m, t)]

    def replacement(self, name: str, t: float, members: Sequence[str]) -> str:
        """A member of `members` that may run at t in place of `name`: another stage of the same network if one
        covers t, else the first member valid there (e.g. the routed whole)."""
        base = split_member_name(name)[0]
        valid = [m for m in members if self.valid_at(m, t)]
        same_net = [m for m in valid if split_member_name(m)[0] == base]
        if not valid:
            raise UserError(f"no zoo member of {list(members)} may run at t={t:.4g}: with multi-decoder stage members, "
                            f"add their routed member or a plain member to zoo.members")
        return (same_net or valid)[0]
