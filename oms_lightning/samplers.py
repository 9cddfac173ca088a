"""One member alone: the ordinary samplers as model schedules, the only place that builds them.

* `single_member_schedule`: sample.py's sampler (one member, `steps` steps of a spacing);
* `single_member_sampler`: one member with one sampler at exactly `nfe` NFEs, and `SAMPLERS`, every sampler of the
  registry's ODE solvers;
* `single_member_baselines`: the strongest single-model baselines — every member with every solver, every spacing
  and every NFE whose cost fits the budget (`fitting_nfes`; or the largest ones only, for quick runs);
* `cost_at_equal_quality`: the cheapest NFE of the chosen baseline's sampler that reaches a target quality on the
  evaluation seeds, by bisection over NFE (no coarse grid);
* `space_anchors`: every member alone in a search space (the predictor's anchors);
* `same_steps_single_member`: a schedule's steps with one member at every NFE (the mixing ablation).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

from oms_lightning.diffusion.ays_steps import AYS, AYSTable, spacing_times
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import ODE_SOLVERS, SOLVER_REGISTRY, get_solver
from oms_lightning.diffusion.spacing import SPACINGS, default_t_end
from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule, schedule_key

if TYPE_CHECKING:
    from oms_lightning.evaluation import Evaluation


def single_member_schedule(member: str, solver: str, steps: int, noise: VPSchedule, order: int | None = None,
                           spacing: str = "logsnr_uniform", t_end: float | None = None,
                           ays=None) -> ModelSchedule:
    """The ordinary sampler as a schedule: one member everywhere, `steps` steps of a spacing (a standard one, or
    `ays` with the σ levels of its steps file, see `oms_lightning.diffusion.ays_steps`).

    `order` is the NFEs per step of a variable-order solver (singlestep DPM-Solver, 1–3; default 1); the other
    solvers take their registry NFEs per step (multistep/DDIM 1, Heun 2) and refuse another order.
    """
    spec = get_solver(solver)
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    nfe_per_step = spec.uniform_nfe_per_step(order)
    t_end = default_t_end(steps * nfe_per_step) if t_end is None else t_end
    times = spacing_times(spacing, steps, noise, t_end, ays=ays)
    return ModelSchedule.single(member, times, solver=solver, orders=nfe_per_step, meta={"spacing": spacing})


def _samplers() -> tuple[tuple[str, int | None], ...]:
    """Every single-member sampler of the registry's ODE solvers as (solver, NFEs per step or None for a fixed
    count). A solver with a variable count (singlestep DPM-Solver) gets one sampler per count ≥ 2: its count 1 is
    DDIM to 1e-12 (tests/test_solvers.py), so it would only double DDIM's work."""
    out = []
    for name in ODE_SOLVERS:
        lo, hi = SOLVER_REGISTRY[name].nfe_per_step
        out += [(name, k) for k in range(max(lo, 2), hi + 1)] if lo < hi else [(name, None)]
    return tuple(out)

SAMPLERS: tuple[tuple[str, int | None], ...] = _samplers()


