"""Training callbacks."""
from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging


class EMA(WeightAveraging):
    """Exponential moving average of the weights through Lightning's weight averaging.

    Lightning swaps the average in for validation (so validation loss and sample grids use EMA weights), copies
    it into the model when fit ends, saves it as the checkpoint's `state_dict` and restores both the average and
    the raw weights on resume. We add the usual decay warm-up d_n = min(decay, (1 + n) / (10 + n)) so that short
    runs are not dominated by the initial weights; with 800k steps and decay 0.9999 it is the plain recipe.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")

        def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor):
            n = float(num_averaged)
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            torch._foreach_lerp_(averaged, current, 1.0 - d)  # avg ← d·avg + (1 − d)·current

        super().__init__(use_buffers=True, multi_avg_fn=ema_update)
        self.decay, self.warmup = decay, warmup

    def on_fit_end(self, trainer, pl_module) -> None:
        # Lightning copies the average into the model in on_train_end, which a resumed run that has no steps
        # left never reaches; copying again here (idempotent) makes "after fit the model holds EMA" always true.
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)
