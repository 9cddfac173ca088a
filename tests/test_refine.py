"""The refinement stage (search/refine.py), segment schedules (search/segments.py) and non-inferiority: moves keep
schedules valid and within budget, racing keeps the true best under known noise, the local search reaches a known
optimum of a synthetic objective, the enumerations hold exactly what they claim."""
import itertools
import random

import numpy as np
import pytest

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.evaluation import non_inferiority
from oms_lightning.samplers import single_member_sampler
from oms_lightning.schedule import schedule_key
from oms_lightning.search.refine import (member_moves, neighbours, nfe_moves, race, refine, segment_moves,
                                        solver_moves, time_moves)
from oms_lightning.search.segments import (Sampler, family, merge_runs, probe_runs, rank_samplers, runs_of,
                                           segment_schedule, segment_schedules, spread_by_family, three_segment_runs,
                                           two_segment_runs)

NOISE = VPSchedule()
LATENCY = {"medium": 0.128, "small": 0.061, "tiny": 0.022}
MEMBERS = tuple(sorted(LATENCY))


def cost(s):
    return s.cost(LATENCY)


def sampler_schedule(member="small", solver="dpm_solver++", order=None, spacing="karras", nfe=6):
    return single_member_sampler(member, solver, order, spacing, nfe, NOISE)


# ----------------------------------------------------------------------------------------------- moves
@pytest.mark.parametrize("solver,order,nfe", [("dpm_solver++", None, 6), ("dpm_solver++3m", None, 5),
                                              ("heun", None, 6), ("dpm_solver", 2, 7), ("ddim", None, 4)])
def test_every_neighbour_is_valid_within_budget_and_new(solver, order, nfe):
    s = sampler_schedule(solver=solver, order=order, nfe=nfe)
    budget = cost(s) * 1.3
    found = neighbours(s, MEMBERS, NOISE, cost, budget)
    assert found, "a schedule in the middle of its budget has neighbours"
    keys = [schedule_key(n) for n in found]
    assert len(set(keys)) == len(keys) and schedule_key(s) not in keys
    for n in found:
        n.validate(MEMBERS)                       # structure, solver orders, strictly decreasing times in (0, 1]
        assert cost(n) <= budget * (1 + 1e-9)
        assert n.times[0] == pytest.approx(s.times[0])


def test_member_moves_change_one_nfe_or_one_whole_run():
    s = segment_schedule([("tiny", 3), ("small", 3)], Sampler("dpm_solver++", None, "karras"), NOISE)
    moves = [m for m in member_moves(s, MEMBERS) if m is not None]
    before = s.members_per_nfe
    singles = [m for m in moves if sum(a != b for a, b in zip(before, m.members_per_nfe)) == 1]
    runs = [m for m in moves if sum(a != b for a, b in zip(before, m.members_per_nfe)) == 3]
    assert len(singles) == 6 * 2            # every NFE, every other member
    assert len(runs) == 2 * 2               # each of the two runs, every other member
    assert len(singles) + len(runs) == len(moves)
    assert all(m.times == s.times for m in moves)
    # moving the boundary by one NFE is one of them
    assert ["tiny"] * 4 + ["small"] * 2 in [m.members_per_nfe for m in singles]


def test_nfe_moves_add_and_drop_one_step_and_keep_the_members_order():
    s = segment_schedule([("tiny", 3), ("small", 3)], Sampler("dpm_solver++", None, "karras"), NOISE)
    nfes = sorted({m.nfe for m in nfe_moves(s, NOISE) if m is not None})
    assert nfes == [5, 7]
    for m in (m for m in nfe_moves(s, NOISE) if m is not None):
        names = m.members_per_nfe
        assert names == sorted(names, key=["tiny", "small"].index)   # still tiny first, then small
    regridded = [m for m in nfe_moves(s, NOISE) if m is not None and m.meta["spacing"] == "karras"]
    assert {m.nfe for m in regridded} == {5, 7}
    assert all(m.times[-1] == pytest.approx(s.times[-1]) for m in regridded)


def test_singlestep_dpm_solver_moves_change_a_step_order_within_1_to_3():
    s = sampler_schedule(solver="dpm_solver", order=3, nfe=6)
    orders = [m.orders for m in nfe_moves(s, NOISE) if m is not None and m.times == s.times]
    assert [2, 3] in orders and [3, 2] in orders
    assert all(1 <= o <= 3 for os in orders for o in os)


