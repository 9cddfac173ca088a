"""CIFAR-10 via torchvision: train split (optionally flipped) for training, test split for validation."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10

from oms_lightning.data.base import ImageDataModule, to_signed_range
from oms_lightning.errors import UserError


def image_transform(random_flip: bool) -> transforms.Compose:
    """PIL -> float tensor in [-1, 1], with an optional horizontal flip (train-time augmentation)."""
    steps = [transforms.RandomHorizontalFlip()] if random_flip else []
    return transforms.Compose(steps + [transforms.ToTensor(), to_signed_range(3)])


class DropLabels(Dataset):
    """Yields only the image of a labelled dataset: the diffusion model is unconditional."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset[index][0]


def _missing_message(data_dir: str, reason: str) -> str:
    """Says where the data should be and the one command that fetches it elsewhere."""
    fetch = (f"python -c \"from torchvision.datasets import CIFAR10; CIFAR10('{data_dir}', download=True); "
             f"CIFAR10('{data_dir}', train=False, download=True)\"")
    return (f"CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}); download it on a machine "
            f"with network access ({fetch}) and copy it to {data_dir}, or set data.module.data_dir=<folder "
            f"holding cifar-10-batches-py> (or the OMS_DATA_DIR environment variable)")


class CIFAR10DataModule(ImageDataModule):
    """32x32 RGB; `prepare_data` downloads once (rank 0), `setup` only reads what is on disk."""

    name = "cifar10"
    image_size = 32
    channels = 3

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int = 4,
                 download: bool = True, random_flip: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.random_flip = bool(random_flip)

    def _open(self, train: bool, download: bool = False, flip: bool = False) -> CIFAR10:
        """One split, turning torchvision's network/missing-file errors into a UserError."""
        try:
            return CIFAR10(self.data_dir, train=train, download=download, transform=image_transform(flip))
        except (URLError, OSError, RuntimeError) as err:
            reason = str(err) if download else "download=False and the files are missing or corrupt"
            raise UserError(_missing_message(self.data_dir, reason)) from err

    def prepare_data(self) -> None:
        """Downloads both splits if allowed (Lightning calls this on one process per node)."""
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            self._open(train, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Opens the splits without downloading, so non-zero ranks never hit the network."""
        if self.train_set is not None:
            return
        self.train_set = DropLabels(self._open(True, flip=self.random_flip))
        self.val_set = DropLabels(self._open(False))

    def real_images(self, split: str = "train") -> Tensor:
        """Straight from the uint8 arrays (fast, no flips): (N, 3, 32, 32) in [-1, 1]."""
        raw = self._split(split).dataset.data
        return torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
