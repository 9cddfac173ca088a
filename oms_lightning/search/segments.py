"""Segment schedules: one sampler's time grid with its NFEs split into runs of one member each.

OMS-DPM's winning schedules on small zoos are of this shape: a cheap member for the noisy first NFEs, a better one
for the rest. A `segment_schedule` takes a single-member sampler (solver, NFEs per step, spacing) at its total
NFE and gives its NFEs, in order, to the runs' members — the times are exactly that sampler's, so a schedule whose
runs all name one member *is* the single-member sampler.

`two_segment_schedules` / `three_segment_schedules` enumerate them under a budget; the refinement (`refine.py`)
starts from a few of them, `benchmarks/scan_mixed.py` scores all of them as the search's yardstick.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.samplers import single_member_sampler
from oms_lightning.schedule import ModelSchedule, ScheduleError, schedule_key


@dataclass(frozen=True)
class Sampler:
    """How one schedule integrates: a registry solver, its NFEs per step (singlestep DPM-Solver only) and a spacing."""

    solver: str
    order: int | None
    spacing: str

    @classmethod
    def of(cls, schedule: ModelSchedule) -> "Sampler | None":
        """The sampler a single-member sampler was built with (its meta), or None for any other schedule."""
        m = schedule.meta
        if not all(k in m for k in ("solver", "order", "spacing")):
            return None
        return cls(m["solver"], m["order"], m["spacing"])

    @property
    def label(self) -> str:
        return f"{self.solver}{'' if self.order is None else f'-{self.order}'} ({self.spacing})"


def segment_schedule(runs: Sequence[tuple[str, int]], sampler: Sampler, noise: VPSchedule,
                     ays=None) -> ModelSchedule | None:
    """The sampler at NFE = Σ run lengths, NFE j of it run by the member of the run j falls in (runs noisy → clean).
    None when the sampler cannot make that NFE (Heun at an odd one) or a run is empty."""
    if not runs or any(n < 1 for _, n in runs):
        return None
    nfe = sum(n for _, n in runs)
    base = single_member_sampler(runs[0][0], sampler.solver, sampler.order, sampler.spacing, nfe, noise, ays)
    if base is None:
        return None
    per_nfe = [m for m, n in runs for _ in range(n)]
    members, j = [], 0
    for step in base.steps:
        members.append(per_nfe[j: j + step.order])
        j += step.order
    label = " → ".join(f"{m}×{n}" for m, n in merge_runs(runs))
    return ModelSchedule.from_times_and_members(base.times, members, solver=sampler.solver, meta={
        "spacing": sampler.spacing, "sampler": sampler.label, "segments": label})


def merge_runs(runs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Adjacent runs of one member joined: [(a, 2), (a, 1), (b, 3)] → [(a, 3), (b, 3)]."""
    out: list[tuple[str, int]] = []
    for m, n in runs:
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + n)
        else:
            out.append((m, n))
    return out


def runs_of(schedule: ModelSchedule) -> list[tuple[str, int]]:
    """A schedule's maximal runs of one member, noisy → clean."""
    return merge_runs([(m, 1) for m in schedule.members_per_nfe])


def _fill(prefix_cost: float, latency: float, budget: float) -> int:
    """How many NFEs of a member of this latency still fit after `prefix_cost` (a small tolerance: exact fits count)."""
    return max(0, int(math.floor((budget - prefix_cost) / latency * (1 + 1e-9))))


def two_segment_runs(latency: Mapping[str, float], budget: float) -> list[list[tuple[str, int]]]:
    """Every (first member × k NFEs, then another member × the most NFEs that still fit), over every ordered pair
    of distinct members (both orders) and every k ≥ 1 that leaves room for one NFE of the second member."""
    out = []
    for a, b in itertools.permutations(sorted(latency), 2):
        for k in range(1, _fill(0.0, latency[a], budget) + 1):
            rest = _fill(k * latency[a], latency[b], budget)
            if rest >= 1:
                out.append([(a, k), (b, rest)])
    return out