def single_member_sampler(member: str, solver: str, order: int | None, spacing: str, nfe: int,
                          noise: VPSchedule, ays: AYSTable | None = None) -> ModelSchedule | None:
    """One member with one sampler at exactly `nfe` NFEs, or None if the sampler cannot make that many.

    A solver with a variable NFE count per step (singlestep DPM-Solver-k) reaches any NFE as DPM-Solver's "fast"
    variant does: ⌊nfe/k⌋ steps of order k and one last, lower-order step for the remainder. A fixed-count solver
    (Heun: 2) makes only multiples of its count. Spacing `ays` takes the member's AYS steps for this solver from
    `ays` (None when there are none).
    """
    levels = None
    if spacing == AYS:
        levels = (ays or {}).get((member, solver))
        if levels is None:
            return None
    spec = SOLVER_REGISTRY[solver]
    if spec.variable_order:
        orders = [order] * (nfe // order) + ([nfe % order] if nfe % order else [])
        steps = len(orders)
    else:
        per_step = spec.default_nfe_per_step
        if nfe % per_step:
            return None
        steps, orders = nfe // per_step, None
    times = spacing_times(spacing, steps, noise, t_end=default_t_end(nfe), ays=levels)
    label = solver if order is None else f"{solver}-{order}"
    return ModelSchedule.single(member, times, solver=solver, orders=orders,
                                meta={"member": member, "sampler": label, "solver": solver, "order": order,
                                      "spacing": spacing, "nfe": nfe})


def t_end_regimes(most: int) -> list[range]:
    """NFE ranges 1..most split where `default_t_end` changes (DPM-Solver's 1e-3 below 15 NFE, 1e-4 from 15 on):
    quality is not monotone across that switch (measured on digits: DPM-Solver++ with `tiny`, Karras grid, FID 4.9
    at 11 NFE but 6.6 at 22), so the NFE searches below treat each regime on its own."""
    cut = next((n for n in range(2, most + 1) if default_t_end(n) != default_t_end(n - 1)), most + 1)
    return [r for r in (range(1, min(cut, most + 1)), range(cut, most + 1)) if len(r)]


def fitting_nfes(latency: float, budget: float, nfes: str | int) -> list[int]:
    """NFEs whose cost (nfe × latency) fits the budget: "all"; "largest" (the largest of each t_end regime, see
    `t_end_regimes`); or an int k (the k largest of each regime)."""
    most = int(math.floor(budget / latency * (1 + 1e-9)))
    if nfes == "all":
        return list(range(1, most + 1))
    k = 1 if nfes == "largest" else nfes
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"evaluation.baseline_nfes must be 'all', 'largest' or a positive integer, got {nfes!r}")
    return sorted(n for r in t_end_regimes(most) for n in list(r)[-k:])


def single_member_baselines(members: Sequence[str], noise: VPSchedule, latency: Mapping[str, float], budget: float,
                            nfes: str | int = "all", spacings: Sequence[str] = SPACINGS,
                            samplers: Sequence[tuple[str, int | None]] = SAMPLERS,
                            ays: AYSTable | None = None) -> list[ModelSchedule]:
    """Every member × sampler × spacing at the NFEs of `fitting_nfes` (samplers that cannot make an NFE — Heun at an
    odd one — take the next one down); with `ays`, also every member and solver that has AYS steps on them. Each
    schedule's meta names its member, sampler, spacing and NFE."""
    out: dict[str, ModelSchedule] = {}
    spacings = tuple(spacings) + ((AYS,) if ays and AYS not in spacings else ())
    for member in members:
        wanted = fitting_nfes(latency[member], budget, nfes)
        for solver, order in samplers:
            for spacing in spacings:
                for nfe in wanted:
                    s = single_member_sampler(member, solver, order, spacing, nfe, noise, ays)
                    if s is None and nfe > 1:
                        s = single_member_sampler(member, solver, order, spacing, nfe - 1, noise, ays)
                    if s is not None:
                        out.setdefault(schedule_key(s), s)
    return list(out.values())


