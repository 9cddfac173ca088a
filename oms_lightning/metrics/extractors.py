"""FID feature extractors: `nn.Module`s mapping images in [-1, 1] (B, C, H, W) to (B, d) float64 features.

* `InceptionExtractor` — the standard 2048-d FID Inception (torch-fidelity's weights through torchmetrics'
  `NoTrainInceptionV3`), for CIFAR-10 and image folders. It never downloads: the weights must already be in
  the torch hub cache or at an explicit path.
* `DigitsClassifierExtractor` — a small CNN trained here on the 8x8 digits (Inception features of 8x8 images
  blown up to 299x299 say little); the feature space is its 128-d penultimate Linear layer taken *before* the
  ReLU (after the ReLU more than half of the 128 dimensions are exactly 0 on real digits, which wastes the
  space and makes the covariance singular).
* `FashionClassifierExtractor` — timm's ResNet-10-T (half width, no stem max-pool) trained here on Fashion-MNIST
  at 14x14 (16 and 28 px images are mapped to exactly those 14 px images); 256-d pooled features before the last
  ReLU. Both classifiers are cached in the data's checkpoints folder with their accuracy, trained on first use
  (`load_or_train_digits_classifier`, `load_or_train_fashion_classifier`; the cache rules are in
  `classifier_cache`).

`feature_extractor(name, ...)` builds one by name; `default_extractor_for(data_name)` names the one a data set uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oms_lightning.errors import UserError
from oms_lightning.metrics.classifier_cache import ClassifierCache, _load_or_train
from oms_lightning.metrics.distances import _check_images

EXTRACTORS = ("inception", "digits_classifier", "fashion_classifier")
CLASSIFIER_FORMAT_PREFIX = "oms-lightning/fid-classifier-"
CLASSIFIER_FORMAT = CLASSIFIER_FORMAT_PREFIX + "v2"           # v2: features taken before the ReLU
CLASSIFIER_FILE = "fid_classifier.pt"
MIN_CLASSIFIER_ACCURACY = 0.95
FEATURE_BATCH = 500

# torch-fidelity's FID Inception weights (the TF 2015-12-05 graph ported to PyTorch); torch.hub caches them
# under <torch hub dir>/checkpoints/<file name>.
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------------------
# Inception (2048-d, standard FID)
# --------------------------------------------------------------------------------------------------------------

def _inception_network_class():
    """torchmetrics' NoTrainInceptionV3 (needs torch-fidelity); a function so tests can stand in for it."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    if not _TORCH_FIDELITY_AVAILABLE:
        raise UserError("the FID Inception network needs the torch-fidelity package, which is not installed; "
                        "run `pip install torch-fidelity` (or `pip install torchmetrics[image]`), or use the "
                        "digits_classifier extractor for the digits data")
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3


def inception_weights_file(weights_path: str | Path | None = None) -> Path:
    """The local weights file: `weights_path` if given, else torch.hub's cache. Never downloads."""
    fetch = f"python -c \"import torch; torch.hub.load_state_dict_from_url('{INCEPTION_WEIGHTS_URL}')\""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"FID Inception weights are not available offline (metrics.inception_weights={path} "
                            f"is not a file); run once with network access ({fetch}) to fill the torch hub "
                            f"cache, or set metrics.inception_weights=PATH to an existing copy of "
                            f"{INCEPTION_WEIGHTS_FILE}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file():
        raise UserError(f"FID Inception weights are not available offline (not in the torch hub cache: {cached}); "
                        f"run once with network access ({fetch}) or set metrics.inception_weights=PATH "
                        f"to a copy of {INCEPTION_WEIGHTS_FILE}")
    return cached


