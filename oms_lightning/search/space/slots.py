"""OMS-DPM's own spaces: `SlotSpace` (singlestep DPM-Solver, K steps × 3 NFE slots on a logSNR-uniform grid) and
`GridSpace` (DDIM / DPM-Solver++: a mask over a fixed timestep grid)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.spacing import default_t_end, timesteps
from oms_lightning.schedule import ModelSchedule, ScheduleError
from oms_lightning.schedule.slots import SLOTS_PER_STEP, from_slots, to_slots
from oms_lightning.search.space.base import RandomGenotypes, SlotGenes
from oms_lightning.zoo import MemberRanges


@dataclass(frozen=True)
class SlotSpace(SlotGenes, RandomGenotypes):
    """K × 3 slots over a zoo; `sample` draws OMS-DPM's random schedules for the schedule→FID dataset."""

    members: tuple[str, ...]
    max_steps: int
    noise: VPSchedule
    ranges: MemberRanges = MemberRanges()

    def __post_init__(self):
        if list(self.members) != sorted(set(self.members)) or not self.members:
            raise ScheduleError(f"members must be the zoo's sorted, unique names, got {list(self.members)}")
        if self.max_steps < 1:
            raise ScheduleError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.max_steps, SLOTS_PER_STEP)

    def decode(self, genotype: np.ndarray) -> ModelSchedule:
        rows = [list(map(int, r)) for r in np.asarray(genotype).reshape(self.shape) if np.any(r)]
        if not rows:
            raise ScheduleError("every slot is null: a schedule needs at least one NFE")
        nfe = sum(int(v != 0) for r in rows for v in r)
        times = timesteps("logsnr_uniform", len(rows), self.noise, t_end=default_t_end(nfe)).tolist()
        return from_slots(rows, self.members, times, meta={"spacing": "logsnr_uniform"})

    def key(self, g) -> Hashable:
        """Two genotypes decode to the same schedule iff their used rows, nulls removed, are equal."""
        return tuple(tuple(v for v in row if v) for row in np.asarray(g).tolist() if any(row))

    def encode(self, schedule: ModelSchedule) -> np.ndarray:
        """Real steps first, null rows after (one of the genotypes that decode to this schedule)."""
        if schedule.solver != "dpm_solver" or len(schedule.steps) > self.max_steps:
            raise ScheduleError(f"{schedule.compact()} is not in this space (dpm_solver, ≤ {self.max_steps} steps)")
        genotype = np.zeros(self.shape, dtype=np.int64)
        genotype[: len(schedule.steps)] = to_slots(schedule, self.members)
        return genotype

    def single(self, member: str, steps: int, order: int) -> ModelSchedule:
        """A single-member DPM-Solver-`order` schedule with `steps` steps (the baselines)."""
        genotype = np.zeros(self.shape, dtype=np.int64)
        genotype[:steps, :order] = self.members.index(member) + 1
        return self.decode(genotype)


# ---------------------------------------------------------------------------------------------------------------
# OMS-DPM's DDIM space: a mask over a fixed timestep grid
# ---------------------------------------------------------------------------------------------------------------
GRID_SOLVERS = {"ddim": "time_uniform", "dpm_solver++": "logsnr_uniform"}