def cost_at_equal_quality(evaluation: Evaluation, family: ModelSchedule, target: float, latency: float,
                          max_cost: float, known_nfe: int | None = None, ays: AYSTable | None = None) -> dict | None:
    """Cheapest NFE of `family`'s sampler (member, solver, spacing as in its meta) whose mean FID over the
    evaluation seeds is ≤ target, up to max_cost. Bisection over NFE within each t_end regime (`t_end_regimes`),
    assuming quality improves with NFE inside a regime (a non-monotone dip there could be missed); the cheapest
    hit of all regimes wins. None if no regime reaches the target."""
    m = family.meta
    noise = evaluation.zoo.noise_schedule

    def at(nfe: int) -> ModelSchedule:
        s = single_member_sampler(m["member"], m["solver"], m["order"], m["spacing"], nfe, noise, ays)
        return s if s is not None else single_member_sampler(m["member"], m["solver"], m["order"], m["spacing"],
                                                             nfe + 1, noise, ays)

    spec = SOLVER_REGISTRY[m["solver"]]
    step = 1 if spec.variable_order else spec.default_nfe_per_step
    most = int(math.floor(max_cost / latency * (1 + 1e-9)))
    hits = [n for r in t_end_regimes(most)
            if (n := _bisect_nfe(evaluation, at, target, r.start, r.stop - 1, step, known_nfe)) is not None]
    if not hits:
        return None
    best = at(min(hits))
    return {"nfe": best.nfe, "cost": best.nfe * latency, "fid_mean": evaluation.mean(best),
            "schedule": best.compact(), "sampler": m["sampler"], "member": m["member"], "spacing": m["spacing"]}


def _bisect_nfe(evaluation: Evaluation, at, target: float, lo: int, hi: int, step: int,
                known: int | None) -> int | None:
    """Smallest NFE in [lo, hi] (multiples of `step`) whose schedule reaches the target, by bisection; None if
    nothing up to hi does. A known NFE in the range (already scored, e.g. the baseline's) is tried first: when it
    reaches the target the search stays below it (more NFEs are not always better, so hi might not reach)."""
    lo = -(-lo // step) * step
    hi -= hi % step
    if hi < lo:
        return None
    if known is not None and lo <= known <= hi and known % step == 0 and evaluation.mean(at(known)) <= target:
        hi = known
    elif evaluation.mean(at(hi)) > target:
        return None
    elif known is not None and lo <= known < hi and known % step == 0:
        lo = known + step
    while lo < hi:  # invariant: at(hi) reaches the target
        mid = lo + ((hi - lo) // (2 * step)) * step
        if evaluation.mean(at(mid)) <= target:
            hi = mid
        else:
            lo = mid + step
    return hi


def space_anchors(space, nfes: Sequence[int], orders: Sequence[int] = (1, 2, 3)) -> list[ModelSchedule]:
    """Every member alone at every NFE in `nfes` the space can express (singlestep: with a constant order 1–3;
    grid spaces: one NFE per step). They anchor the predictor and are the single-model baselines."""
    from oms_lightning.search.space import SamplerSpace, SlotSpace   # late: the spaces are a layer above this module

    if isinstance(space, SamplerSpace):
        return sampler_anchors(space, nfes)
    out = []
    for member in space.members:
        for nfe in nfes:
            if isinstance(space, SlotSpace):
                out += [space.single(member, nfe // o, o) for o in orders
                        if nfe % o == 0 and nfe // o <= space.max_steps]
            elif nfe <= space.grid_size:
                out.append(space.single(member, nfe))
    return out


def sampler_anchors(space, nfes: Sequence[int],
                    spacings: Sequence[str] = ("karras",)) -> list[ModelSchedule]:
    """Every member alone with the space's solver (each NFE count per step it allows) at every NFE in `nfes`, on the
    given spacings the space has, and each member that has AYS steps for this solver on its own AYS times: the
    single-member samplers that anchor the predictor (so it does not extrapolate to AYS grids)."""
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


def same_steps_single_member(winner: ModelSchedule, zoo, rerank) -> dict[str, float]:
    """Ablation on the selection seed: the winner's steps and orders with one member at every NFE. It separates
    what mixing models buys from what searching the step structure buys (OMS-DPM searches both)."""
    alone = [s for s in [ModelSchedule.from_times_and_members(winner.times, [[m] * s.order for s in winner.steps],
                                                             solver=winner.solver) for m in zoo.names]
             if not zoo.out_of_range(s)]
    return {s.member_names[0]: r["fid"] for s, r in zip(alone, rerank(alone))}   # stage members cannot run alone