class InceptionExtractor(nn.Module):
    """2048-d pool features of the FID Inception; input (B, 1 or 3, H, W) in [-1, 1], any H, W."""

    name = "inception"
    num_features = 2048
    feature_layout = "pool3_2048"                       # recorded in FIDEvaluator.fingerprint

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        network = _inception_network_class()
        path = inception_weights_file(weights_path)
        # antialias=False: NoTrainInceptionV3 then resizes to 299x299 with torch-fidelity's TF1-compatible
        # bilinear interpolation, the preprocessing of the reference (TF / torch-fidelity) FID, so numbers stay
        # comparable with published ones. (Our images are upsampled, where antialiasing would change nothing.)
        self.net = network(name="inception-v3-compat", features_list=[str(self.num_features)],
                           feature_extractor_weights_path=str(path), antialias=False)
        self.net.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)                # grey -> RGB
        elif x.shape[1] != 3:
            raise UserError(f"the inception extractor takes 1- or 3-channel images, got {x.shape[1]} channels")
        # The network expects uint8 in [0, 255] (it rescales to [-1, 1] itself, as the TF graph did).
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(x).double()


# --------------------------------------------------------------------------------------------------------------
# Digits classifier (128-d)
# --------------------------------------------------------------------------------------------------------------

class DigitsClassifierExtractor(nn.Module):
    """Small CNN for 8x8 digits; `forward` gives the 128-d penultimate features, `logits` the 10 class scores.

    The features are the penultimate Linear layer's output before its ReLU (the ReLU sits in `head`), so no
    dimension is dead. No batch norm, and dropout only after the feature layer, so features do not depend on
    train/eval mode.
    """

    name = "digits_classifier"
    num_features = 128
    feature_layout = "pre_relu_128"                     # recorded in FIDEvaluator.fingerprint

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                           # 32 x 4 x 4 (pooling early keeps CPU training ~10 s)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),  # 64 x 4 x 4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),  # the features: pre-activation
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def _features(self, x: Tensor) -> Tensor:
        _check_images(x)
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise UserError(f"the digits_classifier extractor takes (N, 1, 8, 8) digit images, got "
                            f"{tuple(x.shape)}; use metrics extractor 'inception' for other data")
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self._features(x).double()

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self._features(x))


def _digits_with_labels(split_seed: int = 0, val_fraction: float = 0.1):
    """(train_x, train_y, val_x, val_y) on exactly DigitsDataModule's split."""
    from sklearn.datasets import load_digits

    from oms_lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=128, val_fraction=val_fraction, split_seed=split_seed)
    dm.setup("fit")
    labels = torch.as_tensor(load_digits().target, dtype=torch.long)
    return (dm.real_images("train"), labels[dm.train_indices], dm.real_images("val"), labels[dm.val_indices])


