"""Evolutionary search on synthetic objectives with optima known by construction or brute force (fast, no torch)."""
import itertools
from functools import lru_cache

import numpy as np
import pytest

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.search.evolution import NoScheduleFits, ScoreCache, evolve, evolve_frontier
from oms_lightning.search.space import GridSpace, SlotSpace, make_space

NOISE = VPSchedule()
MEMBERS = ("a", "b", "c")
LATENCY = {"a": 1.0, "b": 2.0, "c": 4.0}
VALUE = {"a": 1.0, "b": 2.5, "c": 4.2}  # b has the best value per cost


def cost(s):
    return s.cost(LATENCY)


def additive(schedules):
    """Knapsack: the optimum under B is the best value-per-cost packing (5×b at B = 10, 4×b at B = 8)."""
    return np.array([-sum(VALUE[m] for m in s.members_per_nfe) for s in schedules])


def structured(schedules):
    """Order- and position-dependent, so only brute force knows the optimum."""
    out = []
    for s in schedules:
        v = -sum(VALUE[m] for m in s.members_per_nfe)
        v -= 0.3 * sum(o == 2 for o in s.orders) + 0.5 * (s.members_per_nfe[0] == "a") - 0.2 * len(s.steps)
        out.append(v)
    return np.array(out)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls, self.seen = fn, 0, []

    def __call__(self, schedules):
        self.calls += 1
        self.seen.extend(schedules)
        return self.fn(schedules)


def tiny():
    return SlotSpace(MEMBERS, 2, NOISE)  # 4^6 = 4096 genotypes


@lru_cache(maxsize=None)
def tiny_schedules():
    space = tiny()
    out = {}
    for flat in itertools.product(range(4), repeat=6):
        if any(flat):
            s = space.decode(np.array(flat).reshape(2, 3))
            out[s] = cost(s)
    return out


def brute_force(score_fn, budget):
    fits = [s for s, c in tiny_schedules().items() if c <= budget]
    return float(np.min(score_fn(fits)))


@pytest.mark.parametrize("budget", [5.0, 9.0])
def test_finds_brute_force_optimum(budget):
    r = evolve(tiny(), structured, cost, budget, population=20, children=20, generations=30, seed=1)
    assert r.best.score == pytest.approx(brute_force(structured, budget))
    assert r.best.cost <= budget
    assert r.budget_note is None


def test_finds_knapsack_optimum_in_a_large_space():
    space = SlotSpace(MEMBERS, 10, NOISE)
    r = evolve(space, additive, cost, 10.0, population=30, children=30, generations=80, seed=0)
    assert r.best.score == pytest.approx(-12.5)
    assert r.best.schedule.members_per_nfe == ["b"] * 5


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("budget", [1.0, 3.0, 7.5, 13.0])
def test_never_over_budget(seed, budget):
    space = SlotSpace(MEMBERS, 6, NOISE)
    r = evolve(space, structured, cost, budget, population=12, children=12, generations=8, seed=seed)
    assert r.population and r.population[0] is r.best
    assert [c.score for c in r.population] == sorted(c.score for c in r.population)
    for c in r.population:
        assert cost(c.schedule) == c.cost <= budget
        assert space.decode(c.genotype) == c.schedule
    assert all(np.diff(r.history) <= 0)  # elitist
    assert r.top(3) == r.population[:3]


def test_starts_are_repaired_into_the_window():
    space = SlotSpace(MEMBERS, 10, NOISE)
    r = evolve(space, additive, cost, 10.0, population=6, starts=6, generations=0, seed=2)
    assert 1 <= len(r.population) <= 6
    assert all(9.0 <= c.cost <= 10.0 for c in r.population)


def test_deterministic_for_a_seed():
    space = SlotSpace(MEMBERS, 6, NOISE)
    kw = dict(population=10, children=10, generations=10)
    a = evolve(space, structured, cost, 9.0, seed=5, **kw)
    b = evolve(space, structured, cost, 9.0, seed=5, **kw)
    assert a.history == b.history and a.evaluated == b.evaluated
    assert [c.schedule for c in a.population] == [c.schedule for c in b.population]
    assert all(np.array_equal(x.genotype, y.genotype) for x, y in zip(a.population, b.population))
    c = evolve(space, structured, cost, 9.0, seed=6, **kw)  # may differ; must still be valid
    assert all(x.cost <= 9.0 for x in c.population)


