"""The refinement stage: true FID around the search's best candidates (issue 22).

The predictor ranks what its records taught it; the mixed schedules that win at small budgets (a cheap member for
the noisy NFEs, a better one after) are what it ranks worst, so an evolution scored by it does not go there. The
refinement measures instead of predicting:

* **Moves** (`neighbours`): the member of one NFE (which also moves a segment boundary by one NFE), the member of a
  whole run, one NFE fewer (merge two steps, or the same spacing at one step fewer) or more (split a step in λ, or
  the same spacing at one step more), one interior time moved in λ, the whole grid on another standard spacing, and
  another multistep order (DDIM ↔ DPM-Solver++ 2M ↔ 3M, same times), and the scan's family nearby (one run ± 1 or
  2 NFEs, the last refilled to the budget, on the sampler's grid at the new NFE). Every neighbour is a valid
  schedule within the budget whose every NFE runs a member inside its time range.
* **Racing** (`race`): candidates are scored by true FID on the selection seed with common random numbers (sample
  i from noise (seed, i) for every candidate, so their differences are paired) at growing sample counts — successive
  halving: after each rung the best `keep` fraction goes on, so most are dropped after a cheap look and the
  survivors are compared on the selection's full sample count.
* **Two objectives, one archive** of everything measured at the full count: `best` (lowest FID within the budget)
  and `cheapest` (lowest cost whose FID is not above the reference's, the strongest single-member sampler's). The
  evaluation budget (`evaluations`, candidates entering a race) is split between them.

Pure of I/O: `fid_at(schedules, n)` measures (the search backs it by record stores, so nothing is measured
twice and every true FID is kept), `cost` prices.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import ODE_SOLVERS, get_solver
from oms_lightning.diffusion.spacing import SPACINGS, timesteps
from oms_lightning.schedule import ModelSchedule, ScheduleError, schedule_key
from oms_lightning.search.segments import Sampler, runs_of, segment_schedule

FidAt = Callable[[list[ModelSchedule], int], list[float]]
CostFn = Callable[[ModelSchedule], float]
OBJECTIVES = ("best", "cheapest")
RACE_ORDER_META = ("coarse",)   # orders the refinement's races; says nothing to whoever samples the schedule


# ----------------------------------------------------------------------------------------------- moves
def _rebuild(s: ModelSchedule, times: Sequence[float], members: Sequence[Sequence[str]], solver: str | None = None,
             move: str = "", spacing: str | None = None, coarse: bool = False) -> ModelSchedule | None:
    """The neighbour as a schedule (None when invalid); meta keeps its move, its grid and whether the move is
    coarse (a whole run, grid, solver or segment: raced before the fine ones, see `refine`)."""
    spacing = spacing if spacing is not None else s.meta.get("spacing") if list(times) == s.times else "custom"
    try:
        return ModelSchedule.from_times_and_members(list(times), [list(m) for m in members],
                                                    solver=solver or s.solver, meta={
                                                        "spacing": spacing, "move": move, "coarse": coarse,
                                                        "grid": spacing if spacing in SPACINGS else grid_of(s)})
    except ScheduleError:
        return None


def grid_of(s: ModelSchedule) -> str | None:
    """The standard spacing a schedule's grid started from (kept in meta through time moves), or None."""
    return s.meta.get("spacing") if s.meta.get("spacing") in SPACINGS else s.meta.get("grid")


def _split_per_step(per_nfe: Sequence[str], orders: Sequence[int]) -> list[list[str]]:
    out, j = [], 0
    for o in orders:
        out.append(list(per_nfe[j: j + o]))
        j += o
    return out


def member_moves(s: ModelSchedule, members: Sequence[str]) -> list[ModelSchedule]:
    """Another member for one NFE, and for each maximal run of one member, another member for the whole run."""
    per_nfe, orders, out = s.members_per_nfe, s.orders, []
    for j, current in enumerate(per_nfe):
        for m in members:
            if m != current:
                changed = list(per_nfe)
                changed[j] = m
                out.append(_rebuild(s, s.times, _split_per_step(changed, orders), move=f"nfe {j} → {m}"))
    start = 0
    for j in range(1, len(per_nfe) + 1):
        if j == len(per_nfe) or per_nfe[j] != per_nfe[start]:
            if j - start > 1:
                for m in members:
                    if m != per_nfe[start]:
                        changed = list(per_nfe)
                        changed[start:j] = [m] * (j - start)
                        out.append(_rebuild(s, s.times, _split_per_step(changed, orders),
                                            move=f"run {start}-{j - 1} → {m}", coarse=True))
            start = j
    return out