def three_segment_runs(latency: Mapping[str, float], budget: float, grid: int = 4) -> list[list[tuple[str, int]]]:
    """Three runs a → b → c (a ≠ b ≠ c, a = c allowed) on a coarse grid: the first two runs take fractions i/grid and
    j/grid of the budget (i, j ≥ 1, i + j < grid), the last fills what remains."""
    out, seen = [], set()
    names = sorted(latency)
    for a, b, c in itertools.product(names, repeat=3):
        if a == b or b == c:
            continue
        for i in range(1, grid):
            for j in range(1, grid - i):
                k1 = _fill(0.0, latency[a], budget * i / grid)
                k2 = _fill(0.0, latency[b], budget * j / grid)
                if k1 < 1 or k2 < 1:
                    continue
                k3 = _fill(k1 * latency[a] + k2 * latency[b], latency[c], budget)
                runs = ((a, k1), (b, k2), (c, k3))
                if k3 >= 1 and runs not in seen:
                    seen.add(runs)
                    out.append(list(runs))
    return out


def segment_schedules(runs_list: Sequence[Sequence[tuple[str, int]]], samplers: Sequence[Sampler],
                      noise: VPSchedule, ays=None) -> list[ModelSchedule]:
    """Every runs × sampler combination the sampler can make, de-duplicated by schedule identity."""
    out: dict[str, ModelSchedule] = {}
    for sampler in samplers:
        for runs in runs_list:
            try:
                s = segment_schedule(runs, sampler, noise, ays)
            except ScheduleError:
                s = None
            if s is not None:
                out.setdefault(schedule_key(s), s)
    return list(out.values())


def spread(items: Sequence, count: int) -> list:
    """`count` items evenly spread over the sequence (all of them when it is shorter)."""
    if count >= len(items):
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def family(schedule: ModelSchedule) -> tuple[str, ...]:
    """A segment schedule's members run by run, noisy → clean: ("tiny", "small") for tiny×k → small×rest."""
    return tuple(m for m, _ in runs_of(schedule))


def spread_by_family(schedules: Sequence[ModelSchedule], count: int) -> list[ModelSchedule]:
    """`count` schedules shared evenly over their families (the member order), each family's share spread over its
    split points. An even spread of the whole list would give most of the count to the families with many split
    points (a cheap member first has dozens), and one or none to a costlier pair such as small → medium."""
    families: dict[tuple[str, ...], list[ModelSchedule]] = {}
    for s in schedules:
        families.setdefault(family(s), []).append(s)
    share, left = {f: 0 for f in families}, count
    while left > 0 and any(share[f] < len(v) for f, v in families.items()):
        for f in sorted(families, key=lambda f: share[f]):      # water-filling: the least served family first
            if left > 0 and share[f] < len(families[f]):
                share[f] += 1
                left -= 1
    return [s for f, v in families.items() for s in spread(v, share[f])]


def probe_runs(latency: Mapping[str, float], budget: float, second: str, count: int) -> list[list[tuple[str, int]]]:
    """`count` two-segment runs in OMS-DPM's pattern: the cheapest member for the first i/(count+1) of the budget
    (i = 1 … count), then `second` (e.g. the baseline's member; the costliest when that is the cheapest) for the
    most NFEs that still fit."""
    cheap = min(latency, key=latency.get)
    if second == cheap:
        second = max(latency, key=latency.get)
    out = []
    for i in range(1, count + 1):
        k = _fill(0.0, latency[cheap], budget * i / (count + 1))
        rest = _fill(k * latency[cheap], latency[second], budget)
        if k >= 1 and rest >= 1 and [(cheap, k), (second, rest)] not in out:
            out.append([(cheap, k), (second, rest)])
    return out


def rank_samplers(samplers: Sequence[Sampler], probes: Sequence[Sequence[tuple[str, int]]], noise: VPSchedule,
                  fid_at, n: int) -> list[tuple[Sampler, float]]:
    """Solver/spacing pairs ranked on *mixed* schedules (the pair that is best for one member alone need not be
    best when members mix): each sampler's best FID at n samples over the probe runs, best first."""
    scored = []
    for sampler in samplers:
        schedules = segment_schedules(probes, [sampler], noise)
        scored.append((sampler, min(fid_at(schedules, n)) if schedules else float("inf")))
    return sorted(scored, key=lambda p: p[1])
