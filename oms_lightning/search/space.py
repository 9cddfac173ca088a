"""Search spaces: what the evolution (`evolution.py`) searches, behind one protocol.

Every space implements `SearchSpace`: `sample_genotype`, `mutate`, `crossover`, `key` (a cheap identity of what a
genotype decodes to), `decode` → ModelSchedule, `encode` (a schedule of the space → a genotype), `repair` into a
cost window, and the unit-cost helpers the evolution's fast path uses. Genotypes are opaque to the evolution.

* `SlotSpace` — OMS-DPM's DPM-Solver space: K singlestep steps × 3 NFE slots, each slot null or a zoo member, on a
  logSNR-uniform grid (timesteps not searched). Genotype: a (K, 3) int array (0 = null, i + 1 = members[i]).
* `GridSpace` — OMS-DPM's DDIM space: a length-L mask over a fixed grid (the timestep subset searched implicitly).
* `SamplerSpace` — any solver of the registry with a member per NFE **and the time grid as genes**: a spacing
  choice among the standard ones plus a continuous perturbation of the interior step boundaries in λ (fixed
  ends). Every single-member sampler of `oms_lightning.evaluation` (member × solver × spacing × NFE) is a point of
  the SamplerSpace of its solver, so a search over it can always find its baselines.

`make_space(kind, members, noise, size)` builds one; `space_kinds()` lists the kinds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol, Sequence

import numpy as np
import torch

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import ODE_SOLVERS, SOLVER_REGISTRY, get_solver
from oms_lightning.diffusion.spacing import SPACINGS, default_t_end, timesteps
from oms_lightning.steps import AYS, AYS_GRID, AYSTable, ays_grid, spacing_times
from oms_lightning.errors import UserError
from oms_lightning.member_ranges import MemberRanges
from oms_lightning.schedule import ModelSchedule, ScheduleError, schedule_key
from oms_lightning.schedule_slots import SLOTS_PER_STEP, from_slots, to_slots


class SearchSpace(Protocol):
    """What the evolution needs of a space (genotypes G are opaque to it)."""

    members: tuple[str, ...]

    def sample_genotype(self, rng: np.random.Generator, null_prob: float = 0.8, alpha: float = 0.4) -> Any: ...
    def mutate(self, g: Any, rng: np.random.Generator, slots: tuple[int, int] = (1, 10)) -> Any: ...
    def crossover(self, a: Any, b: Any, rng: np.random.Generator) -> Any: ...
    def key(self, g: Any) -> Hashable: ...
    def decode(self, g: Any) -> ModelSchedule: ...
    def repair(self, g: Any, rng: np.random.Generator, unit: np.ndarray, lo: float, hi: float, cost_of) -> Any: ...
    def one_nfe(self, member: int) -> Any: ...
    def everywhere(self, member: int) -> Any: ...
    def unit_cost(self, g: Any, unit0: np.ndarray) -> float: ...
    def n_slots(self) -> int: ...


class SlotGenes:
    """Mutation, crossover and repair over a genotype's member slots (0 = null, i + 1 = members[i]).

    Subclasses give `shape` (of the slot array), `slots(g)` (a copy of g's slot array) and `with_slots(g, s)`.
    `_normalise(s)` lets a space keep its slot invariants (e.g. Heun rows all-null or all-members).
    """

    def slots(self, g) -> np.ndarray:
        return np.array(g, dtype=np.int64).reshape(self.shape)

    def with_slots(self, g, s: np.ndarray):
        return s

    def _normalise(self, s: np.ndarray) -> np.ndarray:
        return s

    def _within_ranges(self, g):
        """g, with every NFE whose member may not run at its time (a multi-decoder stage outside its stage, see
        `self.ranges`) given to a member that may: spaces sample, mutate, cross and repair only valid
        assignments. Decoded slot order: used rows (or grid entries) are steps, their used slots the NFEs."""
        if not self.ranges:
            return g
        bad = self.ranges.out_of_range(self.decode(g), self.noise)
        if not bad:
            return g
        s = self._normalise(self.slots(g))
        rows = [np.flatnonzero(s)] if s.ndim == 1 else [np.flatnonzero(r) for r in s]
        where = ([[(i,)] for i in rows[0]] if s.ndim == 1
                 else [[(r, c) for c in cols] for r, cols in enumerate(rows) if cols.size])
        for k, j, m, t in bad:
            s[where[k][j]] = self.members.index(self.ranges.replacement(m, t, self.members)) + 1
        return self.with_slots(g, s)

    def n_slots(self) -> int:
        return int(np.prod(self.shape))

    def unit_cost(self, g, unit0: np.ndarray) -> float:
        """Σ of the unit (1-NFE) costs of the used slots; unit0[0] = 0 for null."""
        return float(unit0[self.slots(g)].sum())

    def one_nfe(self, member: int):
        s = np.zeros(self.shape, dtype=np.int64)
        s.flat[0] = member + 1
        return self.with_slots(self._blank(), self._normalise(s))

    def everywhere(self, member: int):
        return self.with_slots(self._blank(), np.full(self.shape, member + 1, dtype=np.int64))

    def _blank(self):
        return np.zeros(self.shape, dtype=np.int64)

    def mutate(self, g, rng: np.random.Generator, slots: tuple[int, int] = (1, 10)):
        """Resample k ~ U{slots} distinct slots, each to null or a member (OMS-DPM's mutation); never all-null."""
        s = self.slots(g)
        flat = s.reshape(-1)
        k = min(int(rng.integers(slots[0], slots[1] + 1)), flat.size)
        idx = rng.choice(flat.size, size=k, replace=False)
        flat[idx] = rng.integers(0, len(self.members) + 1, size=k)
        if not flat.any():
            flat[idx[0]] = rng.integers(1, len(self.members) + 1)
        return self._within_ranges(self.with_slots(g, self._normalise(s)))

    def crossover(self, a, b, rng: np.random.Generator):
        """One-point crossover along the steps: rows 0..c-1 (the noisy end) from a, the rest from b."""
        sa, sb = self.slots(a), self.slots(b)
        n = self.shape[0]
        if n < 2:
            return a if rng.random() < 0.5 else b
        cut = int(rng.integers(1, n))
        child = sb.copy()
        child[:cut] = sa[:cut]
        if not child.any():
            child.reshape(-1)[rng.integers(child.size)] = rng.integers(1, len(self.members) + 1)
        return self._within_ranges(self._cross_rest(a, b, cut, self._normalise(child), rng))

    def _cross_rest(self, a, b, cut: int, child_slots: np.ndarray, rng):
        return self.with_slots(b, child_slots)

    def repair(self, g, rng: np.random.Generator, unit: np.ndarray, lo: float, hi: float, cost_of):
        """Move g into [lo, hi] by member moves (cost_of(genotype) → cost): while over, null a used slot or move it
        to a cheaper member; while under, fill a null slot with a member that fits or move a used one to a
        costlier member that fits. After a bounded number of tries, the closest under-budget genotype seen."""
        s = self.slots(g)
        flat = s.reshape(-1)
        cheapest = int(np.argmin(unit))
        best, best_cost = None, -math.inf
        for _ in range(20 * flat.size + 50):
            s = self.slots(self._within_ranges(self.with_slots(g, self._normalise(s))))
            flat = s.reshape(-1)
            c = cost_of(self.with_slots(g, s))
            if c <= hi:
                if c >= lo:
                    return self.with_slots(g, s)
                if c > best_cost:
                    best, best_cost = s.copy(), c
                gap = hi - c
                free = np.flatnonzero(flat == 0)
                fits = np.flatnonzero(unit <= gap)
                if free.size and fits.size and rng.random() < 0.8:
                    flat[rng.choice(free)] = rng.choice(fits) + 1
                    continue
                used = np.flatnonzero(flat)
                i = rng.choice(used)
                up = np.flatnonzero((unit > unit[flat[i] - 1]) & (unit - unit[flat[i] - 1] <= gap))
                if up.size:
                    flat[i] = rng.choice(up) + 1
                elif free.size and fits.size:
                    flat[rng.choice(free)] = rng.choice(fits) + 1
                else:
                    break  # nothing more fits
            else:
                used = np.flatnonzero(flat)
                if used.size == 1:
                    flat[used[0]] = cheapest + 1
                    continue
                i = rng.choice(used)
                down = np.flatnonzero(unit < unit[flat[i] - 1])
                flat[i] = rng.choice(down) + 1 if down.size and rng.random() < 0.5 else 0
        if best is None:
            return self._within_ranges(self.one_nfe(cheapest))
        return self.with_slots(g, best)


class RandomGenotypes:
    """OMS-DPM's random schedules, shared by every space with `members`, `shape`, `with_slots` and `decode`."""

    def sample_genotype(self, rng: np.random.Generator, null_prob: float = 0.8, alpha: float = 0.4) -> np.ndarray:
        """Member preferences p ~ Dirichlet(alpha), each slot ~ p, nulled with null_prob (all-null: redrawn)."""
        while True:
            preference = rng.dirichlet([alpha] * len(self.members))
            genotype = 1 + rng.choice(len(self.members), size=self.shape, p=preference)
            genotype[rng.random(self.shape) < null_prob] = 0
            if genotype.any():
                return self._within_ranges(self._random_rest(self._normalise(genotype), rng))

    def _random_rest(self, slots: np.ndarray, rng: np.random.Generator):
        return slots

    def sample(self, rng: np.random.Generator, null_prob: float = 0.8, alpha: float = 0.4) -> ModelSchedule:
        return self.decode(self.sample_genotype(rng, null_prob, alpha))


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


def random_schedules(space, n: int, seed: int, null_prob: float = 0.8,
                     alpha: float = 0.4) -> list[ModelSchedule]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng, null_prob, alpha) for _ in range(n)]


