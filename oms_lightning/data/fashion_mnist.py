"""Fashion-MNIST (Xiao et al. 2017): 70k 28x28 greyscale articles of clothing in 10 classes, the benchmark with
headroom over the 8x8 digits. Pooled to 14x14 (or padded and pooled to 16x16) so CPUs can train a zoo on it.

The four IDX files (gzipped or plain) come from `raw_dir` (a folder holding them, such as the Debian package
dataset-fashion-mnist's /usr/share/datasets/fashion-mnist) or from torchvision's layout
`<data_dir>/FashionMNIST/raw/`, downloaded there by torchvision only with download=True. Every file's decompressed
bytes are checked against the dataset's published MD5 before use.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from functools import lru_cache
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import FashionMNIST

from oms_lightning.data.base import ImageDataModule, TensorImages, seeded_split
from oms_lightning.errors import UserError

# MD5 of each file's *decompressed* bytes. torchvision's FashionMNIST.resources lists the MD5 of the upstream .gz
# files, but the Debian package ships the same data recompressed (other gzip header, other .gz bytes), so only
# the decompressed bytes identify the data whichever way it arrived (torchvision checks its own .gz downloads).
FILE_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZES = (28, 14, 16)
SPLITS = ("train", "val", "test")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def torchvision_raw_dir(data_dir: str | Path) -> Path:
    """Where torchvision's FashionMNIST(data_dir, download=True) puts the four files."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def find_files(folder: Path) -> dict[str, Path] | None:
    """The four files in `folder` (plain preferred to .gz when both exist), or None if any is missing."""
    found = {}
    for name in FILE_MD5:
        candidates = [folder / name, folder / f"{name}.gz"]
        found[name] = next((p for p in candidates if p.is_file()), None)
    return None if None in found.values() else found


def _missing_message(folders: list[Path], reason: str = "") -> str:
    """One line naming where we looked and both ways to get the files."""
    where = " or ".join(str(f) for f in folders) or "nowhere (raw_dir and data_dir are both unset)"
    why = f" ({reason})" if reason else ""
    return (f"Fashion-MNIST is not in {where}{why}: the four IDX files {', '.join(FILE_MD5)} (.gz or plain) are "
            f"needed; either install the Debian package (apt-get install dataset-fashion-mnist) and set "
            f"data.module.raw_dir={DEBIAN_DIR}, or download them with torchvision (needs network access): "
            f"data.module.download=true data.module.data_dir=<folder>")


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it is a .gz; a broken gzip stream is a UserError naming the file."""
    try:
        if path.suffix != ".gz":
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it and fetch it "
                        f"again (apt-get install --reinstall dataset-fashion-mnist, or data.module.download=true)"
                        ) from None


def _decode_idx(data: bytes, path: Path, ndim: int) -> Tensor:
    """An IDX array of unsigned bytes (LeCun's MNIST format): 0x00 0x00 0x08 <ndim>, ndim big-endian int32
    sizes, then the values. Parsed here because torchvision's reader takes neither .gz files nor bytes."""
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path} is not an IDX file of {ndim}-d unsigned bytes; replace it with the original file")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path} is truncated or corrupt ({len(data) - header} values, its header says "
                        f"{shape}); delete it and fetch it again")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(shape)


def read_idx(path: Path, name: str, ndim: int) -> Tensor:
    """One of the four files, checked against its known MD5 before it is decoded."""
    data = _file_bytes(path)
    digest = hashlib.md5(data).hexdigest()
    if digest != FILE_MD5[name]:
        raise UserError(f"{path} fails its checksum (MD5 of its content {digest}, expected {FILE_MD5[name]}): "
                        f"truncated, corrupt or not Fashion-MNIST; delete it and fetch it again "
                        f"(apt-get install --reinstall dataset-fashion-mnist, or data.module.download=true)")
    return _decode_idx(data, path, ndim)


def _stamp(paths: dict[str, Path]) -> tuple:
    """Paths with size and mtime: the in-memory cache's key, so a replaced file is read again."""
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values())


@lru_cache(maxsize=2)
def _load_arrays(stamp: tuple) -> dict[str, Tensor]:
    """uint8 images (N, 28, 28) and labels (N,) of both files' splits, decoded once per process (memory only)."""
    paths = {Path(p).name.removesuffix(".gz"): Path(p) for p, _, _ in stamp}
    arrays = {name: read_idx(path, name, 3 if "images" in name else 1) for name, path in paths.items()}
    for part in ("train", "t10k"):
        images, labels = arrays[f"{part}-images-idx3-ubyte"], arrays[f"{part}-labels-idx1-ubyte"]
        if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
            raise UserError(f"{paths[f'{part}-images-idx3-ubyte']} holds {tuple(images.shape)} images for "
                            f"{labels.shape[0]} labels (expected N 28x28 images, one label each); replace the files")
    return {"train_x": arrays["train-images-idx3-ubyte"], "train_y": arrays["train-labels-idx1-ubyte"],
            "test_x": arrays["t10k-images-idx3-ubyte"], "test_y": arrays["t10k-labels-idx1-ubyte"]}


