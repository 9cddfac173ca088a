"""FID with a pluggable feature extractor, computed by torchmetrics' `FrechetInceptionDistance`.

Three extractors, all `nn.Module`s mapping images in [-1, 1] (B, C, H, W) to (B, d) float64 features:

* `InceptionExtractor` — the standard 2048-d FID Inception (torch-fidelity's weights through torchmetrics'
  `NoTrainInceptionV3`), for CIFAR-10 and image folders. It never downloads: the weights must already be in
  the torch hub cache or at an explicit path.
* `DigitsClassifierExtractor` — a small CNN trained here on the 8x8 digits (Inception features of 8x8 images
  blown up to 299x299 say little); the feature space is its 128-d penultimate Linear layer taken *before* the
  ReLU (after the ReLU more than half of the 128 dimensions are exactly 0 on real digits, which wastes the
  space and makes the covariance singular).
* `FashionClassifierExtractor` — timm's ResNet-10-T (half width, no stem max-pool) trained here on Fashion-MNIST
  at 14x14 (16 and 28 px images are mapped to exactly those 14 px images); 256-d pooled features before the last
  ReLU. Both classifiers are cached in the data's checkpoints folder with their accuracy, trained on first use.

`FIDEvaluator` computes the real (reference) statistics once, caches them at
`<cache_dir>/fid_ref_<extractor>_<split>.pt` under a fingerprint (extractor name, feature layer, hash of its
weights, number and hash of the real images), loads them into the metric's real-feature state, and scores
generated images:

    ev = FIDEvaluator("digits_classifier", DigitsDataModule(batch_size=128), "checkpoints/digits")
    ev.fid(samples, seed=0)   # FIDResult(value=..., extractor="digits_classifier", n=..., seed=0)

Pure float64 metric functions: `gaussian_stats`, `frechet_distance`, `kernel_distance` (KID over all samples),
`pixel_features`, and the memorisation check `copy_threshold` / `copy_rate`. `SampleMetrics` bundles the set
every comparison reports (`METRICS`: FID, held-out KID, pixel-space Fréchet distance, copy rate), and the same
metrics between real images (`noise_floor`):

    sm = SampleMetrics(ev, dm)
    sm.score(samples, seed=0)   # {"fid": ..., "kid_heldout": ..., "pixel_fd": ..., "copy_rate": ...}
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_torch_save

EXTRACTORS = ("inception", "digits_classifier", "fashion_classifier")
CLASSIFIER_FORMAT_PREFIX = "oms-lightning/fid-classifier-"
CLASSIFIER_FORMAT = CLASSIFIER_FORMAT_PREFIX + "v2"           # v2: features taken before the ReLU
CLASSIFIER_FILE = "fid_classifier.pt"
REFERENCE_FORMAT = "oms-lightning/fid-reference-v2"          # v2: pre-ReLU digits features
MIN_CLASSIFIER_ACCURACY = 0.95
FEATURE_BATCH = 500

# torch-fidelity's FID Inception weights (the TF 2015-12-05 graph ported to PyTorch); torch.hub caches them
# under <torch hub dir>/checkpoints/<file name>.
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]


def _check_images(images: Tensor, what: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(f"{what} must be a float tensor (N, C, H, W) in [-1, 1], got {shape}")


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


def _state_dict_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train_digits_classifier(cache_dir: str | Path = "checkpoints/digits", seed: int = 0,
                                    epochs: int = 30) -> tuple[DigitsClassifierExtractor, float]:
    """The classifier cached at `<cache_dir>/fid_classifier.pt`, training (and caching) it first if absent.

    Returns (model in eval mode, held-out accuracy) and prints the accuracy. An unreadable (e.g. truncated) cache
    or one of an older oms-lightning format is this project's own cache: it is rebuilt, with a warning. A readable
    file that is not an oms-lightning classifier raises UserError (someone else's file is never overwritten).
    """
    return _load_or_train(DIGITS_CACHE, cache_dir, lambda: train_digits_classifier(seed=seed, epochs=epochs),
                          MIN_CLASSIFIER_ACCURACY, {"seed": int(seed), "epochs": int(epochs)})


@dataclass(frozen=True)
class ClassifierCache:
    """How one FID classifier is cached (file, format) and named in messages; shared by digits and Fashion-MNIST."""

    title: str                          # "FID digits classifier"
    file: str                           # in the cache dir
    prefix: str                         # every version of the format starts with it: older ones are ours, stale
    format: str                         # the current version
    model: Callable[[], nn.Module]      # an untrained instance to load the weights into
    accuracy_on: str                    # the split the stored accuracy was measured on
    train_time: str                     # what a rebuild costs, for the warning
    older: str                          # what changed since the older formats


DIGITS_CACHE = ClassifierCache("FID digits classifier", CLASSIFIER_FILE, CLASSIFIER_FORMAT_PREFIX, CLASSIFIER_FORMAT,
                               DigitsClassifierExtractor, "held-out", "≈ 6 s",
                               "the features are now the pre-ReLU layer")


def _load_or_train(cache: ClassifierCache, cache_dir: str | Path, train: Callable[[], tuple[nn.Module, float]],
                   min_accuracy: float, meta: dict) -> tuple[nn.Module, float]:
    """The cached classifier, or `train()`'s, saved atomically (with its accuracy and `meta`) when good enough."""
    path = Path(cache_dir) / cache.file
    if path.exists():
        try:
            model, accuracy = _load_classifier(path, cache)
        except StaleCache as e:
            warnings.warn(f"{e}; training it again ({cache.train_time})", stacklevel=3)
        else:
            print(f"{cache.title}: loaded {path} ({cache.accuracy_on} accuracy {accuracy:.4f})")
            return model, accuracy
    start = time.perf_counter()
    model, accuracy = train()
    seconds = time.perf_counter() - start
    if accuracy < min_accuracy:
        raise UserError(f"the {cache.title} reached only {accuracy:.4f} {cache.accuracy_on} accuracy (needs "
                        f"{min_accuracy}); train longer (epochs > {meta['epochs']}) or try another seed")
    payload = {"format": cache.format, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "accuracy": float(accuracy), **meta, "train_seconds": round(seconds, 1)}
    atomic_torch_save(payload, path)
    print(f"{cache.title}: trained in {seconds:.1f} s, {cache.accuracy_on} accuracy {accuracy:.4f}, saved to {path}")
    return model, accuracy


class StaleCache(UserError):
    """A cache file this project wrote but can no longer use (unreadable or an older format): rebuilt, not refused."""


def _load_classifier(path: Path, cache: ClassifierCache) -> tuple[nn.Module, float]:
    fix = f"delete {path} and run again to retrain it ({cache.train_time} on a CPU)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise StaleCache(f"FID classifier cache {path} is unreadable (truncated or corrupt: "
                         f"{type(e).__name__}: {str(e)[:200]})") from None
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    if isinstance(found, str) and found.startswith(cache.prefix) and found != cache.format:
        raise StaleCache(f"{path} is an older oms-lightning {cache.title} (format {found!r}, expected "
                         f"{cache.format!r}: {cache.older})")
    if found != cache.format:
        raise UserError(f"{path} is not an oms-lightning {cache.title} (format {found!r}, expected "
                        f"{cache.format!r}); {fix}")
    model = cache.model()
    try:
        model.load_state_dict(obj["state_dict"])
        accuracy = float(obj["accuracy"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"FID classifier cache {path} does not fit the classifier ({str(e)[:200]}); {fix}") from None
    return model.eval().requires_grad_(False), accuracy


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
# Factory and evaluator
# --------------------------------------------------------------------------------------------------------------

def fid_evaluator_for(data, checkpoints: str | Path, device: str | torch.device = "cpu", *, data_module=None,
                      split: str | None = None) -> "FIDEvaluator":
    """`data.module`'s FID with the data's extractor against `split` (default `data.fid_reference`, else train),
    statistics cached under <checkpoints>/<data.name>."""
    from hydra.utils import instantiate

    data_module = instantiate(data.module) if data_module is None else data_module
    return FIDEvaluator(default_extractor_for(str(data.name)), data_module, cache_dir=Path(checkpoints) / str(data.name),
                        device=device, split=split or str(data.get("fid_reference", "train")))


def search_evaluator_for(metrics: "SampleMetrics", data, checkpoints: str | Path) -> "FIDEvaluator":
    """The FID that searches and optimisers *select* on: against `data.search_reference` when the data names one
    (Fashion-MNIST: val, so no choice is made on the test split that reports it), else the reported one."""
    split = data.get("search_reference")
    if not split or split == metrics.evaluator.split:
        return metrics.evaluator
    return fid_evaluator_for(data, checkpoints, metrics.evaluator.device, data_module=metrics.data_module, split=split)


def sample_metrics_for(data, checkpoints: str | Path, device: str | torch.device = "cpu") -> "SampleMetrics":
    """The wiring every job shares: `data.module` → `fid_evaluator_for` (the reported reference) → the sample
    metrics (`.evaluator`, `.data_module`)."""
    from hydra.utils import instantiate

    data_module = instantiate(data.module)
    return SampleMetrics(fid_evaluator_for(data, checkpoints, device, data_module=data_module), data_module)


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


@dataclass(frozen=True)
class FIDResult:
    value: float
    extractor: str
    n: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _images_hash(images: Tensor) -> str:
    return hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


class FIDEvaluator:
    """FID of generated images against one real split, with cached reference statistics.

    `data_module_or_real_images` is a data module with `real_images(split)` or a tensor of real images in
    [-1, 1]. `extractor` may be given to use an already built extractor module (its `name` must match).
    The metric does not sync across processes (`sync_on_compute=False`): it scores the images it is given.
    """

    def __init__(self, extractor_name: str, data_module_or_real_images, cache_dir: str | Path,
                 device: str | torch.device = "cpu", *, split: str = "train",
                 weights_path: str | Path | None = None, extractor: nn.Module | None = None,
                 batch_size: int = FEATURE_BATCH):
        if extractor_name not in EXTRACTORS:
            raise UserError(f"unknown FID feature extractor {extractor_name!r}; use one of {', '.join(EXTRACTORS)}")
        self.extractor_name = extractor_name
        self.split = split
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if extractor is None:
            extractor = feature_extractor(extractor_name, self.cache_dir, weights_path,
                                          data_module=data_module_or_real_images)
        self.extractor = extractor.eval().requires_grad_(False)
        if isinstance(data_module_or_real_images, Tensor):
            real = data_module_or_real_images
        elif hasattr(data_module_or_real_images, "real_images"):
            real = data_module_or_real_images.real_images(split)
        else:
            raise UserError("FIDEvaluator needs a data module with real_images(split) or a tensor of real images, "
                            f"got {type(data_module_or_real_images).__name__}")
        _check_images(real, "real images")
        if real.shape[0] < 2:
            raise UserError(f"FID needs at least 2 real images, the {split} split has {real.shape[0]}")
        self.metric = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False,
                                               sync_on_compute=False).to(self.device)
        self.reference_path = self.cache_dir / f"fid_ref_{extractor_name}_{split}.pt"
        # "features" names the layer the features come from, so caches and records of another layout
        # (e.g. the v1 post-ReLU digits features) never match.
        self.fingerprint = {"extractor": extractor_name,
                            "features": getattr(self.extractor, "feature_layout", extractor_name),
                            "weights": _state_dict_hash(self.extractor),
                            "num_images": int(real.shape[0]), "images": _images_hash(real)}
        self.reference_from_cache = False
        stats = self._load_reference()
        if stats is None:
            stats = self._compute_reference(real)
            atomic_torch_save({"format": REFERENCE_FORMAT, "fingerprint": self.fingerprint, **stats},
                              self.reference_path)
        else:
            self.reference_from_cache = True
        self.ref_mean, self.ref_cov, self.ref_n = stats["mean"], stats["cov"], int(stats["num_samples"])
        self._set_real_state()

    # reference statistics ------------------------------------------------------------------------------------
    def _load_reference(self) -> dict | None:
        """Cached stats if the file exists and its fingerprint matches; None means recompute."""
        if not self.reference_path.exists():
            return None
        try:
            obj = torch.load(self.reference_path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            warnings.warn(f"FID reference cache {self.reference_path} is unreadable ({type(e).__name__}); "
                          "recomputing it", stacklevel=3)
            return None
        if not isinstance(obj, dict) or obj.get("format") != REFERENCE_FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            warnings.warn(f"{self.reference_path} is not an FID reference cache of format {REFERENCE_FORMAT!r} "
                          f"(found {found!r}); recomputing it", stacklevel=3)
            return None
        if obj.get("fingerprint") != self.fingerprint:
            return None                                 # other extractor weights or other real images
        return obj

    @torch.no_grad()
    def _compute_reference(self, real: Tensor) -> dict:
        """Real features through the metric itself, then its sums turned into mean and covariance."""
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        for batch in real.split(self.batch_size):
            self.metric.update(batch.to(self.device), real=True)
        n = int(self.metric.real_features_num_samples)
        mean = (self.metric.real_features_sum / n).cpu()
        cov = ((self.metric.real_features_cov_sum.cpu() - n * torch.outer(mean, mean)) / (n - 1))
        return {"mean": mean, "cov": cov, "num_samples": n}

    def _set_real_state(self) -> None:
        """Loads mean/cov into the metric's real state (its running sums), so real features are never redone."""
        n, mean, cov = self.ref_n, self.ref_mean.double(), self.ref_cov.double()
        self.metric.real_features_sum = (mean * n).to(self.device)
        self.metric.real_features_cov_sum = (cov * (n - 1) + n * torch.outer(mean, mean)).to(self.device)
        self.metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=self.device)

    # scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fid(self, images: Tensor, seed: int) -> FIDResult:
        """FID of `images` (N >= 2, in [-1, 1]) against the reference split; `seed` is recorded as given."""
        _check_images(images, "generated images")
        n = int(images.shape[0])
        if n < 2:
            raise UserError(f"FID needs at least 2 generated images, got {n}; sample more images")
        if not torch.isfinite(images).all():
            raise UserError("generated images contain NaN or inf (the sampler diverged); FID is undefined — "
                            "check the sampler settings or the model checkpoint")
        self.metric.reset()                             # drops fake features only (reset_real_features=False)
        for batch in images.split(self.batch_size):
            self.metric.update(batch.to(self.device), real=False)
        value = float(self.metric.compute())
        self.metric.reset()
        return FIDResult(value=value, extractor=self.extractor_name, n=n, seed=int(seed))


# --------------------------------------------------------------------------------------------------------------
# Pure metric functions (float64 torch; numpy arrays are accepted and converted)
# --------------------------------------------------------------------------------------------------------------

def _as_float64(x, what: str, dim: int) -> Tensor:
    """`x` (tensor or array) as a CPU float64 tensor with `dim` dimensions, else a UserError."""
    try:
        t = torch.as_tensor(x).detach().cpu().to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{what} must be a tensor or array of numbers, got {type(x).__name__} ({e})") from None
    if t.dim() != dim:
        raise UserError(f"{what} must have {dim} dimensions, got shape {tuple(t.shape)}")
    return t


def _as_features(x, what: str = "features", min_rows: int = 2) -> Tensor:
    t = _as_float64(x, what, 2)
    if t.shape[0] < min_rows:
        raise UserError(f"{what} need at least {min_rows} rows (samples), got {t.shape[0]}")
    return t


def gaussian_stats(features) -> tuple[Tensor, Tensor]:
    """(mean, unbiased covariance) of (N, D) features, N >= 2, in float64: cov = (X-μ)ᵀ(X-μ) / (N-1)."""
    x = _as_features(features)
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(cov: Tensor) -> Tensor:
    """Symmetric square root V·diag(√λ)·Vᵀ of a covariance, rounding-error negative eigenvalues clipped to 0."""
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½).

    tr (Σ1Σ2)^½ = Σ √eig(√Σ1·Σ2·√Σ1), since Σ1Σ2 is similar to that symmetric PSD matrix; `eigvalsh` on it is
    stabler than general eigenvalues of Σ1Σ2 (which may come out slightly complex). Tiny negative eigenvalues
    from rounding are clipped to 0. The result is not clipped, so identical inputs may give ±1e-12.
    """
    mu1, mu2 = _as_float64(mean1, "mean1", 1), _as_float64(mean2, "mean2", 1)
    s1, s2 = _as_float64(cov1, "cov1", 2), _as_float64(cov2, "cov2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(f"frechet_distance needs means (D,) and covariances (D, D) of one D; got "
                        f"{tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def _off_diagonal_mean(k: Tensor) -> Tensor:
    """Mean of a square kernel matrix without its diagonal: the unbiased within-sample term of MMD²."""
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def kernel_distance(feats_a, feats_b, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """KID: the unbiased MMD² estimate between two feature sets with the polynomial kernel
    k(x, y) = (γ x·y + coef)^degree, γ = 1/D by default (Bińkowski et al. 2018).

    MMD²_u = mean_{i≠j} k(a_i, a_j) + mean_{i≠j} k(b_i, b_j) − 2 mean_{i,j} k(a_i, b_j), over all samples
    (no random subsets, so it is deterministic); the sets may differ in size. Can be slightly negative.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"kernel_distance needs features of one dimension, got {a.shape[1]} and {b.shape[1]}")
    if int(degree) != degree or degree < 1 or (gamma is not None and gamma <= 0):
        raise UserError(f"kernel_distance needs an integer degree >= 1 and gamma > 0, got {degree}, {gamma}")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (g * (x @ y.T) + coef) ** int(degree)

    return float(_off_diagonal_mean(kernel(a, a)) + _off_diagonal_mean(kernel(b, b)) - 2 * kernel(a, b).mean())


