"""sklearn's bundled 8x8 digits: a real image dataset that needs no download, for smoke tests and CPU runs."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from oms_lightning.data.base import ImageDataModule, TensorImages, seeded_split


def load_digit_images() -> torch.Tensor:
    """All 1797 digits as (N, 1, 8, 8) float32 in [-1, 1]; raw pixels are 0..16."""
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)
    return (images / 16.0 * 2.0 - 1.0).unsqueeze(1)


class DigitsDataModule(ImageDataModule):
    """Digits at native 8x8 with a fixed seeded train/val split (identical on every machine)."""

    name = "digits"
    image_size = 8
    channels = 1

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.1, split_seed: int = 0,
                 num_workers: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Cheap (bundled ~1 MB array), so it simply reloads; idempotent."""
        if self.train_set is not None:
            return
        images = load_digit_images()
        self.train_indices, self.val_indices = seeded_split(images.shape[0], self.val_fraction, self.split_seed)
        self.train_set = TensorImages(images[self.train_indices])
        self.val_set = TensorImages(images[self.val_indices])

    def real_images(self, split: str = "train") -> torch.Tensor:
        """The split's tensor directly (no loader needed)."""
        return self._split(split).data.clone()