def test_budget_below_cheapest_names_the_minimum():
    with pytest.raises(UserError, match=r"below the cheapest valid schedule \(1 NFE of a: 1\)"):
        evolve(tiny(), additive, cost, 0.5, generations=1)


def test_a_space_that_cannot_fit_a_budget_sits_that_budget_out():
    """Heun's smallest schedule is one step of 2 NFEs: under a 1-NFE budget its space has nothing to offer, and a
    search over several spaces goes on without it (None) instead of failing."""
    heun = make_space("sampler:heun", MEMBERS, NOISE, 6)
    with pytest.raises(NoScheduleFits, match="below this space's smallest schedule \\(2\\)"):
        evolve(heun, additive, cost, 1.5, generations=1)
    out = evolve_frontier(heun, additive, cost, [1.5, 6.0], population=8, children=8, generations=3, seed=0)
    assert out[1.5] is None and out[6.0].best.cost <= 6.0 and out[6.0].best.schedule.solver == "heun"


def test_budget_above_space_maximum_searches_everything():
    r = evolve(tiny(), additive, cost, 100.0, population=10, children=10, generations=30, seed=0)
    assert r.budget_note and "max 24" in r.budget_note
    assert all(c.cost <= 24.0 for c in r.population)
    assert r.best.score == pytest.approx(-6 * 4.2)


def test_batched_scoring_without_duplicates():
    rec = Recorder(structured)
    gens = 15
    r = evolve(SlotSpace(MEMBERS, 6, NOISE), rec, cost, 9.0, population=10, children=10, generations=gens, seed=0)
    assert rec.calls <= gens + 1
    assert len(rec.seen) == len(set(rec.seen)) == r.evaluated
    assert len(set(c.schedule for c in r.population)) == len(r.population)


def test_frontier_is_monotone_and_shares_the_cache():
    rec = Recorder(structured)
    budgets = [8.0, 3.0, 14.0, 5.0]
    out = evolve_frontier(SlotSpace(MEMBERS, 6, NOISE), rec, cost, budgets, population=10, children=10,
                          generations=10, seed=0)
    assert list(out) == budgets
    for b, r in out.items():
        assert r.budget == b and all(c.cost <= b for c in r.population)
    best = [out[b].best.score for b in sorted(budgets)]
    assert all(np.diff(best) <= 0)
    assert len(rec.seen) == len(set(rec.seen)) == sum(r.evaluated for r in out.values())


def test_shared_cache_object():
    cache = ScoreCache(additive)
    space = SlotSpace(MEMBERS, 4, NOISE)
    r1 = evolve(space, additive, cost, 6.0, generations=3, population=8, children=8, cache=cache)
    r2 = evolve(space, additive, cost, 6.0, generations=3, population=8, children=8, cache=cache)
    assert r2.evaluated == 0 and r2.history == r1.history  # same seed: everything is a cache hit


def test_grid_space():
    space = GridSpace(MEMBERS, 12, NOISE)
    r = evolve(space, additive, cost, 8.0, population=20, children=20, generations=40, seed=0)
    assert r.best.score == pytest.approx(-10.0)  # 4×b
    for c in r.population:
        assert c.cost <= 8.0 and space.decode(c.genotype) == c.schedule


def test_bad_arguments():
    with pytest.raises(UserError):
        evolve(tiny(), additive, cost, -1.0)
    with pytest.raises(UserError):
        evolve(tiny(), additive, cost, 5.0, mutation_slots=(3, 1))
    with pytest.raises(UserError):
        evolve_frontier(tiny(), additive, cost, [])


def test_non_additive_cost_stays_within_budget():
    def step_cost(s):  # a per-step overhead: the unit-cost fast path must switch itself off
        return s.cost(LATENCY) + 0.5 * len(s.steps)

    r = evolve(SlotSpace(MEMBERS, 6, NOISE), additive, step_cost, 7.0, population=10, children=10,
               generations=10, seed=0)
    assert all(step_cost(c.schedule) == c.cost <= 7.0 for c in r.population)
