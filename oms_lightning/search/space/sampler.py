"""`SamplerSpace`: any solver of the registry with a member per NFE and the time grid as genes (a spacing choice
plus a continuous perturbation of the interior step boundaries in λ, fixed ends)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

from oms_lightning.diffusion.ays_steps import AYS, AYS_GRID, ays_grid, spacing_times
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.spacing import SPACINGS, default_t_end, timesteps
from oms_lightning.schedule import ModelSchedule, ScheduleError
from oms_lightning.search.space.base import RandomGenotypes, SlotGenes
from oms_lightning.zoo import MemberRanges


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