def _random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Each image moved by up to `max_shift` pixels in x and y, background (-1) filling in."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            pick = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if pick.any():
                out[pick] = padded[pick, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    predicted = torch.cat([model.logits(batch).argmax(dim=1) for batch in x.split(FEATURE_BATCH)])
    return float((predicted == y).float().mean())


def train_digits_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64,
                            lr: float = 2e-3) -> tuple[DigitsClassifierExtractor, float]:
    """Trains on DigitsDataModule's train split (random 1-pixel shifts); returns (model in eval mode,
    accuracy on the held-out val split). Leaves the global RNG untouched.

    Runs on one CPU thread: the net is tiny, and on a busy machine intra-op threads contend badly (2 threads
    measured 2-20x slower than 1 on a loaded 2-core box; 1 thread takes ~6 s for 30 epochs).
    """
    train_x, train_y, val_x, val_y = _digits_with_labels()
    gen = torch.Generator().manual_seed(int(seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _fit_classifier(train_x, train_y, gen, seed, epochs, batch_size, lr)
        accuracy = _accuracy(model, val_x, val_y)
    finally:
        torch.set_num_threads(threads)
    model.requires_grad_(False)
    return model, accuracy


def _fit_classifier(train_x: Tensor, train_y: Tensor, gen: torch.Generator, seed: int, epochs: int,
                    batch_size: int, lr: float) -> DigitsClassifierExtractor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))                   # weight init and dropout
        model = DigitsClassifierExtractor()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(train_x.shape[0], generator=gen)
            for start in range(0, perm.numel(), batch_size):
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(model.logits(_random_shift(train_x[idx], gen)), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return model


def load_or_train_digits_classifier(cache_dir: str | Path = "checkpoints/digits", seed: int = 0,
                                    epochs: int = 30) -> tuple[DigitsClassifierExtractor, float]:
    """The classifier cached at `<cache_dir>/fid_classifier.pt`, training (and caching) it first if absent.

    Returns (model in eval mode, held-out accuracy) and prints the accuracy. An unreadable (e.g. truncated) cache
    or one of an older oms-lightning format is this project's own cache: it is rebuilt, with a warning. A readable
    file that is not an oms-lightning classifier raises UserError (someone else's file is never overwritten).
    """
    return _load_or_train(DIGITS_CACHE, cache_dir, lambda: train_digits_classifier(seed=seed, epochs=epochs),
                          MIN_CLASSIFIER_ACCURACY, {"seed": int(seed), "epochs": int(epochs)})


DIGITS_CACHE = ClassifierCache("FID digits classifier", CLASSIFIER_FILE, CLASSIFIER_FORMAT_PREFIX, CLASSIFIER_FORMAT,
                               DigitsClassifierExtractor, "held-out", "≈ 6 s",
                               "the features are now the pre-ReLU layer")


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST classifier (256-d, timm)
# --------------------------------------------------------------------------------------------------------------

FASHION_FILE = "fid_fashion_classifier.pt"
FASHION_FORMAT_PREFIX = "oms-lightning/fid-fashion-classifier-"
FASHION_FORMAT = FASHION_FORMAT_PREFIX + "v1"
MIN_FASHION_ACCURACY = 0.88
FASHION_SIZES = (14, 16, 28)


class FashionClassifierExtractor(nn.Module):
    """timm's ResNet-10-T, half width, for Fashion-MNIST seen at 14x14; `forward` gives the 256-d penultimate
    features (global average pool), `logits` the 10 class scores.

    Changed from timm's network for 14 px inputs: half the stage widths and no max-pool after the stride-2 stem
    (the stages start at 7x7, not 4x4): the stock network's accuracy in 2/3 of its training time. The last block's
    ReLU is removed, so the features are taken before it, as the digits classifier's are (after it, 58 % of the
    stock network's features were exactly 0 on the test split). Batch norm is pinned to eval mode (`train()` cannot
    switch it), so features never depend on the batch; the training loop trains `net` directly.
    """

    name = "fashion_classifier"
    num_features = 256
    feature_layout = "resnet10t_half_nopool_pre_relu_256"   # recorded in FIDEvaluator.fingerprint

    def __init__(self):
        super().__init__()
        import timm                                # here: importing timm costs ~1 s that digits runs never need

        self.net = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1,
                                     channels=(32, 64, 128, self.num_features))
        self.net.maxpool = nn.Identity()
        self.net.layer4[-1].act2 = nn.Identity()
        self.eval()

    def train(self, mode: bool = True) -> FashionClassifierExtractor:
        return super().train(False)

    @staticmethod
    def at_14(x: Tensor) -> Tensor:
        """Fashion-MNIST at any of the data module's sizes as the 14x14 images the network sees: exactly the
        data module's 14 px images (16 px: the 1-pixel padding cropped; 28 px: 2x2 average pooled)."""
        _check_images(x)
        size = x.shape[-1]
        if x.shape[1] != 1 or x.shape[-2] != size or size not in FASHION_SIZES:
            raise UserError(f"the fashion_classifier extractor takes (N, 1, S, S) Fashion-MNIST images with S in "
                            f"{FASHION_SIZES}, got {tuple(x.shape)}; use metrics extractor 'inception' for other data")
        if size == 16:
            return x[..., 1:15, 1:15]
        return F.avg_pool2d(x, 2) if size == 28 else x

    def _features(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(self.at_14(x).float()), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._features(x).double()

    def logits(self, x: Tensor) -> Tensor:
        return self.net.get_classifier()(self._features(x))


FASHION_CACHE = ClassifierCache("FID Fashion-MNIST classifier", FASHION_FILE, FASHION_FORMAT_PREFIX, FASHION_FORMAT,
                                FashionClassifierExtractor, "test", "≈ 3 min", "")


def _default_fashion_data():
    """Fashion-MNIST where configs/data/fashion_mnist.yaml looks by default (the Debian folder, OMS_DATA_DIR)."""
    from oms_lightning.data import FashionMNISTDataModule
    from oms_lightning.data.fashion_mnist import DEBIAN_DIR

    return FashionMNISTDataModule(raw_dir=DEBIAN_DIR, data_dir=os.environ.get("OMS_DATA_DIR", "data"), image_size=14)


def _random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability 1/2 (garments are roughly symmetric; +1.2 points of test
    accuracy over random 1-pixel shifts in 5 epochs)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_fashion_classifier(data_module=None, seed: int = 0, epochs: int = 5, batch_size: int = 128,
                             lr: float = 2e-3) -> tuple[FashionClassifierExtractor, float]:
    """Trains on the data module's train split (default: Fashion-MNIST at 14 px, see `_default_fashion_data`);
    returns (model in eval mode, accuracy on its 10k test split). Leaves the global RNG untouched.

    Uses torch's current thread count (set OMP_NUM_THREADS=1 on a busy machine): ~3 min on one CPU thread.
    """
    dm = _default_fashion_data() if data_module is None else data_module
    train_x = FashionClassifierExtractor.at_14(dm.real_images("train"))
    train_y = dm.labels("train")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))               # weight init
        model = FashionClassifierExtractor()
        _fit_fashion(model.net, train_x, train_y, gen, epochs, batch_size, lr)
    model.eval().requires_grad_(False)
    return model, _accuracy(model, dm.real_images("test"), dm.labels("test"))