@dataclass(frozen=True)
class GridSpace(SlotGenes, RandomGenotypes):
    """A length-L mask over a fixed grid of L + 1 times from t = 1 to t_end; entry i is null or a zoo member.

    The grid is uniform in time for DDIM and uniform in logSNR for multistep DPM-Solver++ (both 1 NFE per step).
    The selected entries i₁ < i₂ < … are the step starts: step j runs grid[i_j] → grid[i_{j+1}] with the member
    of entry i_j, and the last step ends at t_end — so the timestep subset is searched implicitly (OMS-DPM's DDIM
    space, L = 100 for CIFAR-10). Sampling always starts from pure noise at t = 1: null entries before the first
    selected one are merged into the first step, which then starts at grid[0] (as `schedule_slots.from_slots`
    merges null rows). `t_end` defaults to `default_t_end(grid_size)` and is fixed for the space, so the grid
    never moves with the NFE.
    """

    members: tuple[str, ...]
    grid_size: int
    noise: VPSchedule
    solver: str = "ddim"
    t_end: float | None = None
    ranges: MemberRanges = MemberRanges()

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        if list(self.members) != sorted(set(self.members)) or not self.members:
            raise ScheduleError(f"members must be the zoo's sorted, unique names, got {list(self.members)}")
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) or self.grid_size < 1:
            raise ScheduleError(f"grid_size must be a positive integer, got {self.grid_size!r}")
        if self.solver not in GRID_SOLVERS:
            raise ScheduleError(f"GridSpace supports the solvers {sorted(GRID_SOLVERS)}, got {self.solver!r} "
                                f"(use SlotSpace for singlestep dpm_solver)")
        t_end = default_t_end(self.grid_size) if self.t_end is None else float(self.t_end)
        if not self.noise.t_min <= t_end < 1.0:
            raise ScheduleError(f"t_end must lie in [t_min={self.noise.t_min}, 1), got {t_end}")
        object.__setattr__(self, "t_end", t_end)
        grid = timesteps(GRID_SOLVERS[self.solver], self.grid_size, self.noise, t_end=t_end).tolist()
        object.__setattr__(self, "_grid", tuple(grid))

    @property
    def shape(self) -> tuple[int]:
        return (self.grid_size,)

    @property
    def max_steps(self) -> int:
        return self.grid_size

    @property
    def times(self) -> tuple[float, ...]:
        """The L + 1 grid times, 1 → t_end."""
        return self._grid  # type: ignore[attr-defined]

    def decode(self, genotype: np.ndarray) -> ModelSchedule:
        g = np.asarray(genotype)
        if g.shape != self.shape:
            raise ScheduleError(f"a genotype of this space has shape {self.shape}, got {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            raise ScheduleError(f"genotype entries must be integers, got dtype {g.dtype}")
        if g.min() < 0 or g.max() > len(self.members):
            raise ScheduleError(f"genotype entries must be 0 (null) .. {len(self.members)} (members "
                                f"{list(self.members)}), got range [{g.min()}, {g.max()}]")
        selected = np.flatnonzero(g)
        if selected.size == 0:
            raise ScheduleError("every grid entry is null: a schedule needs at least one NFE")
        starts = [0, *selected[1:].tolist()]  # leading nulls merge into the first step (start from pure noise)
        times = [self._grid[i] for i in starts] + [self._grid[-1]]
        names = [self.members[int(g[i]) - 1] for i in selected]
        return ModelSchedule.from_times_and_members(times, names, solver=self.solver,
                                                    meta={"spacing": f"{GRID_SOLVERS[self.solver]} subset"})

    def key(self, g) -> Hashable:
        """Leading nulls merge into the first step, so its position is irrelevant."""
        sel = np.flatnonzero(np.asarray(g))
        return tuple(sel[1:].tolist()), tuple(np.asarray(g)[sel].tolist())

    def encode(self, schedule: ModelSchedule) -> np.ndarray:
        """The canonical genotype (first step at entry 0); ScheduleError if the schedule is not on this grid."""
        where = f"{schedule.compact()} is not in this space"
        if schedule.solver != self.solver:
            raise ScheduleError(f"{where}: its solver is {schedule.solver}, the space's is {self.solver}")
        grid = np.asarray(self._grid)
        genotype = np.zeros(self.shape, dtype=np.int64)
        for k, step in enumerate(schedule.steps):
            i = int(np.argmin(np.abs(grid[:-1] - step.t_start)))
            if abs(grid[i] - step.t_start) > 1e-9 or (k and genotype[i]):
                raise ScheduleError(f"{where}: step {k} starts at t={step.t_start!r}, not on the grid")
            if step.members[0] not in self.members:
                raise ScheduleError(f"{where}: step {k} uses {step.members[0]!r}, not one of {list(self.members)}")
            genotype[i] = self.members.index(step.members[0]) + 1
        if abs(schedule.steps[0].t_start - grid[0]) > 1e-9 or abs(schedule.steps[-1].t_end - grid[-1]) > 1e-9:
            raise ScheduleError(f"{where}: it must run from t={grid[0]} to t_end={grid[-1]}")
        return genotype

    def single(self, member: str, steps: int) -> ModelSchedule:
        """One member at `steps` roughly evenly spaced grid entries, the first included (the baselines)."""
        if member not in self.members:
            raise ScheduleError(f"unknown member {member!r}; this space has {list(self.members)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.grid_size:
            raise ScheduleError(f"steps must be an integer in 1..{self.grid_size}, got {steps!r}")
        genotype = np.zeros(self.shape, dtype=np.int64)
        genotype[(np.arange(steps) * self.grid_size) // steps] = self.members.index(member) + 1
        return self.decode(genotype)