def _lam(noise: VPSchedule, times: Sequence[float]) -> torch.Tensor:
    return noise.lambda_(torch.tensor(list(times), dtype=torch.float64))


def _t_of(noise: VPSchedule, lam: torch.Tensor) -> list[float]:
    return noise.t_of_lambda(lam).tolist()


def nfe_moves(s: ModelSchedule, noise: VPSchedule) -> list[ModelSchedule]:
    """One step fewer (two steps merged, the noisier one's members kept) or more (a step split at its λ midpoint, both
    halves with its members); for singlestep DPM-Solver also one NFE more or fewer inside a step (order ± 1); and on
    the schedule's standard spacing, the same grid at one step fewer or more (members kept by relative position)."""
    out, steps, times = [], s.steps, s.times
    members = [list(st.members) for st in steps]
    for i in range(1, len(steps)):  # drop interior time i: step i-1 now ends where step i ended
        out.append(_rebuild(s, times[:i] + times[i + 1:], members[:i] + members[i + 1:], move=f"merge steps {i - 1},{i}"))
    lam = _lam(noise, times)
    for k in range(len(steps)):
        mid = _t_of(noise, ((lam[k] + lam[k + 1]) / 2).reshape(1))
        out.append(_rebuild(s, times[: k + 1] + mid + times[k + 1:], members[: k + 1] + members[k:],
                            move=f"split step {k}"))
    lo, hi = get_solver(s.solver).nfe_per_step
    if lo < hi:
        for k, st in enumerate(steps):
            if st.order > lo:
                out.append(_rebuild(s, times, members[:k] + [members[k][:-1]] + members[k + 1:], move=f"step {k} order -1"))
            if st.order < hi:
                out.append(_rebuild(s, times, members[:k] + [members[k] + members[k][-1:]] + members[k + 1:],
                                    move=f"step {k} order +1"))
    spacing = s.meta.get("spacing")
    if spacing in SPACINGS:
        for K in (len(steps) - 1, len(steps) + 1):
            if K >= 1:
                grid = timesteps(spacing, K, noise, t_end=times[-1]).tolist()
                picked = [members[min(len(steps) - 1, int((k + 0.5) * len(steps) / K))] for k in range(K)]
                out.append(_rebuild(s, grid, picked, move=f"{spacing} at {K} steps", spacing=spacing,
                                        coarse=True))
    return out


def time_moves(s: ModelSchedule, noise: VPSchedule, fraction: float = 0.25) -> list[ModelSchedule]:
    """One interior time moved in λ by ±`fraction` of its smaller neighbouring gap (the grid stays strictly
    decreasing, its ends fixed), and the whole grid on every other standard spacing with the same step count and end."""
    out, times = [], s.times
    members = [list(st.members) for st in s.steps]
    lam = _lam(noise, times)
    for i in range(1, len(times) - 1):
        gap = float(min(lam[i] - lam[i - 1], lam[i + 1] - lam[i]))
        for sign in (-1, 1):
            shifted = lam.clone()
            shifted[i] = lam[i] + sign * fraction * gap
            moved = list(times)
            moved[i] = _t_of(noise, shifted[i: i + 1])[0]
            out.append(_rebuild(s, moved, members, move=f"time {i} {'+' if sign > 0 else '-'}"))
    for spacing in SPACINGS:
        if spacing != s.meta.get("spacing"):
            grid = timesteps(spacing, len(s.steps), noise, t_end=times[-1]).tolist()
            out.append(_rebuild(s, grid, members, move=f"spacing {spacing}", spacing=spacing, coarse=True))
    return out