def test_time_moves_keep_the_ends_and_the_order_of_times():
    s = sampler_schedule(nfe=5)
    moved = [m for m in time_moves(s, NOISE) if m is not None]
    assert len(moved) == 2 * 4 + 4           # each interior time both ways, and four other spacings
    for m in moved:
        assert m.times[0] == s.times[0] and m.times[-1] == pytest.approx(s.times[-1])
        assert all(a > b for a, b in zip(m.times, m.times[1:]))
    assert {m.meta["spacing"] for m in moved} >= {"time_uniform", "logsnr_uniform", "custom"}


def test_solver_moves_swap_between_one_nfe_multistep_solvers_only():
    s = sampler_schedule(solver="dpm_solver++")
    assert {m.solver for m in solver_moves(s)} == {"ddim", "dpm_solver++3m"}
    assert solver_moves(sampler_schedule(solver="heun")) == []


def test_out_of_range_neighbours_are_dropped():
    s = sampler_schedule(nfe=4)
    found = neighbours(s, MEMBERS, NOISE, cost, 10.0, valid=lambda n: "medium" not in n.members_per_nfe)
    assert found and all("medium" not in n.members_per_nfe for n in found)


# ----------------------------------------------------------------------------------------------- racing
def test_racing_keeps_the_true_best_under_known_noise():
    """30 candidates with true values 0..29; a measurement at n samples has noise sd 20/sqrt(n). Successive
    halving 64 → 256 → 1024 keeps the true best (its margin is 1, the last rung's sd 0.6) nearly always."""
    kept = 0
    for trial in range(50):
        rng = np.random.default_rng(trial)
        truth = {f"c{i}": float(i) for i in range(30)}
        cands = list(truth)
        rng.shuffle(cands)

        def fid_at(names, n):
            return [truth[c] + rng.normal(0, 20 / np.sqrt(n)) for c in names]

        ranked = race(cands, fid_at, [64, 256, 1024], keep=1 / 3, rank=lambda s, f, n: (f,))
        kept += ranked[0][0] == "c0"
        assert len(ranked) == 4                 # 30 → 10 → 4
    assert kept >= 45


def test_race_checks_its_settings():
    with pytest.raises(ValueError, match="keep"):
        race(["a"], lambda c, n: [0.0], [4], keep=0.0, rank=lambda s, f, n: (f,))
    with pytest.raises(ValueError, match="increasing"):
        race(["a"], lambda c, n: [0.0], [8, 4], keep=0.5, rank=lambda s, f, n: (f,))


def test_refinement_walks_to_a_mixed_optimum_the_start_is_far_from():
    """Synthetic FID: a schedule scores best with `tiny` on its noisy half and `medium` on the rest; each NFE against
    that pattern costs 1 (deterministic, so the optimum is known). From single-member samplers the refinement
    must reach the pattern, and the cheapest objective must find a schedule cheaper than the reference at its
    quality."""
    def true_fid(s):
        names = s.members_per_nfe
        half = len(names) // 2
        wrong = sum(m != "tiny" for m in names[:half]) + sum(m != "medium" for m in names[half:])
        return 2.0 + wrong + 0.3 * abs(len(names) - 6)

    calls = []

    def fid_at(schedules, n):
        calls.append(len(schedules))
        return [true_fid(s) for s in schedules]

    reference = sampler_schedule(member="medium", nfe=6)
    budget = cost(reference)
    starts = [reference, sampler_schedule(member="tiny", nfe=6)]

    def move(s):
        return neighbours(s, MEMBERS, NOISE, cost, budget)

    r = refine(starts, reference, [], fid_at, cost, move, rungs=[64, 256], evaluations=400, per_round=40,
               cheapest_share=0.3, seed=0)
    assert true_fid(r.best) == pytest.approx(2.0)
    assert r.best.members_per_nfe == ["tiny"] * 3 + ["medium"] * 3
    assert cost(r.best) <= budget
    assert r.fid(r.cheapest) <= r.fid(reference) and cost(r.cheapest) < cost(reference)
    assert r.evaluations <= 400 and r.evaluations == sum(x["raced"] for x in r.rounds)
    assert all(schedule_key(s) in r.archive for s in starts)


