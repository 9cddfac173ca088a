"""SearchCallback: the evolution in every search space under every budget, scored by a trained predictor.

Attached to a predictor's Trainer it runs when `fit` ends, with the best weights restored; `search(predictor)` runs
it on any trained predictor. The search job (`jobs/search.py`) does the latter after caching the predictor, so a
search killed during the evolution never trains the predictor again; re-ranking, evaluation and reporting follow
there."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from oms_lightning.errors import UserError
from oms_lightning.progress import progress as progress_bar, write
from oms_lightning.schedule import ModelSchedule
from oms_lightning.search.evolution import ScoreCache, SearchResult, evolve_frontier
from oms_lightning.search.space import encode_exactly


class SearchCallback(Callback):
    """Runs `evolve_frontier` per space at `on_fit_end` (best checkpoint restored first), or directly via `search`.

    initial[budget] → schedules (e.g. the best single-member samplers within that budget) that start each space's
    population where they are points of it: the best half a population of them by predicted score. After a search,
    `results[budget]` lists one SearchResult per space, in the order of `spaces`.
    """

    def __init__(self, spaces: Sequence[Any], cost_fn: Callable[[ModelSchedule], float], budgets: Sequence[float],
                 seed: int = 0, evolution: dict | None = None,
                 initial: Mapping[float, Sequence[ModelSchedule]] | None = None):
        self.spaces, self.cost_fn, self.budgets = list(spaces), cost_fn, [float(b) for b in budgets]
        self.seed, self.evolution, self.initial = seed, dict(evolution or {}), dict(initial or {})
        self.results: dict[float, list[SearchResult]] = {}

    def initial_genotypes(self, space, budget: float, cache: ScoreCache) -> list:
        """The genotypes of `initial[budget]` that `space` holds exactly, best predicted first, at most half a
        population: the evolution starts where the baselines end."""
        pairs = [(s, g) for s in self.initial.get(budget, ()) if (g := encode_exactly(space, s)) is not None]
        if not pairs:
            return []
        scores, _ = cache.score([s for s, _ in pairs])
        order = sorted(range(len(pairs)), key=lambda i: scores[i])[: max(1, int(self.evolution.get("population", 40)) // 2)]
        return [pairs[i][1] for i in order]

    def on_fit_end(self, trainer, pl_module) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            pl_module.load_state_dict(torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"])
        if trainer.is_global_zero:
            self.search(pl_module)

    def search(self, predictor) -> dict[float, list[SearchResult]]:
        cache = ScoreCache(predictor.predict_scores)  # one cache: no schedule is scored twice across spaces
        self.results = {b: [] for b in self.budgets}
        generations = int(self.evolution.get("generations", 200))
        for space in self.spaces:
            initial = lambda b, sp=space: self.initial_genotypes(sp, b, cache)  # noqa: E731
            name = getattr(space, "solver", type(space).__name__)
            with progress_bar(total=generations * len(self.budgets), desc=f"evolution ({name})", unit="gen") as bar:
                def progress(gen, best, bar=bar):
                    bar.update()
                    bar.set_postfix(score=f"{best.score:.3f}", nfe=best.schedule.nfe, refresh=False)

                found = evolve_frontier(space, predictor.predict_scores, self.cost_fn, self.budgets, seed=self.seed,
                                        cache=cache, initial=initial, progress=progress, **self.evolution)
            for b in self.budgets:
                if found[b] is None:
                    write(f"[search] {name}: no schedule of this space fits {1000 * b:.1f} ms; skipped there")
                else:
                    self.results[b].append(found[b])
        empty = [b for b, r in self.results.items() if not r]
        if empty:
            raise UserError(f"no search space has a schedule within budget(s) "
                            f"{', '.join(f'{1000 * b:.1f} ms' for b in empty)}")
        return self.results
