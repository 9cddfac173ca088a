"""OMS-DPM's evolutionary schedule search (Algorithm 1), with the released code's weak spots fixed.

Pure numpy over any space of the `SearchSpace` protocol (search/space.py): the evolution never reads a genotype;
the space samples, mutates, crosses, repairs, keys and decodes it.

* **Several starts.** `starts` independent random genotypes, each *repaired* into the window
  [lower_bound·B, B] by the space (member moves: null or cheapen a slot while over, fill or upgrade one while
  under; after a bounded number of tries the closest under-budget genotype seen). `initial` genotypes (e.g. the
  best single-member samplers, or a smaller budget's population) join first. The population is then
  filled to `population` by mutating the starts round-robin.
* **Crossover.** With probability `crossover_prob` a child is the space's crossover of two tournament-selected
  parents (one cut along the steps: the noisy end from one parent, the rest from the other — time genes cut at
  the same step), then mutated; otherwise it is a mutation of one tournament-selected parent (best of
  `tournament` random members).
* **Mutation** (the space's): k ~ U{mutation_slots} member slots resampled to null or a member (as the released
  code), never all-null; spaces with time genes sometimes perturb the time grid instead.
* **Budget.** Children with cost > B are rejected (as released); children below lower_bound·B are *kept* — the
  lower bound only shapes the starts (cheap schedules are simply out-ranked when the predictor prefers more NFEs).
  Up to 10·`children` proposals are made per generation to collect `children` valid, new ones.
* **De-duplication** by decoded schedule (`schedule_key`, the identity the record store uses too): a child equal to
  any schedule proposed earlier in the run is dropped, so a run never scores (or holds) one schedule twice.
* **Batched scoring.** score_fn is called once for the initial population and at most once per generation, with
  every new child not already in the score cache (a `ScoreCache`, keyed by schedule, may be shared across runs).
* **(μ + λ) truncation**: the next population is the best `population` of parents ∪ children (stable sort, so
  ties keep their order). Elitist, so the best score never gets worse across generations.
* **Deterministic** for a seed: one np.random.Generator drives everything; only insertion-ordered dicts are iterated.

`evolve_frontier` runs one evolution per budget in ascending order, sharing one score cache, and seeds each run
with the final population of the next smaller budget (all within the larger budget), so the best score is
non-increasing as the budget grows and no schedule is scored twice across budgets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule, schedule_key

ScoreFn = Callable[[list[ModelSchedule]], Any]
CostFn = Callable[[ModelSchedule], float]

__all__ = ["Candidate", "SearchResult", "ScoreCache", "NoScheduleFits", "evolve", "evolve_frontier"]


class NoScheduleFits(UserError):
    """No schedule of the space costs at most the budget (e.g. a Heun step, 2 NFEs, under a 1-NFE budget)."""


@dataclass
class Candidate:
    genotype: Any  # opaque to the evolution: only its space reads it
    schedule: ModelSchedule
    cost: float
    score: float  # lower = better (a predictor's ordinal score)


@dataclass
class SearchResult:
    best: Candidate
    population: list[Candidate]  # sorted by score, best first
    history: list[float]  # best score after each generation (index 0: the initial population)
    evaluated: int  # schedules this run sent to score_fn (cache hits excluded)
    budget: float
    budget_note: str | None = None
    proposed: int = 0  # new, valid, de-duplicated schedules this run produced (initial population included)

    def top(self, k: int) -> list[Candidate]:
        return self.population[: max(int(k), 0)]


class ScoreCache:
    """schedule_key → score, so no schedule is scored twice (shareable across budgets); `calls` counts score_fn
    calls."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.scores: dict[str, float] = {}
        self.calls = 0

    def __contains__(self, schedule: ModelSchedule) -> bool:
        return schedule_key(schedule) in self.scores

    def score(self, schedules: Sequence[ModelSchedule]) -> tuple[list[float], int]:
        """Scores of `schedules` (one batched score_fn call for the unknown ones); also how many were new."""
        keys = [schedule_key(s) for s in schedules]
        todo: dict[str, ModelSchedule] = {}
        for k, s in zip(keys, schedules):
            if k not in self.scores:
                todo.setdefault(k, s)
        if todo:
            batch = list(todo.values())
            raw = np.asarray(self.score_fn(batch), dtype=float).reshape(-1)
            self.calls += 1
            if raw.shape[0] != len(batch):
                raise UserError(f"score_fn returned {raw.shape[0]} scores for {len(batch)} schedules")
            for k, v in zip(todo, raw.tolist()):
                self.scores[k] = v if math.isfinite(v) else math.inf  # NaN / -inf never win
        return [self.scores[k] for k in keys], len(todo)


