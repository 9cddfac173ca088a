"""What every search space shares: the `SearchSpace` protocol the evolution drives, the slot genes (a member or
null per NFE slot: mutation, crossover, repair into a cost window) and random genotypes."""
from __future__ import annotations

import math
from typing import Any, Hashable, Protocol

import numpy as np

from oms_lightning.schedule import ModelSchedule


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