def test_refinement_without_improvements_keeps_the_reference():
    reference = sampler_schedule(member="medium", nfe=6)
    r = refine([reference], reference, [], lambda ss, n: [0.0 if schedule_key(s) == schedule_key(reference) else 1.0
                                                          for s in ss],
               cost, lambda s: neighbours(s, MEMBERS, NOISE, cost, cost(reference)), rungs=[8, 16], evaluations=30)
    assert r.best == reference and r.cheapest == reference


# ----------------------------------------------------------------------------------------------- non-inferiority
def test_non_inferiority_on_known_paired_differences():
    rng = np.random.default_rng(0)
    base = rng.normal(10.0, 1.0, size=8)
    inside = base + 0.05 + rng.normal(0, 0.02, size=8)     # worse by 0.05, margin 0.2: holds
    outside = base + 0.5 + rng.normal(0, 0.02, size=8)     # worse by 0.5: fails
    noisy = base + rng.normal(0, 2.0, size=8)               # equal on average, too noisy to show it
    assert non_inferiority(inside, base, margin=0.2)["holds"]
    assert not non_inferiority(outside, base, margin=0.2)["holds"]
    assert not non_inferiority(noisy, base, margin=0.2)["holds"]
    r = non_inferiority(inside, base, margin=0.2)
    d = inside - base
    from scipy import stats
    assert r["upper"] == pytest.approx(d.mean() + stats.t.ppf(0.95, 7) * d.std(ddof=1) / np.sqrt(8))
    with pytest.raises(UserError, match="2 seeds"):
        non_inferiority([1.0], [1.0], 0.1)
    with pytest.raises(UserError, match="margin"):
        non_inferiority([1.0, 2.0], [1.0, 2.0], -1.0)


# ----------------------------------------------------------------------------------------------- segments
def test_two_segment_runs_are_exactly_every_pair_and_split_that_fills_the_budget():
    budget = 0.4
    got = two_segment_runs(LATENCY, budget)
    expected = []
    for a, b in itertools.permutations(sorted(LATENCY), 2):
        for k in range(1, 100):
            if k * LATENCY[a] > budget:
                break
            rest = max(j for j in range(0, 100) if k * LATENCY[a] + j * LATENCY[b] <= budget + 1e-12)
            if rest >= 1:
                expected.append([(a, k), (b, rest)])
    assert got == expected
    for runs in got:
        spent = sum(n * LATENCY[m] for m, n in runs)
        assert spent <= budget + 1e-12 and spent + LATENCY[runs[-1][0]] > budget


def test_three_segment_runs_on_a_coarse_grid():
    got = three_segment_runs(LATENCY, 0.8, grid=4)
    assert got and len({tuple(r) for r in got}) == len(got)
    for (a, k1), (b, k2), (c, k3) in got:
        assert a != b and b != c and min(k1, k2, k3) >= 1
        assert k1 * LATENCY[a] + k2 * LATENCY[b] + k3 * LATENCY[c] <= 0.8 + 1e-12


def test_a_segment_schedule_of_one_member_is_that_single_member_sampler():
    sampler = Sampler("dpm_solver", 3, "time_quadratic")
    mixed = segment_schedule([("small", 4), ("small", 3)], sampler, NOISE)
    alone = sampler_schedule(member="small", solver="dpm_solver", order=3, spacing="time_quadratic", nfe=7)
    assert schedule_key(mixed) == schedule_key(alone)
    two = segment_schedule([("tiny", 3), ("small", 4)], sampler, NOISE)
    assert two.times == alone.times and two.members_per_nfe == ["tiny"] * 3 + ["small"] * 4
    assert runs_of(two) == [("tiny", 3), ("small", 4)] and merge_runs([("a", 1), ("a", 2)]) == [("a", 3)]
    assert segment_schedule([("tiny", 3)], Sampler("heun", None, "karras"), NOISE) is None   # Heun: even NFEs
    assert Sampler.of(alone) == Sampler("dpm_solver", 3, "time_quadratic") and Sampler.of(two) is None