def single_member_anchors(space, nfes: Sequence[int], orders: Sequence[int] = (1, 2, 3)) -> list[ModelSchedule]:
    """Every member alone at every NFE in `nfes` the space can express (singlestep: with a constant order 1–3;
    grid spaces: one NFE per step). They anchor the predictor and are the single-model baselines."""
    if isinstance(space, SamplerSpace):
        return sampler_anchors(space, nfes)
    out = []
    for member in space.members:
        for nfe in nfes:
            if isinstance(space, SlotSpace):
                out += [space.single(member, nfe // o, o) for o in orders if nfe % o == 0 and nfe // o <= space.max_steps]
            elif nfe <= space.grid_size:
                out.append(space.single(member, nfe))
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Any registry solver, a member per NFE, and the time grid as genes
# ---------------------------------------------------------------------------------------------------------------
JITTER_MAX = 0.9      # an interior λ point moves by at most 0.9/2 of its smaller neighbouring step: order is kept


@dataclass(frozen=True)
class Genome:
    """A SamplerSpace genotype: member slots (K, S), the spacing's index, and K − 1 interior-point shifts."""

    slots: np.ndarray
    spacing: int = 0
    jitter: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass(frozen=True)
class SamplerSpace(SlotGenes, RandomGenotypes):
    """Up to `max_steps` steps of `solver` (any registry entry); each step's NFE slots are null or a member.

    Slots: S = the solver's most NFEs per step. A solver with a variable NFE count per step (singlestep
    DPM-Solver) takes a step's non-null slots as its NFEs, like SlotSpace; a solver with a fixed count (Heun's 2,
    DDIM's 1) keeps each row all-null or all-members (`_normalise` fills a partly null row from its first member),
    so costs stay additive over slots. All-null rows are no step.

    Times: the active steps K' get `timesteps(spacings[spacing], K', t_end = default_t_end(NFE))`; with
    `time_genes`, interior boundary i (1 ≤ i < K') then moves in λ by jitter[i−1]·min(Δλ left, Δλ right)/2,
    |jitter| ≤ JITTER_MAX, so the grid stays strictly decreasing and its ends never move. With zero jitter the
    times are exactly the spacing's, so single-member samplers are points of the space (`encode`).
    """

    members: tuple[str, ...]
    solver: str
    max_steps: int
    noise: VPSchedule
    spacings: tuple[str, ...] = SPACINGS
    time_genes: bool = True
    time_mutation_prob: float = 0.3
    ays: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...] = ()  # (member, its AYS σ levels for this solver)
    ranges: MemberRanges = MemberRanges()

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "ays", tuple((m, tuple(map(tuple, lv))) for m, lv in self.ays))
        # each member's AYS schedule is one more time grid, `ays:<member>`, open to every member assignment
        spacings = tuple(self.spacings) + tuple(n for n in (ays_grid(m) for m, _ in self.ays) if n not in self.spacings)
        object.__setattr__(self, "spacings", spacings)
        if list(self.members) != sorted(set(self.members)) or not self.members:
            raise ScheduleError(f"members must be the zoo's sorted, unique names, got {list(self.members)}")
        get_solver(self.solver)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ScheduleError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        known = (*SPACINGS, *(ays_grid(m) for m, _ in self.ays))
        unknown = [sp for sp in self.spacings if sp not in known]
        if not self.spacings or unknown:
            raise ScheduleError(f"spacings must be a non-empty subset of {list(known)}, got {list(self.spacings)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.max_steps, get_solver(self.solver).nfe_per_step[1])

    @property
    def fixed_rows(self) -> bool:
        lo, hi = get_solver(self.solver).nfe_per_step
        return lo == hi

    # ------------------------------------------------------------------ genes
    def slots(self, g: Genome) -> np.ndarray:
        return np.array(g.slots, dtype=np.int64).reshape(self.shape)

    def with_slots(self, g: Genome, s: np.ndarray) -> Genome:
        return Genome(s, g.spacing, g.jitter)

    def _blank(self) -> Genome:
        return Genome(np.zeros(self.shape, dtype=np.int64), 0, np.zeros(self.max_steps - 1))

    def _normalise(self, s: np.ndarray) -> np.ndarray:
        if not self.fixed_rows or s.shape[1] == 1:
            return s
        s = s.copy()
        for row in s:
            used = row[row != 0]
            if used.size and used.size < row.size:
                row[row == 0] = used[0]
        return s

    def _random_rest(self, slots: np.ndarray, rng: np.random.Generator) -> Genome:
        """A random spacing, and (half of the time, with time genes) random interior shifts."""
        jitter = np.zeros(self.max_steps - 1)
        if self.time_genes and rng.random() < 0.5:
            jitter = rng.uniform(-0.5, 0.5, size=self.max_steps - 1)
        return Genome(slots, int(rng.integers(len(self.spacings))), jitter)

    def mutate(self, g: Genome, rng: np.random.Generator, slots: tuple[int, int] = (1, 10)) -> Genome:
        """With `time_mutation_prob` (time genes on): a new spacing, the plain grid back (all shifts zero, so the
        standard spacings stay reachable), or 1–3 shifted interior points, equally likely; otherwise OMS-DPM's slot
        mutation."""
        if not self.time_genes or rng.random() >= self.time_mutation_prob:
            return super().mutate(g, rng, slots)
        kind = rng.random()
        if kind < 1 / 3 or self.max_steps < 2:
            return self._within_ranges(Genome(self.slots(g), int(rng.integers(len(self.spacings))), g.jitter))
        if kind < 2 / 3:
            return self._within_ranges(Genome(self.slots(g), g.spacing, np.zeros(self.max_steps - 1)))
        jitter = np.array(g.jitter, dtype=np.float64)
        k = min(int(rng.integers(1, 4)), jitter.size)
        idx = rng.choice(jitter.size, size=k, replace=False)
        jitter[idx] = np.clip(jitter[idx] + rng.normal(0.0, 0.25, size=k), -JITTER_MAX, JITTER_MAX)
        return self._within_ranges(Genome(self.slots(g), g.spacing, jitter))

    def _cross_rest(self, a: Genome, b: Genome, cut: int, child_slots: np.ndarray, rng) -> Genome:
        jitter = np.concatenate([np.asarray(a.jitter)[:cut], np.asarray(b.jitter)[cut:]])
        return Genome(child_slots, (a if rng.random() < 0.5 else b).spacing, jitter)

    # ------------------------------------------------------------------ phenotype
    def _rows(self, g: Genome) -> list[tuple[int, ...]]:
        return [tuple(int(v) for v in row if v) for row in self._normalise(self.slots(g)) if row.any()]

    def key(self, g: Genome) -> Hashable:
        rows = self._rows(g)
        used = np.round(np.asarray(g.jitter)[: max(len(rows) - 1, 0)], 6) if self.time_genes else ()
        return g.spacing, tuple(rows), tuple(float(v) for v in used)

    def grid(self, spacing: int, n_steps: int, nfe: int) -> torch.Tensor:
        """The unshifted times of spacing index `spacing`: a standard spacing, or a member's AYS schedule."""
        name = self.spacings[spacing]
        if name.startswith(AYS_GRID):
            levels = dict(self.ays)[name[len(AYS_GRID):]]
            return torch.tensor(spacing_times(AYS, n_steps, self.noise, ays=levels), dtype=torch.float64)
        return timesteps(name, n_steps, self.noise, t_end=default_t_end(nfe))

    def times(self, spacing: int, n_steps: int, nfe: int, jitter: np.ndarray | None = None) -> list[float]:
        times = self.grid(spacing, n_steps, nfe)
        jitter = np.zeros(0) if jitter is None or not self.time_genes else np.asarray(jitter)[: n_steps - 1]
        if n_steps < 2 or not np.any(jitter):
            return times.tolist()
        lam = self.noise.lambda_(times).clone()
        gaps = lam[1:] - lam[:-1]
        shift = torch.as_tensor(np.clip(jitter, -JITTER_MAX, JITTER_MAX), dtype=lam.dtype) \
            * torch.minimum(gaps[:-1], gaps[1:]) / 2
        lam[1:-1] = lam[1:-1] + shift
        out = times.clone()
        out[1:-1] = self.noise.t_of_lambda(lam[1:-1])
        return out.tolist()

    def decode(self, g: Genome) -> ModelSchedule:
        rows = self._rows(g)
        if not rows:
            raise ScheduleError("every slot is null: a schedule needs at least one NFE")
        nfe = sum(len(r) for r in rows)
        times = self.times(g.spacing, len(rows), nfe, g.jitter)
        return ModelSchedule.from_times_and_members(times, [[self.members[v - 1] for v in r] for r in rows],
                                                    solver=self.solver,
                                                    meta={"spacing": self.spacings[g.spacing]})

    def encode(self, schedule: ModelSchedule) -> Genome:
        """The zero-jitter genotype of a schedule on one of the space's spacings (e.g. a single-member sampler);
        ScheduleError if it is not a point of the space."""
        where = f"{schedule.compact()} is not in this space"
        if schedule.solver != self.solver or len(schedule.steps) > self.max_steps:
            raise ScheduleError(f"{where} ({self.solver}, ≤ {self.max_steps} steps)")
        slots = np.zeros(self.shape, dtype=np.int64)
        for k, step in enumerate(schedule.steps):
            if any(m not in self.members for m in step.members):
                raise ScheduleError(f"{where}: step {k} uses a member outside {list(self.members)}")
            slots[k, : len(step.members)] = [self.members.index(m) + 1 for m in step.members]
        for i in range(len(self.spacings)):
            grid = self.times(i, len(schedule.steps), schedule.nfe)
            if np.allclose(grid, schedule.times, rtol=0, atol=1e-12):
                return Genome(slots, i, np.zeros(self.max_steps - 1))
        raise ScheduleError(f"{where}: its times are none of the spacings {list(self.spacings)}")


def sampler_anchors(space: SamplerSpace, nfes: Sequence[int],
                    spacings: Sequence[str] = ("karras",)) -> list[ModelSchedule]:
    """Every member alone with the space's solver (each NFE count per step it allows) at every NFE in `nfes`, on the
    given spacings the space has, and each member that has AYS steps for this solver on its own AYS times: the
    single-member samplers that anchor the predictor (so it does not extrapolate to AYS grids)."""
    from oms_lightning.evaluation import single_member_sampler  # evaluation builds on sampling, not on spaces

    lo, hi = get_solver(space.solver).nfe_per_step
    orders = range(max(lo, 2), hi + 1) if lo < hi else [None]
    ays = {(m, space.solver): levels for m, levels in space.ays}
    out = {}
    for member in space.members:
        member_spacings = [sp for sp in spacings if sp in space.spacings]
        if (member, space.solver) in ays:
            member_spacings.append(AYS)
        for nfe in nfes:
            for order in orders:
                for spacing in member_spacings:
                    s = single_member_sampler(member, space.solver, order, spacing, nfe, space.noise, ays=ays)
                    if s is not None and len(s.steps) <= space.max_steps:
                        out.setdefault(s, None)
    return list(out)


def encode_exactly(space, schedule: ModelSchedule):
    """The genotype of `schedule` in `space` if the space holds exactly that schedule (decode(encode(s)) == s),
    else None — e.g. SlotSpace re-grids any dpm_solver schedule onto its logSNR grid, which is another schedule."""
    try:
        g = space.encode(schedule)
    except UserError:  # ScheduleError and SolverError alike: not a point of this space
        return None
    return g if schedule_key(space.decode(g)) == schedule_key(schedule) else None


SOLVER_SPACES = tuple(sorted(SOLVER_REGISTRY))   # SamplerSpace kinds: "sampler:<solver>"
SPACE_KINDS = ("dpm_solver", *GRID_SOLVERS, *(f"sampler:{s}" for s in SOLVER_SPACES), "all")


def sampler_steps(solver: str, max_nfe: int) -> int:
    """Steps a SamplerSpace needs to hold every single-member sampler of `solver` up to `max_nfe` NFEs: one per NFE
    for fixed-count solvers divided by the count; ⌈max_nfe / 2⌉ for singlestep DPM-Solver (its samplers use ≥ 2
    NFEs per step but one last lower-order step)."""
    lo, hi = get_solver(solver).nfe_per_step
    return max(1, max_nfe // lo if lo == hi else -(-max_nfe // 2))


def make_space(kind: str, members: Sequence[str], noise: VPSchedule, size: int, ays: AYSTable | None = None,
               ranges: MemberRanges = MemberRanges()):
    """"dpm_solver": SlotSpace with `size` steps × 3 slots; "ddim" / "dpm_solver++": GridSpace of `size` entries;
    "sampler:<solver>": a SamplerSpace of that registry solver holding its samplers up to `size` NFEs, with the
    members' AYS schedules for that solver (`ays`) as time grids of their own. `ranges`: the members' valid time
    ranges (multi-decoder stages), which every genotype the space makes respects."""
    members = tuple(members)
    if kind == "dpm_solver":
        return SlotSpace(members, size, noise, ranges)
    if kind in GRID_SOLVERS:
        return GridSpace(members, size, noise, kind, ranges=ranges)
    if kind.startswith("sampler:") and kind.split(":", 1)[1] in SOLVER_REGISTRY:
        solver = kind.split(":", 1)[1]
        own = tuple(sorted((m, lv) for (m, s), lv in (ays or {}).items() if s == solver and m in members))
        return SamplerSpace(members, solver, sampler_steps(solver, size), noise, ays=own, ranges=ranges)
    raise ScheduleError(f"unknown search space {kind!r}; choose one of {', '.join(SPACE_KINDS)}")


def make_spaces(kind: str, members: Sequence[str], noise: VPSchedule, size: int,
                ays: AYSTable | None = None, ranges: MemberRanges = MemberRanges()) -> list:
    """The spaces a search runs: one, or for kind "all" OMS-DPM's slot space (⌈size/3⌉ steps, its logSNR grid) and
    a SamplerSpace per ODE solver of the registry (time genes on), the same solvers the baselines enumerate."""
    if kind != "all":
        return [make_space(kind, members, noise, size, ays, ranges)]
    return [make_space("dpm_solver", members, noise, -(-size // SLOTS_PER_STEP), ranges=ranges)] + [
        make_space(f"sampler:{s}", members, noise, size, ays, ranges) for s in ODE_SOLVERS]
