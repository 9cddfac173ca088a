"""FID with a pluggable feature extractor, computed by torchmetrics' `FrechetInceptionDistance`.

`FIDEvaluator` computes the real (reference) statistics once, caches them at
`<cache_dir>/fid_ref_<extractor>_<split>.pt` under a fingerprint (extractor name, feature layer, hash of its
weights, number and hash of the real images), loads them into the metric's real-feature state, and scores
generated images:

    ev = FIDEvaluator("digits_classifier", DigitsDataModule(batch_size=128), "checkpoints/digits")
    ev.fid(samples, seed=0)   # FIDResult(value=..., extractor="digits_classifier", n=..., seed=0)

The wiring from a data config: `fid_evaluator_for` (the reported FID) and `search_evaluator_for` (the FID that
searches and optimisers select on).
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_torch_save
from oms_lightning.metrics.distances import _check_images
from oms_lightning.metrics.extractors import EXTRACTORS, FEATURE_BATCH, default_extractor_for, feature_extractor

if TYPE_CHECKING:
    from oms_lightning.metrics.sample_metrics import SampleMetrics

REFERENCE_FORMAT = "oms-lightning/fid-reference-v2"          # v2: pre-ReLU digits features


def _state_dict_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
# Wiring from a data config
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