class _Evaluator:
    """Decode (memoised on the space's cheap phenotype key) and cost (memoised on the schedule) genotypes."""

    def __init__(self, space: Any, cost_fn: CostFn):
        self.space, self.cost_fn = space, cost_fn
        self._decoded: dict[Any, ModelSchedule] = {}
        self._costs: dict[str, float] = {}

    def key(self, g):
        return self.space.key(g)

    def schedule(self, g, key=None) -> ModelSchedule:
        key = self.space.key(g) if key is None else key
        s = self._decoded.get(key)
        if s is None:
            s = self._decoded[key] = self.space.decode(g)
        return s

    def cost(self, s: ModelSchedule) -> float:
        key = schedule_key(s)
        c = self._costs.get(key)
        if c is None:
            c = float(self.cost_fn(s))
            if math.isnan(c):
                raise UserError(f"cost_fn returned NaN for {s.compact()}")
            self._costs[key] = c
        return c


class _Search:
    """The evolution's view of one space under one budget: genotype costs with the additive fast path."""

    def __init__(self, space, cost_fn, budget, rng, mutation_slots, null_prob):
        self.space, self.rng, self.budget = space, rng, float(budget)
        self.ev = _Evaluator(space, cost_fn)
        self.n_members = len(space.members)
        self.mutation_slots = mutation_slots
        self.null_prob = null_prob
        # 1-NFE cost of every member (the unit costs repair works with) and the most expensive schedule
        # per NFE: a space's smallest genotype may hold several NFEs (a Heun step has two)
        smallest = [self.ev.schedule(space.one_nfe(i)) for i in range(self.n_members)]
        self.unit = np.array([self.ev.cost(s) / s.nfe for s in smallest])
        self.smallest_cost = min(self.ev.cost(s) for s in smallest)
        full = [space.everywhere(i) for i in range(self.n_members)]
        full_costs = [self.ev.cost(self.ev.schedule(g)) for g in full]
        self.cheapest = int(np.argmin(self.unit))
        self.max_cost = float(max(full_costs))
        # Fast path: while every decoded schedule's cost equals the sum of its slots' unit costs (checked on each
        # decode, starting with the full schedules above), a genotype whose unit-cost sum exceeds B is rejected
        # without decoding it (decoding dominates the search's own time). One mismatch turns the fast path off.
        self._unit0 = np.concatenate([[0.0], self.unit])
        self.additive = all(math.isclose(c, space.unit_cost(g, self._unit0), rel_tol=1e-9, abs_tol=1e-12)
                            for g, c in zip(full, full_costs))

    def cost_of(self, g, key=None) -> tuple[ModelSchedule, float]:
        s = self.ev.schedule(g, key)
        c = self.ev.cost(s)
        if self.additive and not math.isclose(c, self.space.unit_cost(g, self._unit0), rel_tol=1e-9, abs_tol=1e-12):
            self.additive = False
        return s, c

    def surely_over(self, g) -> bool:
        return self.additive and self.space.unit_cost(g, self._unit0) > self.budget * (1 + 1e-9)

    def random_genotype(self):
        return self.space.sample_genotype(self.rng, self.null_prob)

    def repair(self, g, lo: float):
        return self.space.repair(g, self.rng, self.unit, lo, self.budget, lambda x: self.cost_of(x)[1])

    def mutate(self, g):
        return self.space.mutate(g, self.rng, self.mutation_slots)

    def crossover(self, a, b):
        return self.space.crossover(a, b, self.rng)


