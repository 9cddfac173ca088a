"""Any folder of images (recursive), resized and center-cropped to a square, for custom datasets."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from oms_lightning.data.base import ImageDataModule, seeded_split, to_signed_range
from oms_lightning.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def find_images(root: str | Path) -> list[Path]:
    """Sorted image paths under `root`, so the seeded split is the same wherever the folder is copied."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; set data.module.root=<folder of images> "
                        f"(or data.module.root=... on the command line)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}, searched "
                        f"recursively); put images there or point data.module.root at another folder")
    return paths


def folder_transform(image_size: int, channels: int, random_flip: bool) -> transforms.Compose:
    """Shorter side to image_size, center crop, optional flip, then [-1, 1]."""
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    steps += [transforms.RandomHorizontalFlip()] if random_flip else []
    return transforms.Compose(steps + [transforms.ToTensor(), to_signed_range(channels)])


class ImageFiles(Dataset):
    """Loads images lazily; a broken file names itself instead of failing deep inside a worker."""

    def __init__(self, paths: list[Path], mode: str, transform: transforms.Compose):
        self.paths, self.mode, self.transform = paths, mode, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                image = img.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {path} ({err}); delete or replace the file") from err
        return self.transform(image)


class ImageFolderDataModule(ImageDataModule):
    """Seeded train/val split of one folder's images; channels=1 converts to grayscale, 3 to RGB."""

    name = "image_folder"

    def __init__(self, root: str, image_size: int, channels: int = 3, batch_size: int = 128,
                 val_fraction: float = 0.05, split_seed: int = 0, num_workers: int = 4, random_flip: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if int(channels) not in (1, 3):
            raise UserError(f"image_folder channels must be 1 (grayscale) or 3 (RGB), got {channels}; "
                            f"set data.channels=1 or data.channels=3")
        if int(image_size) <= 0:
            raise UserError(f"image_size must be a positive integer, got {image_size}; set data.image_size=32")
        self.root, self.image_size, self.channels = str(root), int(image_size), int(channels)
        self.val_fraction, self.split_seed, self.random_flip = float(val_fraction), int(split_seed), bool(random_flip)

    def setup(self, stage: str | None = None) -> None:
        """Scans the folder once and fixes the split; the files themselves load lazily."""
        if self.train_set is not None:
            return
        paths = find_images(self.root)
        train_idx, val_idx = seeded_split(len(paths), self.val_fraction, self.split_seed)
        mode = "L" if self.channels == 1 else "RGB"
        self.train_set = ImageFiles([paths[i] for i in train_idx], mode, self._transform(self.random_flip))
        self.val_set = ImageFiles([paths[i] for i in val_idx], mode, self._transform(False))

    def _reference_set(self, split: str) -> Dataset:
        """The split without random flips, so FID statistics are deterministic."""
        dataset = self._split(split)
        return ImageFiles(dataset.paths, dataset.mode, self._transform(False))

    def _transform(self, random_flip: bool) -> transforms.Compose:
        return folder_transform(self.image_size, self.channels, random_flip)