def test_segment_schedules_deduplicate_across_samplers():
    runs = two_segment_runs(LATENCY, 0.3)
    samplers = [Sampler("dpm_solver++", None, "karras"), Sampler("dpm_solver++", None, "karras"),
                Sampler("heun", None, "karras")]
    out = segment_schedules(runs, samplers, NOISE)
    keys = [schedule_key(s) for s in out]
    assert len(keys) == len(set(keys))
    even = sum(1 for r in runs if sum(n for _, n in r) % 2 == 0)
    assert len(out) == len(runs) + even
    assert random.Random(0).sample(out, 3)   # a seeded draw works on the list


def test_probe_runs_put_the_cheapest_member_first_and_fill_the_budget():
    probes = probe_runs(LATENCY, 0.4, "small", 3)
    assert [r[0][0] for r in probes] == ["tiny"] * 3 and [r[1][0] for r in probes] == ["small"] * 3
    assert [r[0][1] for r in probes] == sorted(r[0][1] for r in probes)     # growing share of the cheap member
    for runs in probes:
        spent = sum(n * LATENCY[m] for m, n in runs)
        assert spent <= 0.4 + 1e-12 and spent + LATENCY["small"] > 0.4
    assert probe_runs(LATENCY, 0.4, "tiny", 1)[0][1][0] == "medium"         # the cheapest twice is no mixing


def test_spread_by_family_serves_every_member_order_before_any_gets_more():
    """tiny → x has many split points, medium → x few: an even spread of the list would starve the costly orders."""
    everything = segment_schedules(two_segment_runs(LATENCY, 0.8), [Sampler("dpm_solver++", None, "karras")], NOISE)
    sizes = {}
    for s in everything:
        sizes[family(s)] = sizes.get(family(s), 0) + 1
    assert len(sizes) == 6 and max(sizes.values()) > 4 * min(sizes.values())
    picked = spread_by_family(everything, 12)
    counts = {f: sum(family(s) == f for s in picked) for f in sizes}
    assert len(picked) == 12 and set(counts.values()) == {2}
    assert len({schedule_key(s) for s in picked}) == 12
    few = min(sizes, key=sizes.get)           # a family smaller than its share gives the rest to the others
    picked = spread_by_family(everything, 6 * sizes[few] + 6)
    assert sum(family(s) == few for s in picked) == sizes[few] and len(picked) == 6 * sizes[few] + 6
    assert len(spread_by_family(everything, 10 ** 6)) == len(everything)
    assert spread_by_family(everything, 0) == []


def test_samplers_are_ranked_by_their_best_mixed_probe():
    samplers = [Sampler("dpm_solver++", None, "karras"), Sampler("ddim", None, "karras"),
                Sampler("heun", None, "time_quadratic")]
    probes = probe_runs(LATENCY, 0.4, "small", 2)
    quality = {"dpm_solver++": 3.0, "ddim": 5.0, "heun": 1.0}
    ranked = rank_samplers(samplers, probes, NOISE, lambda ss, n: [quality[s.solver] + s.nfe / 100 for s in ss], 64)
    assert [s.solver for s, _ in ranked] == ["heun", "dpm_solver++", "ddim"]
    assert ranked[0][1] == pytest.approx(1.0 + min(s.nfe for s in segment_schedules(probes, samplers[2:], NOISE)) / 100)


def test_confirmation_decides_among_close_candidates_with_more_samples():
    """At the full count (256) a lucky candidate looks best; at 4096 samples the truly best one wins, and the
    cheapest answer must still reach the reference at the larger count."""
    from oms_lightning.search.refine import confirmed

    ref = sampler_schedule(member="medium", nfe=6)
    lucky, good, cheap_bad, cheap_ok = (sampler_schedule(member=m, nfe=n) for m, n in
                                        (("small", 6), ("small", 5), ("tiny", 4), ("tiny", 6)))
    truth = {schedule_key(s): f for s, f in ((ref, 6.0), (lucky, 6.2), (good, 5.0), (cheap_bad, 6.5),
                                              (cheap_ok, 5.9))}
    at_full = {**truth, schedule_key(lucky): 4.0, schedule_key(cheap_bad): 5.5}
    archive = {schedule_key(s): (s, cost(s), at_full[schedule_key(s)]) for s in (ref, lucky, good, cheap_bad, cheap_ok)}
    rounds = []
    best, cheapest = confirmed(archive, ref, lambda ss, n: [truth[schedule_key(s)] for s in ss], cost, 4096, 3, rounds)
    assert best == good and cheapest == cheap_ok
    assert rounds[-1]["objective"] == "confirm" and rounds[-1]["n"] == 4096


