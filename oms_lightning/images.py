"""Sample grids: written as PNG next to the run's outputs and logged to W&B when a logger is attached."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid, save_image

from oms_lightning.io import atomic_path

MIN_TILE_PIXELS = 32  # 8x8 digits are upscaled (nearest) so a grid is readable at a glance


def grid_image(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] → one (3, H', W') grid in [0, 1], roughly square."""
    images = (images.detach().float().cpu() + 1) / 2
    if images.shape[-1] < MIN_TILE_PIXELS:
        images = F.interpolate(images, scale_factor=math.ceil(MIN_TILE_PIXELS / images.shape[-1]), mode="nearest")
    nrow = math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: Tensor, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(grid_image(images), tmp, format="png")
    return path


def log_grid(images: Tensor, trainer, name: str, step: int) -> Path | None:
    """Write `<run dir>/<name>/step_<step>.png` and log it as an image to the trainer's W&B logger, if any."""
    run_dir = getattr(trainer.lightning_module, "run_dir", None) or trainer.default_root_dir
    path = save_grid(images, Path(run_dir) / name / f"step_{step:07d}.png")
    logger = trainer.logger
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key=name, images=[str(path)], step=step)
    return path


@torch.no_grad()
def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float → uint8 NHWC, the layout of stored sample arrays."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