def _fit_fashion(net: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator, epochs: int, batch_size: int,
                 lr: float) -> None:
    """AdamW with a one-cycle learning rate over full batches only (batch norm needs more than one image)."""
    batch_size = min(int(batch_size), x.shape[0])
    steps = max(1, x.shape[0] // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(net(_random_hflip(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def load_or_train_fashion_classifier(cache_dir: str | Path = "checkpoints/fashion_mnist", data_module=None,
                                     seed: int = 0, epochs: int = 5, min_accuracy: float = MIN_FASHION_ACCURACY
                                     ) -> tuple[FashionClassifierExtractor, float]:
    """The classifier cached at `<cache_dir>/fid_fashion_classifier.pt`, trained (on `data_module`, default
    `_default_fashion_data()`) and cached first if absent; the cache rules of `load_or_train_digits_classifier`.
    Returns (model in eval mode, test accuracy)."""
    return _load_or_train(FASHION_CACHE, cache_dir,
                          lambda: train_fashion_classifier(data_module, seed=seed, epochs=epochs),
                          min_accuracy, {"seed": int(seed), "epochs": int(epochs), "model": "resnet10t"})


# --------------------------------------------------------------------------------------------------------------
# Choosing an extractor
# --------------------------------------------------------------------------------------------------------------

def default_extractor_for(data_name: str) -> str:
    """"digits_classifier" for the 8x8 digits, "fashion_classifier" for Fashion-MNIST, "inception" for the rest."""
    return {"digits": "digits_classifier", "fashion_mnist": "fashion_classifier"}.get(data_name, "inception")


def feature_extractor(name: str, cache_dir: str | Path = "checkpoints/digits",
                      weights_path: str | Path | None = None, data_module=None) -> nn.Module:
    """An extractor by name: "inception" (weights_path or torch hub cache), "digits_classifier" or
    "fashion_classifier" (cached in cache_dir, trained on first use; the latter on `data_module` when it has
    labels, else on the default Fashion-MNIST location)."""
    if name == "inception":
        return InceptionExtractor(weights_path)
    if name == "digits_classifier":
        return load_or_train_digits_classifier(cache_dir)[0]
    if name == "fashion_classifier":
        labelled = data_module if hasattr(data_module, "labels") else None
        return load_or_train_fashion_classifier(cache_dir, labelled)[0]
    raise UserError(f"unknown FID feature extractor {name!r}; use one of {', '.join(EXTRACTORS)}")
