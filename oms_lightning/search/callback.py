"""SearchCallback: when the predictor's training ends, run the evolution under every budget with the best
predictor weights and keep the result — so a search is one `Trainer.fit` of the predictor with this callback
attached. Re-ranking, evaluation and reporting happen afterwards, in the pipeline (`search/pipeline.py`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from oms_lightning.schedule import ModelSchedule
from oms_lightning.search.evolution import SearchResult, evolve_frontier


class SearchCallback(Callback):
    """Runs `evolve_frontier` at `on_fit_end` (best held-out checkpoint restored first), or directly via `search`.

    After either, `results` maps each budget to its SearchResult (population sorted by predicted score).
    """

    def __init__(self, space, cost_fn: Callable[[ModelSchedule], float], budgets: Sequence[float], seed: int = 0,
                 evolution: dict | None = None):
        self.space, self.cost_fn, self.budgets = space, cost_fn, [float(b) for b in budgets]
        self.seed, self.evolution = seed, dict(evolution or {})
        self.results: dict[float, SearchResult] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            pl_module.load_state_dict(torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"])
        if trainer.is_global_zero:
            self.search(pl_module)

    def search(self, predictor) -> dict[float, SearchResult]:
        self.results = evolve_frontier(self.space, predictor.predict_scores, self.cost_fn, self.budgets,
                                       seed=self.seed, **self.evolution)
        return self.results