def solver_moves(s: ModelSchedule) -> list[ModelSchedule]:
    """The same steps with every other deterministic solver of the same NFEs per step (DDIM ↔ DPM-Solver++ 2M ↔ 3M)."""
    fixed = get_solver(s.solver).nfe_per_step
    return [_rebuild(s, s.times, [list(st.members) for st in s.steps], solver=name, move=f"solver {name}",
                     coarse=True)
            for name in ODE_SOLVERS if name != s.solver and get_solver(name).nfe_per_step == fixed
            and fixed[0] == fixed[1]]


def segment_moves(s: ModelSchedule, noise: VPSchedule, cost: CostFn, budget: float) -> list[ModelSchedule]:
    """The exhaustive scan's family of `s`, near it: one run (not the last) one or two NFEs longer or shorter and
    the last run refilled with as many NFEs as the budget allows, on the schedule's own solver and standard spacing
    at the new NFE (`segments.segment_schedule`; a grid with moved times goes back to the spacing it started from).
    From `small×9 → medium×2` this reaches `small×7 → medium×3` in one move, which the other moves need two or
    three for. Fixed-NFE-per-step solvers on (or from) standard grids only."""
    spacing = grid_of(s)
    lo, hi = get_solver(s.solver).nfe_per_step
    if spacing not in SPACINGS or lo != hi:
        return []
    sampler, runs, out = Sampler(s.solver, None, spacing), runs_of(s), []
    for i in range(len(runs) - 1):
        for d in (-2, -1, 1, 2):
            if runs[i][1] + d < 1:
                continue
            head = [*runs[:i], (runs[i][0], runs[i][1] + d), *runs[i + 1:-1]]
            filled = None
            for n in range(1, 4 * len(s.members_per_nfe) + 8):   # cost grows with n: stop at the first one over
                candidate = segment_schedule([*head, (runs[-1][0], n)], sampler, noise)
                if candidate is not None and cost(candidate) > budget * (1 + 1e-9):
                    break
                filled = candidate or filled
            if filled is not None:
                out.append(_rebuild(filled, filled.times, [list(st.members) for st in filled.steps], spacing=spacing,
                                    move=f"run {i} {d:+d}, last refilled", coarse=True))
    return out


def neighbours(s: ModelSchedule, members: Sequence[str], noise: VPSchedule, cost: CostFn, budget: float,
               valid: Callable[[ModelSchedule], bool] = lambda _: True) -> list[ModelSchedule]:
    """Every move of `s` that gives a valid schedule within the budget, unique, `s` itself excluded."""
    plain = s.plain()
    found: dict[str, ModelSchedule] = {}
    for n in (member_moves(plain, members) + nfe_moves(plain, noise) + time_moves(plain, noise)
              + solver_moves(plain) + segment_moves(plain, noise, cost, budget)):
        if n is None or cost(n) > budget * (1 + 1e-9) or not valid(n):
            continue
        found.setdefault(schedule_key(n), n)
    found.pop(schedule_key(plain), None)
    return list(found.values())


