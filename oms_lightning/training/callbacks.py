"""Training callbacks and the kill-safe checkpoint writer."""
from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import WeightAveraging

from oms_lightning.io import atomic_torch_save


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with `atomic_path`: Lightning's own saver stages the file under $TMPDIR
    and moves it, which across filesystems is a copy over `last.ckpt` that a kill truncates."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)
