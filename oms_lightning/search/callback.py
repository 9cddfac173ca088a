"""SearchCallback: when the predictor's training ends, search schedules under the budget(s) with it, re-rank the
best by true FID and report — so a search is one `Trainer.fit` of the predictor with this callback attached."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from oms_lightning.search.evolution import SearchResult, evolve_frontier
from oms_lightning.schedule import ModelSchedule


@dataclass
class BudgetOutcome:
    """What the search found for one budget: the evolution's result and the true FIDs of its top-k."""

    budget: float
    result: SearchResult
    reranked: list[dict] = field(default_factory=list)   # records (schedule, cost, fid, ...) of the top-k

    @property
    def winner(self) -> dict:
        return min(self.reranked, key=lambda r: r["fid"])


class SearchCallback(Callback):
    """Runs at `on_fit_end` with the best predictor weights (best held-out Kendall τ), or directly via `run`.

    space / cost_fn / budgets / evolution: what `evolve_frontier` needs; rerank_fn(schedules) → records with true
    FIDs on fresh samples; report_fn(outcomes, logger) writes and logs the results (table, plots, artifact).
    """

    def __init__(self, space, cost_fn: Callable[[ModelSchedule], float], budgets: Sequence[float],
                 rerank_fn: Callable[[list[ModelSchedule]], list[dict]], top_k: int = 5, seed: int = 0,
                 evolution: dict | None = None, report_fn: Callable | None = None):
        self.space, self.cost_fn, self.budgets = space, cost_fn, [float(b) for b in budgets]
        self.rerank_fn, self.top_k, self.seed = rerank_fn, top_k, seed
        self.evolution, self.report_fn = dict(evolution or {}), report_fn
        self.outcomes: list[BudgetOutcome] = []

    def on_fit_end(self, trainer, pl_module) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            pl_module.load_state_dict(torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"])
        if trainer.is_global_zero:
            self.run(pl_module, trainer.logger)

    def run(self, predictor, logger=None) -> list[BudgetOutcome]:
        results = evolve_frontier(self.space, predictor.predict_scores, self.cost_fn, self.budgets, seed=self.seed,
                                  **self.evolution)
        self.outcomes = []
        for budget in self.budgets:
            result = results[budget]
            top = [c.schedule for c in result.top(self.top_k)]
            self.outcomes.append(BudgetOutcome(budget, result, self.rerank_fn(top)))
        if self.report_fn is not None:
            self.report_fn(self.outcomes, logger)
        return self.outcomes