def to_images(raw: Tensor, image_size: int) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, S, S) in [-1, 1]. 14: 2x2 average pool; 16: pad with the black
    background to 32 first (the article stays centred, nothing is cropped)."""
    x = raw.float().div(127.5).sub(1.0).unsqueeze(1)
    if image_size == 16:
        x = F.pad(x, [2, 2, 2, 2], value=-1.0)
    return F.avg_pool2d(x, 2) if image_size in (14, 16) else x


class FashionMNISTDataModule(ImageDataModule):
    """A seeded train/val split of the 60k training images, and the 10k test images as a third split ("test",
    the FID reference of evaluations). `labels(split)` gives the classes, for the FID classifier."""

    name = "fashion_mnist"
    channels = 1

    def __init__(self, batch_size: int = 128, num_workers: int = 0, raw_dir: str | None = None,
                 data_dir: str | None = "data", download: bool = False, image_size: int = 14,
                 val_fraction: float = 0.1, split_seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if int(image_size) not in IMAGE_SIZES:
            raise UserError(f"Fashion-MNIST image_size must be one of {IMAGE_SIZES} (14: 2x2 average pool, 16: padded "
                            f"to 32 then pooled), got {image_size}; set data.image_size=14")
        self.image_size = int(image_size)
        self.raw_dir = None if raw_dir in (None, "") else str(raw_dir)
        self.data_dir = None if data_dir in (None, "") else str(data_dir)
        self.download = bool(download)
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        self.test_set: TensorImages | None = None
        self._labels: dict[str, Tensor] = {}

    def _folders(self) -> list[Path]:
        """Where the files may be, in order: raw_dir, then torchvision's folder under data_dir."""
        return ([Path(self.raw_dir)] if self.raw_dir else []) + (
            [torchvision_raw_dir(self.data_dir)] if self.data_dir else [])

    def _find(self) -> dict[str, Path] | None:
        return next((files for files in map(find_files, self._folders()) if files is not None), None)

    def prepare_data(self) -> None:
        """Downloads with torchvision (which checks the .gz MD5s) only when asked and nothing is on disk yet."""
        if self.download and self._find() is None:
            if self.data_dir is None:
                raise UserError(_missing_message(self._folders(), "download=true needs data.module.data_dir"))
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            try:
                FashionMNIST(self.data_dir, train=False, download=True)   # fetches all four files
            except (URLError, OSError, RuntimeError) as err:
                raise UserError(_missing_message(self._folders(), f"the download failed: {err}")) from err

    def setup(self, stage: str | None = None) -> None:
        """Reads (or takes from the in-memory cache) the checked files and fixes the split; never downloads."""
        if self.train_set is not None:
            return
        files = self._find()
        if files is None:
            reason = "" if self.download else "download=false"
            raise UserError(_missing_message(self._folders(), reason))
        arrays = _load_arrays(_stamp(files))
        train_idx, val_idx = seeded_split(arrays["train_x"].shape[0], self.val_fraction, self.split_seed)
        self.train_indices, self.val_indices = train_idx, val_idx
        images = to_images(arrays["train_x"], self.image_size)
        labels = arrays["train_y"].long()
        self.train_set, self.val_set = TensorImages(images[train_idx]), TensorImages(images[val_idx])
        self.test_set = TensorImages(to_images(arrays["test_x"], self.image_size))
        self._labels = {"train": labels[train_idx], "val": labels[val_idx], "test": arrays["test_y"].long()}

    def _split(self, split: str) -> TensorImages:
        """The dataset for `split` (train, val or test), running prepare_data (a download, if asked for) and setup
        first: jobs that only evaluate call real_images without a Trainer."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if self.train_set is None:
            self.prepare_data()
            self.setup("fit")
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), shuffle=False)

    def real_images(self, split: str = "train") -> Tensor:
        """The split's tensor directly (no loader needed): (N, 1, S, S) float32 in [-1, 1]."""
        return self._split(split).data.clone()

    def labels(self, split: str = "train") -> Tensor:
        """Class indices 0..9 (see CLASSES) of `real_images(split)`, row for row."""
        self._split(split)
        return self._labels[split].clone()
