"""Shared plumbing for the data modules: batches are bare tensors, never (x, y) tuples."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from oms_lightning.errors import UserError


class TensorImages(Dataset):
    """Wraps one tensor so that items are the rows themselves (the diffusion model ignores labels)."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices from a seeded CPU permutation, so every machine gets the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; set data.module.val_fraction=0.1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = int(round(n * val_fraction))
    if n_val == 0 and val_fraction > 0 and n > 1:
        n_val = 1
    return perm[n_val:], perm[:n_val]


def to_signed_range(channels: int) -> transforms.Normalize:
    """Maps ToTensor's [0, 1] to [-1, 1]; a Normalize (not a lambda) so it pickles into spawned workers."""
    return transforms.Normalize([0.5] * channels, [0.5] * channels)


def stack_dataset(dataset: Dataset, batch_size: int = 512, num_workers: int = 0) -> Tensor:
    """The whole dataset as one tensor (for FID reference statistics); loads in batches to use workers."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return torch.cat(list(loader), dim=0)


class ImageDataModule(L.LightningDataModule):
    """Loaders over `self.train_set` / `self.val_set`, which subclasses fill in `setup`."""

    name: str = ""
    image_size: int | None = None
    channels: int | None = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0):
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _split(self, split: str) -> Dataset:
        """The dataset for `split`, running setup first so callers need not remember to."""
        if split not in ("train", "val"):
                raise UserError(f"unknown split {split!r}; use 'train' or 'val'")
        if self.train_set is None:
            self.setup("fit")
        return self.train_set if split == "train" else self.val_set

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """drop_last only when a full batch exists, so tiny datasets still yield a batch."""
        drop_last = shuffle and len(dataset) > self.batch_size
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._split("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), shuffle=False)

    def _reference_set(self, split: str) -> Dataset:
        """The split without augmentation; modules with random flips override this."""
        return self._split(split)

    def real_images(self, split: str = "train") -> Tensor:
        """The whole split in [-1, 1] without augmentation, as FID reference images."""
        return stack_dataset(self._reference_set(split), num_workers=self.num_workers)