# ----------------------------------------------------------------------------------------------- racing
def race(candidates: Sequence[ModelSchedule], fid_at: FidAt, rungs: Sequence[int], keep: float,
         rank: Callable[[ModelSchedule, float, int], tuple]) -> list[tuple[ModelSchedule, float]]:
    """Successive halving: score every candidate at rungs[0] samples, keep the best ⌈keep·count⌉ by `rank(schedule,
    fid, n)` (lower is better), score those at the next rung, … Returns the last rung's (schedule, FID), best first."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if not rungs or list(rungs) != sorted(set(rungs)):
        raise ValueError(f"rungs must be increasing sample counts, got {list(rungs)}")
    alive = list(candidates)
    ranked: list[tuple[ModelSchedule, float]] = []
    for i, n in enumerate(rungs):
        if not alive:
            return []
        fids = fid_at(alive, n)
        ranked = sorted(zip(alive, fids), key=lambda p: rank(p[0], p[1], n))
        if i < len(rungs) - 1:
            alive = [s for s, _ in ranked[: max(1, math.ceil(keep * len(ranked)))]]
    return ranked


# ----------------------------------------------------------------------------------------------- confirmation
def confirmed(archive: dict, reference: ModelSchedule, fid_at: FidAt, cost: CostFn, n: int, top: int,
              rounds: list) -> tuple[ModelSchedule, ModelSchedule]:
    """The best and the cheapest-at-reference-quality schedule decided at n samples among the `top` best by FID and
    the `top` cheapest whose FID is at most the reference's (at the full count): the minimum of many noisy FIDs is
    optimistic, and candidates within noise of each other are told apart by more samples, not by the luck of one
    draw. Same seed and noise as before (common random numbers), so the comparison stays paired."""
    entries = list(archive.values())
    ref_full = archive[schedule_key(reference)][2]
    by_fid = [e[0] for e in sorted(entries, key=lambda e: e[2])[:top]]
    by_cost = [e[0] for e in sorted((e for e in entries if e[2] <= ref_full), key=lambda e: (e[1], e[2]))[:top]]
    pool = list({schedule_key(s): s for s in [reference, *by_fid, *by_cost]}.values())
    fid = dict(zip(map(schedule_key, pool), fid_at(pool, n)))
    best = min(by_fid, key=lambda s: fid[schedule_key(s)])
    ref = fid[schedule_key(reference)]
    feasible = [s for s in by_cost if fid[schedule_key(s)] <= ref]
    cheapest = min(feasible, key=cost) if feasible else reference
    rounds.append({"objective": "confirm", "raced": len(pool), "survivors": len(pool), "leader": best.compact(),
                   "leader_fid": fid[schedule_key(best)], "leader_cost": cost(best), "n": n,
                   "cheapest": cheapest.compact(), "cheapest_fid": fid[schedule_key(cheapest)], "reference_fid": ref})
    return best, cheapest


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class Refinement:
    """What the refinement measured: the archive (schedule key → (schedule, cost, FID at the full count)), the best
    and the cheapest-at-reference-quality schedules, and what it spent."""

    archive: dict[str, tuple[ModelSchedule, float, float]]
    best: ModelSchedule
    cheapest: ModelSchedule
    reference: ModelSchedule
    evaluations: int
    seconds: float
    rounds: list[dict] = field(default_factory=list)

    def fid(self, s: ModelSchedule) -> float:
        return self.archive[schedule_key(s)][2]

    def cost(self, s: ModelSchedule) -> float:
        return self.archive[schedule_key(s)][1]


def refine(starts: Sequence[ModelSchedule], reference: ModelSchedule, segments: Sequence[ModelSchedule],
           fid_at: FidAt, cost: CostFn, move: Callable[[ModelSchedule], list[ModelSchedule]], *,
           rungs: Sequence[int], evaluations: int, keep: float = 1 / 3, width: int = 3, per_round: int = 24,
           cheapest_share: float = 0.34, confirm: int = 0, confirm_top: int = 4, seed: int = 0,
           log: Callable[[str], None] | None = None) -> Refinement:
    """Local search by true FID. `starts` (measured at the full count, the reference among them) seed the archive;
    `segments` (unmeasured segment schedules) enter the first race; then each round races up to `per_round`
    unseen neighbours (`move`) of the `width` best archive entries of distinct member sequences for the current
    objective — their neighbourhoods interleaved, the leader's first at each turn, each one's coarse moves (a whole
    run, grid, solver or segment; `meta["coarse"]`) before its fine ones (one NFE, one time), so the scan's family
    near every incumbent is looked at before its time variants — until `evaluations` candidates have been raced.
    The `cheapest` objective (its share of the evaluations) only takes moves that lower an incumbent's cost and
    ranks by cost among schedules whose FID is at most the reference's at the same sample count."""
    started = time.perf_counter()
    full = int(rungs[-1])
    rng = random.Random(seed)
    archive: dict[str, tuple[ModelSchedule, float, float]] = {}
    tried: set[str] = set()

    ref_at: dict[int, float] = {}

    def ref_fid(n: int) -> float:   # asked once per ranked candidate: measured (or read from the store) once per n
        if n not in ref_at:
            ref_at[n] = fid_at([reference], n)[0]
        return ref_at[n]

    def rank_best(s, fid, n):
        return (fid,)

    def rank_cheapest(s, fid, n):
        return (0, cost(s), fid) if fid <= ref_fid(n) else (1, fid, cost(s))

    ranks = {"best": rank_best, "cheapest": rank_cheapest}

    def admit(ranked):
        for s, f in ranked:
            archive.setdefault(schedule_key(s), (s, cost(s), f))

    unique_starts = list({schedule_key(s): s for s in [reference, *starts]}.values())
    tried.update(schedule_key(s) for s in unique_starts)
    admit(zip(unique_starts, fid_at(unique_starts, full)))
    spent, rounds = 0, []

    def run_round(objective: str, pool: list[ModelSchedule], limit: int, size: int = per_round) -> bool:
        """Race the first `size` untried schedules of `pool` (in the order given: the leader's neighbours first)."""
        nonlocal spent
        pool = [p for p in pool if schedule_key(p) not in tried]
        if not pool or spent >= limit:
            return False
        batch = pool[: min(size, limit - spent)]
        tried.update(schedule_key(p) for p in batch)
        spent += len(batch)
        ranked = race(batch, fid_at, rungs, keep, ranks[objective])
        admit(ranked)
        leader = best_of(objective)
        rounds.append({"objective": objective, "raced": len(batch), "survivors": len(ranked),
                       "leader": leader.compact(), "leader_fid": archive[schedule_key(leader)][2],
                       "leader_cost": archive[schedule_key(leader)][1]})
        if log:
            log(f"refine ({objective}): raced {len(batch)} ({spent}/{evaluations} evaluations); leader FID "
                f"{rounds[-1]['leader_fid']:.2f} at cost {1000 * rounds[-1]['leader_cost']:.0f} ms: {leader.compact()}")
        return True

    def ordered(objective: str) -> list[tuple[ModelSchedule, float, float]]:
        """The archive best first: by FID, or (cheapest) by cost among entries at most the reference's FID, then
        the rest by FID."""
        ref = archive[schedule_key(reference)][2]
        if objective == "best":
            return sorted(archive.values(), key=lambda e: e[2])
        return sorted(archive.values(), key=lambda e: (0, e[1], e[2]) if e[2] <= ref else (1, e[2], e[1]))

    def best_of(objective: str) -> ModelSchedule:
        return ordered(objective)[0][0]

    def incumbents(objective: str) -> list[ModelSchedule]:
        """The `width` best entries with distinct member sequences (for the cheapest objective only those at the
        reference's quality): the time and solver variants of the leader (its own neighbours) would otherwise crowd
        out every other structure after a round or two."""
        ref = archive[schedule_key(reference)][2]
        distinct = {}
        for e in ordered(objective):
            if objective == "cheapest" and e[2] > ref:
                break
            distinct.setdefault(tuple(e[0].members_per_nfe), e[0])
            if len(distinct) == width:
                break
        return list(distinct.values())

    budget_best = evaluations - int(round(cheapest_share * evaluations))
    run_round("best", list(segments), budget_best, size=budget_best)  # the segment schedules race together, first
    for objective, limit in (("best", budget_best), ("cheapest", evaluations)):
        while spent < limit:
            lists = []
            for inc in incumbents(objective):
                moves = move(inc)
                if objective == "cheapest":
                    moves = [m for m in moves if cost(m) < cost(inc)]
                rng.shuffle(moves)
                moves.sort(key=lambda m: not m.meta.get("coarse", False))   # coarse moves first, each kind shuffled
                lists.append(moves)
            # the incumbents' neighbourhoods interleaved, the leader's first at each turn: every structure gets
            # looked at each round instead of the leader's (often large) neighbourhood eating the rounds
            pool = [m for turn in itertools.zip_longest(*lists) for m in turn if m is not None]
            if not run_round(objective, list({schedule_key(p): p for p in pool}.values()), limit):
                break
    best, cheapest = best_of("best"), best_of("cheapest")
    if confirm > full:   # a last, larger look at the few that the full count cannot tell apart
        best, cheapest = confirmed(archive, reference, fid_at, cost, confirm, confirm_top, rounds)
    return Refinement(archive, best, cheapest, reference, spent,
                      time.perf_counter() - started, rounds)
