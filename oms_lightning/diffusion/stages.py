"""Stage boundaries for multi-stage diffusion (Zhang et al., CVPR 2024; PAPERS.md §4): pure functions, no Lightning.

Stages
------
Sorted interior boundaries t1 < … < t_{K−1} in (t_min, 1) split time into K stages [0, t1], (t1, t2], …, (t_{K−1}, 1]
(stage 0 = lowest noise; a time exactly at a boundary belongs to the lower stage, as in the paper). `stage_index` is
the one implementation of that rule.

Timestep clustering (the paper's method)
----------------------------------------
1. The exact optimal denoiser of the empirical training set {x_i} under the VP forward process x_t = α_t x0 + σ_t ε is
   the posterior mean  D*(x_t, t) = Σ_i w_i x_i,  w = softmax_i(−‖x_t − α_t x_i‖² / (2σ_t²)).
2. The similarity of two times t, t' is the fraction of pixels on which D*(x_t, t) and D*(x_t', t') agree within η,
   for the same image x0 and the same noise ε, averaged over images.
3. On a time grid t_min = τ_0 < τ_1 < … < τ_{n−1} = 1 (steps of 1/(n−1), the first point moved from 0 to t_min) we
   compute two curves: similarity to the cleanest time (τ_0, the paper's "t = 0", where σ = 0 would be singular)
   and to the noisiest (τ_{n−1} = 1).
4. α rule (3 stages): t1 = the largest τ_k whose average clean-similarity over the grid points in [0, τ_k) is ≥ α;
   t2 = the smallest τ_k whose average noisy-similarity over the grid points in [τ_k, 1] is ≥ α. Averages are plain
   means over grid points (a Riemann sum of the paper's integral average on the uniform grid), so boundaries are grid
   points and the grid spacing is their resolution.
   2 stages (our generalisation): the single boundary is where the two curves cross (linear interpolation between
   grid points), i.e. each time joins the end whose denoiser it resembles more; α is not used. Other stage counts
   are refused: the paper defines no rule for them.

Tolerance η: the paper uses η = 2/255 on pixels in [0, 1], i.e. 2/255 of the pixel range. Data here live in
[−1, 1] (range 2), so the same tolerance is η = 2 · (2/255) = 4/255; `pixel_tolerance` does this scaling explicitly.

Baselines from the paper's ablation: time-uniform boundaries (k/K) and SNR-based ones (uniform in half-logSNR λ
between t_min and 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .noise_schedule import VPSchedule

ETA_PAPER = 2 / 255          # the paper's agreement tolerance, as a fraction of the pixel range ([0, 1] pixels)
DEFAULT_ALPHA = 0.9          # our default; PAPERS.md does not record the paper's α
CLUSTER_STAGE_COUNTS = (2, 3)


class StageError(UserError, ValueError):
    """Bad stage boundaries or clustering settings (a ValueError too, so plain callers can catch it as one)."""


# ================================================================================================ boundaries
def validate_boundaries(boundaries: Sequence[float], stages: int, t_min: float | None = None) -> tuple[float, ...]:
    """Check `boundaries` are stages − 1 finite, strictly increasing times strictly inside (t_min, 1); return them.

    t_min defaults to VPSchedule's default (the smallest time a sampler visits).
    """
    t_min = VPSchedule().t_min if t_min is None else float(t_min)
    if isinstance(stages, bool) or int(stages) != stages or stages < 1:
        raise StageError(f"the number of stages must be a positive integer, got {stages!r}")
    try:
        values = tuple(float(b) for b in boundaries)
    except (TypeError, ValueError):
        raise StageError(f"stage boundaries must be a list of numbers, got {boundaries!r}") from None
    if len(values) != stages - 1:
        raise StageError(f"{stages} stages need {stages - 1} interior boundaries, got {len(values)}: {list(values)}")
    if not all(math.isfinite(b) for b in values):
        raise StageError(f"stage boundaries must be finite, got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise StageError(f"stage boundaries must be strictly increasing, got {list(values)}")
    if values and not (t_min < values[0] and values[-1] < 1.0):
        raise StageError(f"stage boundaries must lie strictly inside (t_min={t_min}, 1), got {list(values)}")
    return values


def stage_index(t, boundaries: Sequence[float]) -> Tensor:
    """Stage of each time (LongTensor of t's shape): 0 for [0, t1], k for (t_k, t_{k+1}], K−1 for (t_{K−1}, 1].

    The comparison runs in t's floating dtype, so a time equal to a boundary *as that dtype rounds it* (e.g. float32
    0.442) is at the boundary and goes to the lower stage.
    """
    t = torch.as_tensor(t).contiguous()          # expanded (B,) views are strided; searchsorted wants contiguous
    if not t.is_floating_point():
        t = t.to(torch.float64)
    edges = torch.tensor(list(boundaries), dtype=t.dtype, device=t.device)
    # bucketize(right=False) returns i with edges[i−1] < t ≤ edges[i]: boundaries close the lower stage.
    return torch.bucketize(t, edges, right=False)


def time_uniform_boundaries(stages: int) -> tuple[float, ...]:
    """Equal-length stages in t over [0, 1]: boundaries k/K (the paper's 'timestep-uniform' baseline)."""
    _check_stage_count(stages)
    return tuple(k / stages for k in range(1, stages))


def logsnr_uniform_boundaries(stages: int, noise_schedule: VPSchedule) -> tuple[float, ...]:
    """Stages of equal length in half-logSNR λ between t_min and 1 (the paper's 'SNR-based' baseline)."""
    _check_stage_count(stages)
    lam_lo, lam_hi = noise_schedule.lambda_(torch.tensor(1.0, dtype=torch.float64)), \
        noise_schedule.lambda_(torch.tensor(noise_schedule.t_min, dtype=torch.float64))
    lams = lam_hi + (lam_lo - lam_hi) * torch.arange(1, stages, dtype=torch.float64) / stages
    return tuple(noise_schedule.t_of_lambda(lams).tolist())


def _check_stage_count(stages: int) -> None:
    if isinstance(stages, bool) or int(stages) != stages or stages < 1:
        raise StageError(f"the number of stages must be a positive integer, got {stages!r}")


# ========================================================================================= optimal denoiser
def optimal_denoiser(x_t: Tensor, t, data: Tensor, noise_schedule: VPSchedule, chunk_size: int = 1024) -> Tensor:
    """D*(x_t, t) = Σ_i softmax_i(−‖x_t − α_t x_i‖²/(2σ_t²)) x_i over the training images `data` (float64).

    x_t: (B, …) noisy images; t: scalar or (B,) times in (0, 1]; data: (N, …). The softmax is accumulated over chunks
    of `chunk_size` training images with a running log-sum-exp (online softmax), so memory is O(B · chunk_size).
    """
    batch = x_t.shape[0]
    x = x_t.reshape(batch, -1).to(torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(batch)
    alpha, sigma = noise_schedule.alpha(t)[:, None], noise_schedule.sigma(t)[:, None]
    x_sq = (x * x).sum(1, keepdim=True)
    running_max = torch.full((batch, 1), -math.inf, dtype=torch.float64, device=x.device)
    weight_sum = torch.zeros(batch, 1, dtype=torch.float64, device=x.device)
    weighted = torch.zeros_like(x)
    for chunk in data.reshape(data.shape[0], -1).split(chunk_size):
        c = chunk.to(device=x.device, dtype=torch.float64)
        # ‖x − α c‖² = ‖x‖² − 2α x·c + α²‖c‖² (float64 keeps the cancellation harmless even at σ ≈ 3e-3)
        dist_sq = x_sq - 2 * alpha * (x @ c.T) + alpha**2 * (c * c).sum(1)[None]
        logits = -dist_sq / (2 * sigma**2)
        new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        w = torch.exp(logits - new_max)
        weight_sum = weight_sum * rescale + w.sum(1, keepdim=True)
        weighted = weighted * rescale + w @ c
        running_max = new_max
    return (weighted / weight_sum).reshape(x_t.shape)


def pixel_tolerance(eta_fraction: float = ETA_PAPER, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """The paper's η (a fraction of the pixel range, 2/255 on [0, 1] pixels) in the data's units: 4/255 on [−1, 1]."""
    lo, hi = data_range
    return eta_fraction * (hi - lo)


def pixel_agreement(a: Tensor, b: Tensor, eta: float) -> Tensor:
    """Fraction of pixels (all non-batch dims) where |a − b| ≤ η, per sample: shape (B,)."""
    return ((a - b).abs() <= eta).flatten(1).to(torch.float64).mean(1)


def similarity_curves(data: Tensor, noise_schedule: VPSchedule, times: Tensor, images: Tensor, noise: Tensor,
                      eta: float, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Average pixel agreement of D*(·, τ) with D*(·, times[0]) and with D*(·, times[-1]), for each grid time τ.

    Every time uses the same clean `images` and the same `noise` (x_τ = α_τ x0 + σ_τ ε), as the paper prescribes.
    Returns (to_clean, to_noisy), float64 tensors of the grid's length.
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    x0 = images.to(device=data.device, dtype=torch.float64)
    eps = noise.to(device=data.device, dtype=torch.float64)

    def denoise_at(t: Tensor) -> Tensor:
        t = t.to(data.device)
        x_t = noise_schedule.alpha(t) * x0 + noise_schedule.sigma(t) * eps
        return optimal_denoiser(x_t, t, data, noise_schedule, chunk_size)

    clean_ref, noisy_ref = denoise_at(times[0]), denoise_at(times[-1])
    to_clean, to_noisy = torch.empty_like(times), torch.empty_like(times)
    for k, t in enumerate(times):
        d = denoise_at(t)
        to_clean[k] = pixel_agreement(d, clean_ref, eta).mean()
        to_noisy[k] = pixel_agreement(d, noisy_ref, eta).mean()
    return to_clean, to_noisy


# ============================================================================================ boundary rules
def alpha_rule_boundaries(times: Tensor, to_clean: Tensor, to_noisy: Tensor, alpha: float) -> tuple[float, float]:
    """The paper's α rule on a grid (see the module docstring): (t1, t2), both grid times; checked for validity.

    t1 = max τ_k (k ≥ 1) with mean(to_clean[:k]) ≥ α  (grid points in [0, τ_k));
    t2 = min τ_k with mean(to_noisy[k:]) ≥ α           (grid points in [τ_k, 1]).
    """
    _check_alpha(alpha)
    times, to_clean, to_noisy = (torch.as_tensor(v, dtype=torch.float64) for v in (times, to_clean, to_noisy))
    n = times.numel()
    counts = torch.arange(1, n + 1, dtype=torch.float64)
    mean_before = to_clean.cumsum(0) / counts                     # mean_before[k − 1] = mean(to_clean[:k])
    mean_from = to_noisy.flip(0).cumsum(0).flip(0) / counts.flip(0)   # mean_from[k] = mean(to_noisy[k:])
    # A tiny slack so that an average equal to α up to float rounding counts as reaching it.
    slack = 1e-12
    # τ_k exists for k ≤ n − 1, so only the means over [0, τ_1) … [0, τ_{n−1}) are candidates for t1.
    clean_ok = torch.nonzero(mean_before[: n - 1] >= alpha - slack).flatten() + 1
    noisy_ok = torch.nonzero(mean_from >= alpha - slack).flatten()
    if clean_ok.numel() == 0 or noisy_ok.numel() == 0:   # only possible for curves not ending at 1 (not ours)
        raise StageError(f"alpha={alpha} is too high: no average similarity reaches it; lower alpha")
    k1, k2 = int(clean_ok.max()), int(noisy_ok.min())
    t1, t2 = times[k1].item(), times[k2].item()
    if not t1 < t2:
        raise StageError(f"alpha={alpha} is too low: the clean-side stage [0, {t1:.4g}] and the noisy-side stage "
                         f"[{t2:.4g}, 1] overlap, leaving no middle stage; raise alpha")
    if t2 >= times[-1].item():
        raise StageError(f"alpha={alpha} is too high for this grid: a stage would be empty (t1={t1:.4g}, "
                         f"t2={t2:.4g}); lower alpha or refine the time grid")
    return t1, t2


def crossing_boundary(times: Tensor, to_clean: Tensor, to_noisy: Tensor) -> float:
    """The 2-stage boundary: the first time where to_clean − to_noisy turns ≤ 0, linearly interpolated."""
    times, to_clean, to_noisy = (torch.as_tensor(v, dtype=torch.float64) for v in (times, to_clean, to_noisy))
    gap = to_clean - to_noisy
    if gap[0] <= 0:
        raise StageError("the denoisers at the two ends of time agree as much as the clean end agrees with itself "
                         "(degenerate data, e.g. one repeated image): no stage boundary to find")
    crossed = torch.nonzero(gap <= 0).flatten()
    if crossed.numel() == 0:              # impossible for our curves: gap[-1] = to_clean[-1] − 1 ≤ 0
        raise StageError("the similarity curves never cross on this grid: no stage boundary to find")
    k = int(crossed[0])
    frac = gap[k - 1] / (gap[k - 1] - gap[k])
    return (times[k - 1] + frac * (times[k] - times[k - 1])).item()


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) <= 1.0:
        raise StageError(f"alpha must lie in (0, 1], got {alpha}")


# ================================================================================================ clustering
def clustering_grid(n_times: int, t_min: float) -> Tensor:
    """k/(n−1) for k = 0 … n−1 with the first point moved from 0 to t_min (σ_0 = 0 would be singular), float64.

    Uniform spacing keeps the grid means of the α rule Riemann sums of the paper's averages; round grid times keep
    the boundaries readable (e.g. 0.215 on 201 points).
    """
    times = torch.linspace(0.0, 1.0, n_times, dtype=torch.float64)
    times[0] = t_min
    return times


@dataclass(frozen=True)
class StageClustering:
    """Result of `cluster_stages`: the boundaries, the curves they came from (for plotting) and the settings."""

    boundaries: tuple[float, ...]
    times: Tensor                 # the grid, t_min, 1/(n−1), …, 1 (float64)
    to_clean: Tensor              # similarity of D*(·, τ) to D*(·, t_min) on the grid
    to_noisy: Tensor              # similarity of D*(·, τ) to D*(·, 1) on the grid
    settings: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)   # {"time_uniform": (...), "logsnr_uniform": (...)}

    def to_dict(self) -> dict:
        """Plain JSON-able dict (e.g. for stages.json)."""
        return {"boundaries": list(self.boundaries), "times": self.times.tolist(),
                "to_clean": self.to_clean.tolist(), "to_noisy": self.to_noisy.tolist(),
                "settings": dict(self.settings), "baselines": {k: list(v) for k, v in self.baselines.items()}}


def cluster_stages(data: Tensor, noise_schedule: VPSchedule | None = None, stages: int = 3,
                   alpha: float = DEFAULT_ALPHA, eta: float | None = None, data_range: tuple[float, float] = (-1.0, 1.0), n_images: int = 256,
                   n_times: int = 201, seed: int = 0, chunk_size: int = 1024) -> StageClustering:
    """Stage boundaries of a training set by the paper's timestep clustering (module docstring).

    data: (N, C, H, W) training images in `data_range`, on the device to compute on; the `n_images` clean images
    compared are drawn from it (seeded), so the clean-end denoiser reproduces them. eta defaults to the paper's
    2/255 of the pixel range, in data units (`pixel_tolerance`). The grid is `clustering_grid(n_times, t_min)`.
    """
    noise_schedule = noise_schedule or VPSchedule()
    if stages not in CLUSTER_STAGE_COUNTS:
        raise StageError(f"timestep clustering defines boundaries for {list(CLUSTER_STAGE_COUNTS)} stages, not "
                         f"{stages!r}; use time_uniform_boundaries or logsnr_uniform_boundaries for other counts")
    _check_alpha(alpha)
    if int(n_times) != n_times or n_times < 3:
        raise StageError(f"n_times must be an integer ≥ 3, got {n_times}")
    if data.ndim < 2 or data.shape[0] < 2:
        raise StageError(f"need a batch of at least 2 training images, got shape {tuple(data.shape)}")
    eta = pixel_tolerance(ETA_PAPER, data_range) if eta is None else float(eta)

    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(data.shape[0], generator=generator)[:n_images]
    images = data[pick.to(data.device)]
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    times = clustering_grid(int(n_times), noise_schedule.t_min)
    to_clean, to_noisy = similarity_curves(data, noise_schedule, times, images, noise, eta, chunk_size)

    if stages == 3:
        boundaries = alpha_rule_boundaries(times, to_clean, to_noisy, alpha)
    else:
        boundaries = (crossing_boundary(times, to_clean, to_noisy),)
    boundaries = validate_boundaries(boundaries, stages, noise_schedule.t_min)
    settings = {"stages": stages, "alpha": float(alpha) if stages == 3 else None, "eta": eta,
                "data_range": list(data_range), "n_images": int(images.shape[0]), "n_times": int(n_times),
                "seed": seed, "schedule": noise_schedule.to_dict(), "rule": "alpha" if stages == 3 else "crossing"}
    baselines = {"time_uniform": time_uniform_boundaries(stages),
                 "logsnr_uniform": logsnr_uniform_boundaries(stages, noise_schedule)}
    return StageClustering(boundaries, times, to_clean, to_noisy, settings, baselines)