@pytest.mark.parametrize("key,value", [("probe_pairs", 0), ("probes", -1), ("segments", 2.5), ("keep", 0),
                                       ("cheapest_share", 1.5), ("rungs", [512, 256]), ("evaluations", True)])
def test_a_bad_refinement_setting_is_refused_with_its_key(key, value):
    from omegaconf import OmegaConf

    from oms_lightning.search.settings import check_refine_settings

    from pathlib import Path

    rf = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "search" / "cpu_fast.yaml").refine
    check_refine_settings(rf, 512)                      # the shipped preset passes
    rf[key] = value
    with pytest.raises(UserError, match=f"search.refine.{key}="):
        check_refine_settings(rf, 512)


def test_segment_moves_walk_the_scans_family_and_refill_the_budget():
    karras = Sampler("dpm_solver++", None, "karras")
    start = segment_schedule([("small", 9), ("medium", 2)], karras, NOISE)
    target = segment_schedule([("small", 7), ("medium", 3)], karras, NOISE)
    budget = max(cost(start), cost(target))
    moved = segment_moves(start, NOISE, cost, budget)
    assert schedule_key(target) in {schedule_key(m) for m in moved}      # one move, not three
    for m in moved:
        runs = runs_of(m)
        assert [r[0] for r in runs] == ["small", "medium"] and abs(runs[0][1] - 9) in (1, 2)
        assert cost(m) <= budget * (1 + 1e-9) and cost(m) + LATENCY["medium"] > budget   # the last run is full
        assert m.times == single_member_sampler("small", "dpm_solver++", None, "karras", len(m.members_per_nfe),
                                                NOISE).times
    assert all(m.meta["coarse"] for m in moved)           # raced before the fine moves (one NFE, one time)
    assert not any(m.meta["coarse"] for m in member_moves(start, MEMBERS) if "nfe" in m.meta["move"])
    shifted = time_moves(start, NOISE)[0]                  # a moved time: back to the grid it started from
    assert not shifted.meta["coarse"]
    assert shifted.meta["spacing"] == "custom" and shifted.meta["grid"] == "karras"
    assert {schedule_key(m) for m in segment_moves(shifted, NOISE, cost, budget)} == {schedule_key(m) for m in moved}
    twice = time_moves(shifted, NOISE)[-1]
    assert twice.meta["grid"] in ("karras", twice.meta["spacing"])
    from oms_lightning.schedule import ModelSchedule
    unknown = ModelSchedule.from_times_and_members(start.times, [list(x.members) for x in start.steps],
                                                   solver=start.solver, meta={})
    assert segment_moves(unknown, NOISE, cost, budget) == []        # no known grid: nothing to refill on
    assert segment_moves(sampler_schedule(solver="dpm_solver", order=2, nfe=6), NOISE, cost, budget) == []


def test_incumbents_keep_distinct_structures_so_a_runner_up_is_refined():
    """The leader's many time variants score best, but the optimum is one boundary move away from the runner-up
    (another member sequence): refinement must look there within a few rounds."""
    karras = Sampler("dpm_solver++", None, "karras")
    leader = sampler_schedule(member="medium", nfe=6)
    runner_up = segment_schedule([("small", 9), ("medium", 2)], karras, NOISE)
    target = segment_schedule([("small", 7), ("medium", 3)], karras, NOISE)
    budget = max(cost(leader), cost(runner_up), cost(target))

    def fid(s):
        if schedule_key(s) == schedule_key(target):
            return 1.0
        if s.members_per_nfe == leader.members_per_nfe:
            return 3.0 - 0.01 * (s.meta.get("spacing") == "custom")      # time variants: a little better each
        return 3.5 if schedule_key(s) == schedule_key(runner_up) else 5.0

    r = refine([leader, runner_up], leader, [], lambda ss, n: [fid(s) for s in ss], cost,
               lambda s: neighbours(s, MEMBERS, NOISE, cost, budget), rungs=[64, 256], evaluations=60, per_round=20,
               width=2, cheapest_share=0.0, seed=0)
    assert schedule_key(r.best) == schedule_key(target)
