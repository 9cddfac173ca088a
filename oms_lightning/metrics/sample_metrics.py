"""The metric set every comparison reports, against one data module's real splits.

`SampleMetrics` bundles `METRICS` (FID, held-out KID, pixel-space Fréchet distance, copy rate) for generated
images, and the same metrics between real images (`noise_floor`):

    sm = SampleMetrics(ev, dm)
    sm.score(samples, seed=0)   # {"fid": ..., "kid_heldout": ..., "pixel_fd": ..., "copy_rate": ...}

`sample_metrics_for(data, checkpoints)` builds it from a data config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from oms_lightning.errors import UserError
from oms_lightning.metrics.distances import (_check_images, copy_rate, copy_threshold, frechet_distance,
                                             gaussian_stats, kernel_distance, pixel_features)
from oms_lightning.metrics.fid import FIDEvaluator, _images_hash, fid_evaluator_for

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


def sample_metrics_for(data, checkpoints: str | Path, device: str | torch.device = "cpu") -> "SampleMetrics":
    """The wiring every job shares: `data.module` → `fid_evaluator_for` (the reported reference) → the sample
    metrics (`.evaluator`, `.data_module`)."""
    from hydra.utils import instantiate

    data_module = instantiate(data.module)
    return SampleMetrics(fid_evaluator_for(data, checkpoints, device, data_module=data_module), data_module)