def _check(budget, population, children, generations, starts, mutation_slots, crossover_prob, tournament,
           lower_bound, null_prob) -> tuple[int, int]:
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise UserError(f"budget must be a number, got {budget!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget must be a positive finite cost, got {budget!r}")
    for name, v, least in (("population", population, 1), ("children", children, 1),
                           ("generations", generations, 0), ("starts", starts, 1), ("tournament", tournament, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise UserError(f"{name} must be an integer >= {least}, got {v!r}")
    try:
        lo, hi = (int(x) for x in mutation_slots)
    except (TypeError, ValueError):
        raise UserError(f"mutation_slots must be a pair (min, max), got {mutation_slots!r}") from None
    if not 1 <= lo <= hi:
        raise UserError(f"mutation_slots must satisfy 1 <= min <= max, got {mutation_slots!r}")
    if not 0.0 <= crossover_prob <= 1.0:
        raise UserError(f"crossover_prob must be in [0, 1], got {crossover_prob!r}")
    if not 0.0 <= lower_bound <= 1.0:
        raise UserError(f"lower_bound must be in [0, 1], got {lower_bound!r}")
    if not 0.0 <= null_prob < 1.0:
        raise UserError(f"null_prob must be in [0, 1), got {null_prob!r}")
    return lo, hi


def evolve(space, score_fn: ScoreFn, cost_fn: CostFn, budget: float, *, population: int = 40, children: int = 40,
           generations: int = 200, starts: int = 4, mutation_slots: tuple[int, int] = (1, 10),
           crossover_prob: float = 0.3, tournament: int = 2, lower_bound: float = 0.9, null_prob: float = 0.8,
           seed: int = 0, progress: Callable[[int, Candidate], Any] | None = None,
           cache: ScoreCache | None = None, initial: Sequence[Any] = ()) -> SearchResult:
    """Search `space` for the schedule with the lowest score_fn under cost_fn(schedule) <= budget.

    score_fn(list[ModelSchedule]) -> scores (lower = better), called in batches; cost_fn(ModelSchedule) -> cost.
    `cache` (a ScoreCache over the same score function) is shared when given; `initial` genotypes (e.g. the
    result of a smaller budget) join the initial population when within budget. `progress(generation, best)`
    is called after every generation. UserError when no schedule of the space fits the budget.
    """
    mutation_slots = _check(budget, population, children, generations, starts, mutation_slots, crossover_prob,
                            tournament, lower_bound, null_prob)
    B = float(budget)
    rng = np.random.default_rng(seed)
    if cache is None:
        cache = ScoreCache(score_fn)
    S = _Search(space, cost_fn, B, rng, mutation_slots, null_prob)
    if S.unit[S.cheapest] > B:
        raise NoScheduleFits(f"budget {B:g} is below the cheapest valid schedule "
                             f"(1 NFE of {space.members[S.cheapest]}: {S.unit[S.cheapest]:g})")
    if S.smallest_cost > B:
        raise NoScheduleFits(f"budget {B:g} is below this space's smallest schedule ({S.smallest_cost:g})")
    budget_note = None
    lo = lower_bound * B
    if S.max_cost < lo:
        budget_note = (f"the budget exceeds what the schedule space can spend (max {S.max_cost:g}); "
                       f"searching the whole space")
        lo = 0.0

    seen: dict[str, None] = {}  # schedule_key of every schedule proposed in this run (insertion-ordered)
    seen_keys: dict[Any, None] = {}  # their phenotype keys: duplicates are dropped before decoding
    pending: list[tuple[Any, ModelSchedule, float]] = []

    def offer(g) -> bool:
        key = S.ev.key(g)
        if key in seen_keys or S.surely_over(g):
            return False
        s, c = S.cost_of(g, key)
        if c > B:
            return False
        seen_keys[key] = None
        identity = schedule_key(s)
        if identity in seen:
            return False
        seen[identity] = None
        pending.append((g, s, c))
        return True

    def flush() -> tuple[list[Candidate], int]:
        scores, new = cache.score([s for _, s, _ in pending])
        out = [Candidate(g, s, c, sc) for (g, s, c), sc in zip(pending, scores)]
        pending.clear()
        return out, new

    # ---- initial population: the `initial` genotypes, repaired random starts, then mutants of the starts
    for g in initial:
        offer(g)
    start_genotypes = []
    for _ in range(starts):
        g = S.repair(S.random_genotype(), lo)
        start_genotypes.append(g)
        offer(g)
    attempts = 0
    while len(pending) < population and attempts < 20 * population:
        offer(S.mutate(start_genotypes[attempts % len(start_genotypes)]))
        attempts += 1
    pop, evaluated = flush()
    if not pop:
        raise NoScheduleFits(f"no schedule of this space within budget {B:g} was found")
    proposed = len(pop)
    pop = _truncate(pop, population)
    history = [pop[0].score]

    # ---- generations
    for gen in range(1, generations + 1):
        def select():
            idx = rng.integers(0, len(pop), size=tournament)
            return pop[int(idx.min())].genotype  # pop is sorted by score (stable): the lowest index wins

        tries = 0
        while len(pending) < children and tries < 10 * children:
            tries += 1
            if rng.random() < crossover_prob and len(pop) > 1:
                child = S.mutate(S.crossover(select(), select()))
            else:
                child = S.mutate(select())
            offer(child)
        kids, new = flush()
        evaluated += new
        proposed += len(kids)
        pop = _truncate(pop + kids, population)
        history.append(pop[0].score)
        if progress is not None:
            progress(gen, pop[0])

    return SearchResult(best=pop[0], population=pop, history=history, evaluated=evaluated, budget=B,
                        budget_note=budget_note, proposed=proposed)


def _truncate(cands: list[Candidate], k: int) -> list[Candidate]:
    order = np.argsort(np.array([c.score for c in cands], dtype=float), kind="stable")
    return [cands[i] for i in order[:k]]


def evolve_frontier(space, score_fn: ScoreFn, cost_fn: CostFn, budgets: Sequence[float],
                    initial: Callable[[float], Sequence[Any]] | None = None, **kw) -> dict[float, SearchResult | None]:
    """One evolution per budget (ascending), one shared score cache, each run starting from `initial(budget)` (e.g. the
    best single-member samplers within it) and the previous budget's final population → {budget: SearchResult} in
    the order given, best score non-increasing in the budget; None for a budget no schedule of the space fits (a
    space of 2-NFE Heun steps under a budget of one NFE: the other spaces of a search still have their say)."""
    if isinstance(budgets, (str, bytes)) or not len(budgets):
        raise UserError(f"budgets must be a non-empty sequence of numbers, got {budgets!r}")
    try:
        asked = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise UserError(f"budgets must be numbers, got {budgets!r}") from None
    cache = kw.pop("cache", None) or ScoreCache(score_fn)
    results: dict[float, SearchResult] = {}
    previous: list[Any] = []
    for b in sorted(dict.fromkeys(asked)):
        start = list(initial(b)) if initial is not None else []
        try:
            r = evolve(space, score_fn, cost_fn, b, cache=cache, initial=start + previous, **kw)
        except NoScheduleFits:
            results[b] = None
            continue
        results[b] = r
        previous = [c.genotype for c in r.population]
    return {b: results[b] for b in dict.fromkeys(asked)}
