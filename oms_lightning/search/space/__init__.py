"""Search spaces: what the evolution (`evolution.py`) searches, behind one protocol.

Every space implements `SearchSpace`: `sample_genotype`, `mutate`, `crossover`, `key` (a cheap identity of what a
genotype decodes to), `decode` → ModelSchedule, `encode` (a schedule of the space → a genotype), `repair` into a
cost window, and the unit-cost helpers the evolution's fast path uses. Genotypes are opaque to the evolution.

* `SlotSpace` — OMS-DPM's DPM-Solver space: K singlestep steps × 3 NFE slots, each slot null or a zoo member, on a
  logSNR-uniform grid (timesteps not searched). Genotype: a (K, 3) int array (0 = null, i + 1 = members[i]).
* `GridSpace` — OMS-DPM's DDIM space: a length-L mask over a fixed grid (the timestep subset searched implicitly).
* `SamplerSpace` — any solver of the registry with a member per NFE **and the time grid as genes**: a spacing
  choice among the standard ones plus a continuous perturbation of the interior step boundaries in λ (fixed
  ends). Every single-member sampler of `oms_lightning.samplers` (member × solver × spacing × NFE) is a point of
  the SamplerSpace of its solver, so a search over it can always find its baselines.

`make_space(kind, members, noise, size)` builds one, `SPACE_KINDS` lists the kinds; `make_spaces` the set a search
runs. Modules: `base.py` (protocol and shared genes), `slots.py` (OMS-DPM's spaces), `sampler.py` (SamplerSpace).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from oms_lightning.diffusion.ays_steps import AYSTable
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import ODE_SOLVERS, SOLVER_REGISTRY, get_solver
from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule, ScheduleError, schedule_key
from oms_lightning.schedule.slots import SLOTS_PER_STEP
from oms_lightning.search.space.base import RandomGenotypes, SearchSpace, SlotGenes
from oms_lightning.search.space.sampler import JITTER_MAX, Genome, SamplerSpace
from oms_lightning.search.space.slots import GRID_SOLVERS, GridSpace, SlotSpace
from oms_lightning.zoo import MemberRanges


def random_schedules(space, n: int, seed: int, null_prob: float = 0.8,
                     alpha: float = 0.4) -> list[ModelSchedule]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng, null_prob, alpha) for _ in range(n)]


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


__all__ = ["GRID_SOLVERS", "JITTER_MAX", "SPACE_KINDS", "Genome", "GridSpace", "RandomGenotypes", "SamplerSpace",
           "SearchSpace", "SlotGenes", "SlotSpace", "encode_exactly", "make_space", "make_spaces", "random_schedules",
           "sampler_steps"]
