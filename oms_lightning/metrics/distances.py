"""Pure float64 metric functions on features and images (torch; numpy arrays are accepted and converted).

`gaussian_stats` and `frechet_distance` (the Fréchet distance maths behind FID), `kernel_distance` (KID over all
samples), `pixel_features` (raw pixels as features, for a pixel-space Fréchet distance), and the memorisation
check `copy_threshold` / `copy_rate` (nearest-neighbour L2 distances to the training images). Also the image
check every metric module shares, `_check_images`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from oms_lightning.errors import UserError


def _check_images(images: Tensor, what: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(f"{what} must be a float tensor (N, C, H, W) in [-1, 1], got {shape}")


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
