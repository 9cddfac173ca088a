"""Pure metric functions (Fréchet distance, KID, pixel features, copy check) and SampleMetrics on real digits."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from oms_lightning.data import DigitsDataModule
from oms_lightning.errors import UserError
from oms_lightning.metrics import (LOWER_IS_BETTER, METRICS, FIDEvaluator, SampleMetrics, copy_rate,
                                   copy_threshold, frechet_distance, gaussian_stats, kernel_distance,
                                   load_or_train_digits_classifier, pixel_features)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Identity(nn.Module):
    """A torchmetrics 'feature extractor' whose inputs already are (N, D) features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def _correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n samples of a random full-covariance Gaussian in d dims (float64)."""
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def test_gaussian_stats_is_mean_and_unbiased_covariance():
    x = _correlated(50, 6, seed=0)
    mean, cov = gaussian_stats(x.numpy())                 # numpy input is accepted
    assert mean.dtype == cov.dtype == torch.float64
    assert torch.allclose(mean, x.mean(dim=0))
    assert torch.allclose(cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))   # divides by N - 1


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    """Diagonal covariances: FD = Σ(μ1−μ2)² + Σ(σ1−σ2)²."""
    g = _gen(1)
    mu1, mu2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    sd1 = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    sd2 = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).square().sum() + (sd1 - sd2).square().sum())
    got = frechet_distance(mu1, torch.diag(sd1 ** 2), mu2, torch.diag(sd2 ** 2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, torch.diag(sd1 ** 2), mu1, torch.diag(sd1 ** 2)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_of_commuting_full_covariances_is_closed_form():
    """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ commute, so tr(Σ1Σ2)^½ = Σ √(ab): FD = ‖Δμ‖² + Σ(√a − √b)²."""
    g = _gen(2)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    a, b = torch.rand(12, generator=g, dtype=torch.float64) * 3, torch.rand(12, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(12, generator=g, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    expected = float(mu1.square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features():
    real, fake = _correlated(400, 24, seed=3), _correlated(300, 24, seed=4, shift=0.2)
    metric = FrechetInceptionDistance(feature=Identity(24))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    assert frechet_distance(*gaussian_stats(real), *gaussian_stats(fake)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
@pytest.mark.parametrize("kernel", [{}, {"degree": 2, "gamma": 0.5, "coef": 0.5}])
def test_kernel_distance_equals_torchmetrics_kid_on_all_samples(kernel):
    """torchmetrics' KID with subsets=1 and subset_size=n draws one random permutation of all n samples of
    each set; the unbiased MMD² is a sum over pairs, invariant to permuting the rows, so that one subset gives
    exactly the full estimate. (Its estimator assumes equal set sizes, hence n real = n fake here.)"""
    n = 200
    real, fake = _correlated(n, 16, seed=5), _correlated(n, 16, seed=6, shift=0.3)
    metric = KernelInceptionDistance(feature=Identity(16), subsets=1, subset_size=n, **kernel)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute()[0])
    assert kernel_distance(real, fake, **kernel) == pytest.approx(expected, rel=1e-6)
    assert kernel_distance(fake, real, **kernel) == pytest.approx(expected, rel=1e-6)   # symmetric


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_shifted():
    """Unit-scale features (the cubic kernel makes the estimate heavy-tailed on large ones): over seeds 0-7
    |same| / shifted measured at most 0.018, so 0.05 leaves room while still telling the two apart."""
    g = _gen(0)                                                              # one mixing matrix, two samples
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
    a = torch.randn(600, 8, generator=g, dtype=torch.float64) @ mix
    b = torch.randn(500, 8, generator=g, dtype=torch.float64) @ mix
    same = kernel_distance(a, b)
    shifted = kernel_distance(a, b + 0.5)
    assert shifted > 0 and abs(same) < 0.05 * shifted, (same, shifted)
    assert kernel_distance(a, b) == same                                     # deterministic: no subsets


def test_pixel_features_are_area_downsampled_flat_pixels():
    digits = torch.rand(5, 1, 8, 8) * 2 - 1
    feats = pixel_features(digits)
    assert feats.shape == (5, 64) and feats.dtype == torch.float64
    assert torch.equal(feats, digits.double().flatten(1))                  # 8x8 <= 16x16: unchanged
    big = torch.rand(3, 3, 32, 32) * 2 - 1
    pooled = pixel_features(big)
    assert pooled.shape == (3, 3 * 16 * 16)
    block_means = big.double().unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))   # 2x2 area averages
    assert torch.allclose(pooled, block_means.flatten(1))


def test_copy_rate_of_training_images_is_one_and_of_noise_zero():
    dm = DigitsDataModule(batch_size=128)
    train, val = dm.real_images("train"), dm.real_images("val")
    threshold = copy_threshold(train, quantile=0.05)
    assert threshold > 0
    assert copy_rate(train, train, threshold) == 1.0
    assert copy_rate(train[:100] + 1e-3, train, threshold) == 1.0          # near-copies count too
    noise = torch.rand(2000, 1, 8, 8, generator=_gen(9)) * 2 - 1
    assert copy_rate(noise, train, threshold) == 0.0
    assert 0.0 < copy_rate(val, train, threshold) < 0.15                   # held-out real: about the quantile


def test_metric_functions_reject_bad_input():
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(UserError, match="at least 2"):
        gaussian_stats(x[:1])
    with pytest.raises(UserError, match="one D"):
        frechet_distance(torch.zeros(4), torch.eye(4), torch.zeros(3), torch.eye(3))
    with pytest.raises(UserError, match="one dimension"):
        kernel_distance(x, torch.randn(10, 5))
    with pytest.raises(UserError, match="N, C, H, W"):
        pixel_features(torch.zeros(4, 64))
    with pytest.raises(UserError, match="quantile"):
        copy_threshold(torch.zeros(4, 1, 8, 8), quantile=1.5)
    with pytest.raises(UserError, match="shape"):
        copy_rate(torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 8, 8), 1.0)


# --------------------------------------------------------------------------------------------------------------
# SampleMetrics on real digits
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluator(digits, tmp_path_factory):
    """The digits classifier is trained once for this module (~6 s on one CPU thread)."""
    cache_dir = tmp_path_factory.mktemp("sample_metrics_cache")
    model, _ = load_or_train_digits_classifier(cache_dir)
    return FIDEvaluator("digits_classifier", digits, cache_dir, "cpu", extractor=model, batch_size=256)


@pytest.fixture(scope="module")
def sample_metrics(evaluator, digits):
    return SampleMetrics(evaluator, digits)


def test_metric_names_and_directions():
    assert METRICS == ("fid", "kid_heldout", "pixel_fd", "copy_rate")
    assert set(LOWER_IS_BETTER) == set(METRICS) and all(LOWER_IS_BETTER.values())


def test_score_has_every_metric_and_the_evaluators_own_fid(sample_metrics, evaluator, digits):
    images = digits.real_images("val")[:100] + 0.1 * torch.randn(100, 1, 8, 8, generator=_gen(10))
    scores = sample_metrics.score(images, seed=3)
    assert tuple(scores) == METRICS and all(math.isfinite(v) for v in scores.values())
    assert scores["fid"] == evaluator.fid(images, seed=3).value            # the record store's number
    assert scores["pixel_fd"] > 0 and 0.0 <= scores["copy_rate"] <= 1.0
    assert sample_metrics.copy_threshold == copy_threshold(digits.real_images("train"), 0.05)


def test_noise_floor_is_deterministic_and_uses_half_the_train_split_at_most(sample_metrics, digits):
    n_train = digits.real_images("train").shape[0]
    floor = sample_metrics.noise_floor(10_000, seed=0)
    assert floor["n_used"] == n_train // 2 == 808
    assert set(floor) == set(METRICS) | {"n_used"}
    assert all(math.isfinite(floor[k]) for k in METRICS) and floor["fid"] > 0 and floor["pixel_fd"] > 0
    assert sample_metrics.noise_floor(10_000, seed=0) == floor
    assert sample_metrics.noise_floor(10_000, seed=1)["fid"] != floor["fid"]
    small = sample_metrics.noise_floor(100, seed=0)
    assert small["n_used"] == 100 and small["fid"] > floor["fid"]          # fewer samples, larger floor
    assert floor["copy_rate"] == copy_rate(digits.real_images("val"), digits.real_images("train"),
                                           sample_metrics.copy_threshold)


def test_real_held_out_images_beat_noise(sample_metrics, digits):
    val = digits.real_images("val")
    noise = torch.rand(val.shape, generator=_gen(11)) * 2 - 1
    real_scores, noise_scores = sample_metrics.score(val, seed=0), sample_metrics.score(noise, seed=0)
    for name in METRICS[:3]:
        assert real_scores[name] < noise_scores[name], (name, real_scores, noise_scores)


def test_sample_metrics_needs_the_evaluator_of_the_same_data_module(evaluator, digits, tmp_path):
    other = FIDEvaluator("digits_classifier", digits.real_images("train")[:500], tmp_path,
                         extractor=evaluator.extractor)
    with pytest.raises(UserError, match="same data module"):
        SampleMetrics(other, digits)
    on_val = SampleMetrics(FIDEvaluator("digits_classifier", digits, tmp_path, extractor=evaluator.extractor,
                                        split="val"), digits)   # a held-out reference is scored against itself
    assert on_val.heldout_split == "val"
    with pytest.raises(UserError, match="real_images"):
        SampleMetrics(evaluator, object())
    with pytest.raises(UserError, match="n >= 2"):
        SampleMetrics(evaluator, digits).noise_floor(1)


def test_copy_threshold_on_a_query_subset_still_skips_only_itself():
    """Queries drawn from a large set skip their own row, not another one: a set holding every image twice has
    distance 0 to the twin, so its threshold is 0 with or without subsampling."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1
    twice = torch.cat([imgs, imgs])
    assert copy_threshold(twice, 0.5, max_queries=50) == 0.0
    full, sub = copy_threshold(imgs, 0.5), copy_threshold(imgs, 0.5, max_queries=150)
    assert sub > 0 and abs(sub - full) / full < 0.1