def pixel_features(images: Tensor, max_side: int = 16) -> Tensor:
    """Raw pixels as (N, D) float64 features: images (N, C, H, W) in [-1, 1] area-downsampled (adaptive average
    pooling) to at most max_side x max_side, then flattened. 8x8 digits stay as they are: 64-d."""
    _check_images(images)
    if int(max_side) != max_side or max_side < 1:
        raise UserError(f"max_side must be a positive integer, got {max_side}")
    h, w = images.shape[-2:]
    pooled = F.adaptive_avg_pool2d(images.detach().cpu().double(), (min(h, max_side), min(w, max_side)))
    return pooled.flatten(start_dim=1)


def _flat_pixels(images: Tensor, what: str) -> Tensor:
    _check_images(images, what)
    return images.detach().cpu().double().flatten(start_dim=1)


def _nearest_distances(queries: Tensor, reference: Tensor, query_rows: Tensor | None = None,
                       chunk: int = 1024) -> Tensor:
    """L2 distance from each query row to its nearest reference row, by torch.cdist over chunks of queries
    (memory chunk x len(reference)). query_rows: the queries are these rows of the reference, each skips itself."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start:start + chunk], reference)
        if query_rows is not None:
            d[torch.arange(d.shape[0]), query_rows[start:start + chunk]] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def copy_threshold(train_images: Tensor, quantile: float = 0.05, max_queries: int = 5000, seed: int = 0) -> float:
    """The `quantile` of leave-one-out nearest-neighbour L2 distances among the training images (flattened
    pixels): how close two *distinct* real training images get. A memorisation check calls a sample closer
    than this to a training image a copy, so real held-out images are called copies at a rate of about
    `quantile`, exact copies at a rate of 1. At most `max_queries` training images (a fixed random subset) are
    queried against all of them, so a 50k-image set costs 5k x 50k distances, not 50k x 50k."""
    if not 0.0 < quantile < 1.0:
        raise UserError(f"copy quantile must be in (0, 1), got {quantile}")
    train = _flat_pixels(train_images, "training images")
    if train.shape[0] < 2:
        raise UserError(f"the copy threshold needs at least 2 training images, got {train.shape[0]}")
    rows = torch.arange(train.shape[0])
    if train.shape[0] > max_queries:
        rows = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:max_queries].sort().values
    return float(torch.quantile(_nearest_distances(train[rows], train, query_rows=rows), quantile))


def copy_rate(images: Tensor, train_images: Tensor, threshold: float) -> float:
    """Fraction of `images` whose nearest training image (flattened-pixel L2) is closer than `threshold`."""
    x, train = _flat_pixels(images, "images"), _flat_pixels(train_images, "training images")
    if x.shape[1] != train.shape[1] or x.shape[0] == 0:
        raise UserError(f"copy_rate needs a non-empty set of images of the training images' shape "
                        f"{tuple(train_images.shape[1:])}, got {tuple(images.shape)}")
    return float((_nearest_distances(x, train) < threshold).double().mean())


# --------------------------------------------------------------------------------------------------------------
# The metric set every comparison uses
# --------------------------------------------------------------------------------------------------------------

METRICS = ("fid", "kid_heldout", "pixel_fd", "copy_rate")
LOWER_IS_BETTER = {"fid": True, "kid_heldout": True, "pixel_fd": True, "copy_rate": True}


class SampleMetrics:
    """FID plus three checks of another nature, against one data module's real splits:

    * ``fid`` — the evaluator's FID against its reference split (train for digits, the held-out test split for
      Fashion-MNIST: `data.fid_reference`), the number the record store keeps;
    * ``kid_heldout`` — KID (`kernel_distance`) of extractor features against a split the generator never saw:
      the reference itself when it is held out, else *val*; unbiased, and it catches overfitting to train;
    * ``pixel_fd`` — Fréchet distance in raw-pixel space (`pixel_features`) against the reference split, which
      does not depend on the extractor;
    * ``copy_rate`` — fraction of samples closer to a training image than `copy_threshold` (memorisation).

    All are lower-is-better. The constructor precomputes the held-out features, the reference pixel statistics
    and the copy threshold; `evaluator` must score against the data module's split of its name.
    """

    def __init__(self, evaluator: FIDEvaluator, data_module, *, copy_quantile: float = 0.05):
        if not hasattr(data_module, "real_images"):
            raise UserError(f"SampleMetrics needs a data module with real_images(split), got "
                            f"{type(data_module).__name__}")
        self.evaluator, self.data_module = evaluator, data_module
        self.heldout_split = "val" if evaluator.split == "train" else evaluator.split
        splits = {name: data_module.real_images(name) for name in {"train", "val", evaluator.split}}   # each read once
        self.train, self.val = splits["train"], splits["val"]   # val: the noise floor's real samples
        reference, heldout = splits[evaluator.split], splits[self.heldout_split]
        for images, what in ((self.train, "train images"), (heldout, f"{self.heldout_split} images"),
                             (self.val, "val images")):
            _check_images(images, what)
        self._check_reference(evaluator, reference)
        if heldout.shape[0] < 2:
            raise UserError(f"the held-out KID needs at least 2 {self.heldout_split} images, the split has "
                            f"{heldout.shape[0]}; set data.module.val_fraction higher")
        self.heldout_features = self.features(heldout)
        self.reference_pixel_stats = gaussian_stats(pixel_features(reference))
        self.copy_quantile = float(copy_quantile)
        self.copy_threshold = copy_threshold(self.train, self.copy_quantile)

    def _check_reference(self, evaluator: FIDEvaluator, reference: Tensor) -> None:
        """fid and pixel_fd must refer to one real set, or their numbers do not go together."""
        fp = evaluator.fingerprint
        if fp.get("num_images") != reference.shape[0] or fp.get("images") != _images_hash(reference):
            raise UserError(f"SampleMetrics needs an FIDEvaluator on this data module's {evaluator.split!r} split "
                            f"(the evaluator's reference holds {fp.get('num_images')} other images); build both "
                            f"from the same data module")

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Extractor features (N, D) float64 on the CPU, in batches of evaluator.batch_size on its device."""
        ev = self.evaluator
        return torch.cat([ev.extractor(batch.to(ev.device)).double().cpu()
                          for batch in images.split(ev.batch_size)])

    def score(self, images: Tensor, seed: int) -> dict[str, float]:
        """All of `METRICS` for generated `images` (N >= 2, in [-1, 1]); `seed` is passed to evaluator.fid."""
        fid = self.evaluator.fid(images, seed).value        # validates the images (shape, N >= 2, finite)
        return {"fid": fid,
                "kid_heldout": kernel_distance(self.features(images), self.heldout_features),
                "pixel_fd": frechet_distance(*gaussian_stats(pixel_features(images)), *self.reference_pixel_stats),
                "copy_rate": copy_rate(images, self.train, self.copy_threshold)}

    def noise_floor(self, n: int, seed: int = 0) -> dict[str, float]:
        """What `score` gives real data at sample size n: the best a generator can hope for (`n_used` real images).

        Held-out reference (Fashion-MNIST's test split): m = min(n, N_val) real val images, drawn by `seed`, scored
        exactly as samples are — the sizes actually compared. Train reference (digits, whose val split is too small
        for that): two disjoint random sets of m = min(n, N_train // 2) train images, Fréchet distances between
        them (the reference contains both sets), kid_heldout of the first against val. copy_rate: that of real
        val images, the reference rate (about `copy_quantile`).
        """
        if self.evaluator.split not in ("train", "val"):   # a held-out reference the val images are not part of
            return self._floor_against_reference(n, seed)
        m = min(int(n), self.train.shape[0] // 2)
        if m < 2:
            raise UserError(f"the noise floor needs n >= 2 and at least 4 train images, got n={n}, "
                            f"{self.train.shape[0]} train images")
        perm = torch.randperm(self.train.shape[0], generator=torch.Generator().manual_seed(int(seed)))
        first, second = self.train[perm[:m]], self.train[perm[m:2 * m]]
        feats1, feats2 = self.features(first), self.features(second)
        return {"fid": frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2)),
                "kid_heldout": kernel_distance(feats1, self.heldout_features),
                "pixel_fd": frechet_distance(*gaussian_stats(pixel_features(first)),
                                             *gaussian_stats(pixel_features(second))),
                "copy_rate": copy_rate(self.val, self.train, self.copy_threshold),
                "n_used": m}

    def _floor_against_reference(self, n: int, seed: int) -> dict[str, float]:
        m = min(int(n), self.val.shape[0])
        if m < 2:
            raise UserError(f"the noise floor needs n >= 2 and at least 2 val images, got n={n}, "
                            f"{self.val.shape[0]} val images")
        perm = torch.randperm(self.val.shape[0], generator=torch.Generator().manual_seed(int(seed)))
        return {**self.score(self.val[perm[:m]], seed), "n_used": m}
