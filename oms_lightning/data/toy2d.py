"""A 2-D Gaussian mixture on a circle: a density known in closed form, for analytic tests of samplers."""

from __future__ import annotations

import math

import torch

from oms_lightning.data.base import ImageDataModule, TensorImages, seeded_split


def circle_means(n_components: int, radius: float) -> torch.Tensor:
    """(K, 2) component means equally spaced on a circle of `radius`, the first on the +x axis."""
    angles = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def sample_mixture(means: torch.Tensor, std: float, n: int, seed: int) -> torch.Tensor:
    """n points from the equal-weight isotropic mixture, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    which = torch.randint(means.shape[0], (n,), generator=gen)
    return means[which] + std * torch.randn(n, 2, generator=gen)


class Toy2DDataModule(ImageDataModule):
    """Batches are (B, 2) points; `means` and `std` describe the exact density."""

    name = "toy2d"
    image_size = None
    channels = None

    def __init__(self, n_samples: int = 20000, n_components: int = 8, radius: float = 2.0, std: float = 0.1,
                 batch_size: int = 512, seed: int = 0, val_fraction: float = 0.1, num_workers: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.n_samples, self.seed, self.val_fraction = int(n_samples), int(seed), float(val_fraction)
        self.radius, self.std = float(radius), float(std)
        self.means = circle_means(int(n_components), self.radius)

    def setup(self, stage: str | None = None) -> None:
        """Samples once from the seed; train and val are disjoint draws from one pool."""
        if self.train_set is not None:
            return
        points = sample_mixture(self.means, self.std, self.n_samples, self.seed)
        train_idx, val_idx = seeded_split(self.n_samples, self.val_fraction, self.seed)
        self.train_set = TensorImages(points[train_idx])
        self.val_set = TensorImages(points[val_idx])

    def real_images(self, split: str = "train") -> torch.Tensor:
        """The split's points (named for symmetry with the image modules)."""
        return self._split(split).data.clone()
