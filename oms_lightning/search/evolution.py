"""OMS-DPM's evolutionary schedule search (Algorithm 1), with the released code's weak spots fixed.

Pure numpy over a search space (SlotSpace / GridSpace genotypes: int arrays, 0 = null, i + 1 = members[i]):

* **Several starts.** `starts` independent random genotypes, each *repaired* into the window
  [lower_bound·B, B]: while over budget a random used slot is nulled (or moved to a cheaper member), while under
  lower_bound·B a random null slot is filled with a member that fits (or a used slot moved to a costlier one that
  fits). After a bounded number of tries the closest under-budget genotype seen is taken. The population is then
  filled to `population` by mutating the starts round-robin.
* **Crossover.** With probability `crossover_prob` a child is a *one-point* crossover of two tournament-selected
  parents (a random cut c ∈ [1, n) along the first genotype axis: rows 0..c-1 of the (K, 3) SlotSpace genotype, or
  entries 0..c-1 of the (L,) GridSpace genotype — i.e. the noisy end — from one parent, the rest from the other),
  then mutated; otherwise it is a mutation of one tournament-selected parent (best of `tournament` random members).
  A one-point cut (rather than a uniform mask) keeps contiguous runs of steps together.
* **Mutation** resamples k ~ U{mutation_slots[0] .. mutation_slots[1]} distinct random slots, each uniformly to null
  or one of the members (as the released code), and never leaves a genotype all-null.
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

__all__ = ["Candidate", "SearchResult", "ScoreCache", "evolve", "evolve_frontier"]


@dataclass
class Candidate:
    genotype: np.ndarray
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
    """Decode (memoised on a cheap phenotype key) and cost (memoised on the schedule) genotypes of one space."""

    def __init__(self, space: Any, cost_fn: CostFn):
        self.space, self.cost_fn = space, cost_fn
        self._decoded: dict[Any, ModelSchedule] = {}
        self._costs: dict[str, float] = {}
        kind = type(space).__name__
        self._key = {"SlotSpace": _slot_key, "GridSpace": _grid_key}.get(kind, lambda g: (g.shape, g.tobytes()))

    def key(self, g: np.ndarray):
        return self._key(g)

    def schedule(self, g: np.ndarray, key=None) -> ModelSchedule:
        key = self._key(g) if key is None else key
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


def _slot_key(g: np.ndarray):
    """Two SlotSpace genotypes decode to the same schedule iff their used rows, nulls removed, are equal."""
    return tuple(tuple(v for v in row if v) for row in g.tolist() if any(row))


def _grid_key(g: np.ndarray):
    """GridSpace: leading nulls merge into the first step, so its position is irrelevant."""
    sel = np.flatnonzero(g)
    return tuple(sel[1:].tolist()), tuple(g[sel].tolist())


class _Search:
    def __init__(self, space, cost_fn, budget, rng, mutation_slots, null_prob):
        self.space, self.rng, self.budget = space, rng, float(budget)
        self.ev = _Evaluator(space, cost_fn)
        self.shape = tuple(space.shape)
        self.n_slots = int(np.prod(self.shape))
        self.n_members = len(space.members)
        self.mutation_slots = mutation_slots
        self.null_prob = null_prob
        # 1-NFE cost of every member (the unit costs repair works with) and the most expensive schedule
        self.unit = np.empty(self.n_members)
        full_costs = []
        for i in range(self.n_members):
            g = np.zeros(self.shape, dtype=np.int64)
            g.flat[0] = i + 1
            self.unit[i] = self.ev.cost(self.ev.schedule(g))
            full_costs.append(self.ev.cost(self.ev.schedule(np.full(self.shape, i + 1, dtype=np.int64))))
        self.cheapest = int(np.argmin(self.unit))
        self.max_cost = float(max(full_costs))
        # Fast path: while every decoded schedule's cost equals the sum of its slots' unit costs (checked on each
        # decode, starting with the full schedules above), a genotype whose unit-cost sum exceeds B is rejected
        # without decoding it (decoding dominates the search's own time). One mismatch turns the fast path off.
        self._unit0 = np.concatenate([[0.0], self.unit])
        self.additive = all(math.isclose(c, self.unit[i] * self.n_slots, rel_tol=1e-9, abs_tol=1e-12)
                            for i, c in enumerate(full_costs))

    def cost_of(self, g: np.ndarray, key=None) -> tuple[ModelSchedule, float]:
        s = self.ev.schedule(g, key)
        c = self.ev.cost(s)
        if self.additive and not math.isclose(c, float(self._unit0[g].sum()), rel_tol=1e-9, abs_tol=1e-12):
            self.additive = False
        return s, c

    def surely_over(self, g: np.ndarray) -> bool:
        return self.additive and float(self._unit0[g].sum()) > self.budget * (1 + 1e-9)

    # ------------------------------------------------------------------ operators
    def random_genotype(self) -> np.ndarray:
        return np.asarray(self.space.sample_genotype(self.rng, self.null_prob), dtype=np.int64).reshape(self.shape)

    def repair(self, g: np.ndarray, lo: float) -> np.ndarray:
        """Move g into [lo, B]; after a bounded number of tries, the closest under-budget genotype seen."""
        B, rng, unit = self.budget, self.rng, self.unit
        g = g.copy()
        flat = g.reshape(-1)
        best, best_cost = None, -math.inf
        for _ in range(20 * self.n_slots + 50):
            _, c = self.cost_of(g)
            if c <= B:
                if c >= lo:
                    return g
                if c > best_cost:
                    best, best_cost = g.copy(), c
                gap = B - c
                free = np.flatnonzero(flat == 0)
                fits = np.flatnonzero(unit <= gap)
                if free.size and fits.size and rng.random() < 0.8:
                    flat[rng.choice(free)] = rng.choice(fits) + 1
                    continue
                used = np.flatnonzero(flat)
                s = rng.choice(used)
                cur = unit[flat[s] - 1]
                up = np.flatnonzero((unit > cur) & (unit - cur <= gap))
                if up.size:
                    flat[s] = rng.choice(up) + 1
                elif free.size and fits.size:
                    flat[rng.choice(free)] = rng.choice(fits) + 1
                else:
                    break  # nothing more fits
            else:
                used = np.flatnonzero(flat)
                if used.size == 1:
                    flat[used[0]] = self.cheapest + 1
                    continue
                s = rng.choice(used)
                down = np.flatnonzero(unit < unit[flat[s] - 1])
                if down.size and rng.random() < 0.5:
                    flat[s] = rng.choice(down) + 1
                else:
                    flat[s] = 0
        if best is None:  # cannot happen for an additive cost; keep a valid answer anyway
            best = np.zeros(self.shape, dtype=np.int64)
            best.flat[0] = self.cheapest + 1
        return best

    def mutate(self, g: np.ndarray) -> np.ndarray:
        lo, hi = self.mutation_slots
        k = min(int(self.rng.integers(lo, hi + 1)), self.n_slots)
        child = g.copy()
        flat = child.reshape(-1)
        idx = self.rng.choice(self.n_slots, size=k, replace=False)
        flat[idx] = self.rng.integers(0, self.n_members + 1, size=k)
        if not flat.any():
            flat[idx[0]] = self.rng.integers(1, self.n_members + 1)
        return child

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        if n < 2:
            return (a if self.rng.random() < 0.5 else b).copy()
        cut = int(self.rng.integers(1, n))
        child = b.copy()
        child[:cut] = a[:cut]
        if not child.any():
            child.reshape(-1)[self.rng.integers(self.n_slots)] = self.rng.integers(1, self.n_members + 1)
        return child


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
           cache: ScoreCache | None = None, initial: Sequence[np.ndarray] = ()) -> SearchResult:
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
        raise UserError(f"budget {B:g} is below the cheapest valid schedule "
                        f"(1 NFE of {space.members[S.cheapest]}: {S.unit[S.cheapest]:g})")
    budget_note = None
    lo = lower_bound * B
    if S.max_cost < lo:
        budget_note = (f"the budget exceeds what the schedule space can spend (max {S.max_cost:g}); "
                       f"searching the whole space")
        lo = 0.0

    seen: dict[str, None] = {}  # schedule_key of every schedule proposed in this run (insertion-ordered)
    seen_keys: dict[Any, None] = {}  # their phenotype keys: duplicates are dropped before decoding
    pending: list[tuple[np.ndarray, ModelSchedule, float]] = []

    def offer(g: np.ndarray) -> bool:
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

    # ---- initial population: extra seeds, repaired random starts, then mutants of the starts
    for g in initial:
        offer(np.asarray(g, dtype=np.int64).reshape(S.shape).copy())
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
    proposed = len(pop)
    pop = _truncate(pop, population)
    history = [pop[0].score]

    # ---- generations
    for gen in range(1, generations + 1):
        def select() -> np.ndarray:
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
                    **kw) -> dict[float, SearchResult]:
    """One evolution per budget (ascending), one shared score cache, each run seeded with the previous budget's
    final population → {budget: SearchResult} in the order given, best score non-increasing in the budget."""
    if isinstance(budgets, (str, bytes)) or not len(budgets):
        raise UserError(f"budgets must be a non-empty sequence of numbers, got {budgets!r}")
    try:
        asked = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise UserError(f"budgets must be numbers, got {budgets!r}") from None
    cache = kw.pop("cache", None) or ScoreCache(score_fn)
    kw.pop("initial", None)
    results: dict[float, SearchResult] = {}
    previous: list[np.ndarray] = []
    for b in sorted(dict.fromkeys(asked)):
        r = evolve(space, score_fn, cost_fn, b, cache=cache, initial=previous, **kw)
        results[b] = r
        previous = [c.genotype for c in r.population]
    return {b: results[b] for b in dict.fromkeys(asked)}
