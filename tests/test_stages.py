"""Stage clustering: the optimal denoiser against closed forms, the α rule against a brute-force reading of the paper,
the crossing rule, the time-uniform and logSNR baselines, and the validation of boundaries."""
import json
import math

import pytest
import torch

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.stages import StageError, alpha_rule_boundaries, cluster_stages, clustering_grid, \
    crossing_boundary, logsnr_uniform_boundaries, optimal_denoiser, pixel_tolerance, similarity_curves, \
    stage_index, time_uniform_boundaries, validate_boundaries
from oms_lightning.errors import UserError

SCHEDULE = VPSchedule()


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny nets: see conftest.one_thread


def two_cluster_data(n_per_cluster=6, level=0.5, spread=0.05, seed=0):
    """Images (N, 1, 2, 2): half near +level, half near −level (two well-separated clusters)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.tensor([1.0, -1.0]).repeat_interleave(n_per_cluster)[:, None, None, None]
    return signs * level + spread * torch.randn(2 * n_per_cluster, 1, 2, 2, generator=g)


# ---------------------------------------------------------------------------------------- optimal denoiser
def test_optimal_denoiser_equals_direct_softmax_across_chunks():
    g = torch.Generator().manual_seed(1)
    data = torch.rand(37, 1, 3, 3, generator=g) * 2 - 1
    x_t = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([SCHEDULE.t_min, 0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    alpha, sigma = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    flat = data.flatten(1).double()
    dist_sq = ((x_t.flatten(1)[:, None] - alpha[:, None, None] * flat[None]) ** 2).sum(-1)
    expected = (torch.softmax(-dist_sq / (2 * sigma[:, None] ** 2), dim=1) @ flat).reshape(x_t.shape)
    got = optimal_denoiser(x_t, t, data, SCHEDULE, chunk_size=8)    # 5 chunks: exercises the running log-sum-exp
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_optimal_denoiser_of_two_opposite_images_is_a_tanh():
    # Data {+a·1, −a·1} in d pixels: the posterior mean is a·tanh(α_t a Σ_j x_j / σ_t²)·1 (a two-point softmax).
    a, d = 0.5, 4
    data = torch.stack([torch.full((1, 2, 2), a), torch.full((1, 2, 2), -a)])
    x_t = torch.randn(6, 1, 2, 2, dtype=torch.float64) * 0.3
    t = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    z = SCHEDULE.alpha(t) * a * x_t.flatten(1).sum(1) / SCHEDULE.sigma(t) ** 2
    expected = (a * torch.tanh(z))[:, None].expand(6, d).reshape(x_t.shape)
    torch.testing.assert_close(optimal_denoiser(x_t, t, data, SCHEDULE), expected, rtol=1e-10, atol=1e-12)
    assert d == data[0].numel()


def test_optimal_denoiser_recovers_training_images_at_t_min():
    data = two_cluster_data()
    t = torch.tensor(SCHEDULE.t_min, dtype=torch.float64)
    x_t = SCHEDULE.alpha(t) * data.double() + SCHEDULE.sigma(t) * torch.randn(data.shape, dtype=torch.float64)
    torch.testing.assert_close(optimal_denoiser(x_t, t, data, SCHEDULE), data.double(), rtol=0, atol=1e-9)


def test_paper_eta_is_scaled_to_the_data_range():
    assert pixel_tolerance() == pytest.approx(4 / 255)                   # 2/255 of [−1, 1]'s range 2
    assert pixel_tolerance(data_range=(0.0, 1.0)) == pytest.approx(2 / 255)


# -------------------------------------------------------------------------------------- similarity curves
def test_clean_similarity_of_two_point_data_matches_its_closed_form():
    # Data {±a·1}: D*(x_t, t) = a·tanh(z)·1 with z = α a (α d a + σ √d g)/σ² for x0 = +a·1 (g ~ N(0, 1) is the
    # noise summed over pixels / √d). It agrees with the clean denoiser (= a) on every pixel iff
    # tanh(z) ≥ 1 − η/a, i.e. g ≥ (atanh(1 − η/a) σ²/(α a) − α d a)/(σ √d): a normal tail probability.
    a, d, eta, n = 0.5, 4, pixel_tolerance(), 4000
    data = torch.stack([torch.full((1, 2, 2), a), torch.full((1, 2, 2), -a)])
    images = data.repeat(n // 2, 1, 1, 1)                               # both signs: same probability by symmetry
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = clustering_grid(21, SCHEDULE.t_min)
    to_clean, to_noisy = similarity_curves(data, SCHEDULE, times, images, noise, eta)

    alpha, sigma = SCHEDULE.alpha(times), SCHEDULE.sigma(times)
    threshold = (math.atanh(1 - eta / a) * sigma**2 / (alpha * a) - alpha * d * a) / (sigma * math.sqrt(d))
    analytic = 1 - torch.special.ndtr(threshold)
    assert (to_clean - analytic).abs().max() < 0.04                     # Monte Carlo error ≈ 1/√4000
    assert to_clean[0] == 1 and to_noisy[-1] == 1
    assert to_clean[-1] < 0.05 and to_noisy[0] < 0.05


# -------------------------------------------------------------------------------------------- the α rule
def brute_force_alpha_rule(times, to_clean, to_noisy, alpha):
    """The paper's sentence read literally on the grid, with Python loops."""
    times, to_clean, to_noisy = times.tolist(), to_clean.tolist(), to_noisy.tolist()
    n = len(times)
    t1 = max(times[k] for k in range(1, n) if sum(to_clean[:k]) / k >= alpha)              # over [0, τ)
    t2 = min(times[k] for k in range(n) if sum(to_noisy[k:]) / (n - k) >= alpha)           # over [τ, 1]
    return t1, t2


def synthetic_curves(kind, times):
    if kind == "linear":
        return 1 - times, times
    if kind == "sigmoid":
        return torch.sigmoid(-12 * (times - 0.35)) / torch.sigmoid(torch.tensor(12 * 0.35)), \
            torch.sigmoid(12 * (times - 0.7)) / torch.sigmoid(torch.tensor(12 * 0.3))
    g = torch.Generator().manual_seed(3)                              # bumpy, non-monotone, with exact ends
    to_clean, to_noisy = (1 - times) * (0.8 + 0.2 * torch.rand(times.shape, generator=g, dtype=torch.float64)), \
        times * (0.8 + 0.2 * torch.rand(times.shape, generator=g, dtype=torch.float64))
    to_clean[0], to_noisy[-1] = 1.0, 1.0
    return to_clean, to_noisy


@pytest.mark.parametrize("kind", ["linear", "sigmoid", "bumpy"])
@pytest.mark.parametrize("alpha", [0.613, 0.757, 0.903])   # off the grid's round averages: no float-rounding ties
def test_alpha_rule_matches_brute_force(kind, alpha):
    times = clustering_grid(101, SCHEDULE.t_min)
    to_clean, to_noisy = synthetic_curves(kind, times)
    expected = brute_force_alpha_rule(times, to_clean, to_noisy, alpha)
    if not expected[0] < expected[1]:
        with pytest.raises(StageError, match="too low"):
            alpha_rule_boundaries(times, to_clean, to_noisy, alpha)
    else:
        assert alpha_rule_boundaries(times, to_clean, to_noisy, alpha) == expected


def test_alpha_rule_on_linear_curves_lands_where_the_averages_cross_alpha():
    # to_clean = 1 − t averages 1 − τ/2 over [0, τ) → t1 = 2(1 − α); to_noisy = t averages (1 + τ)/2 over
    # [τ, 1] → t2 = 2α − 1. With α = 0.8: 0.4 and 0.6, to within the grid spacing.
    times = clustering_grid(201, SCHEDULE.t_min)
    t1, t2 = alpha_rule_boundaries(times, 1 - times, times, 0.8)
    assert t1 == pytest.approx(0.4, abs=0.01) and t2 == pytest.approx(0.6, abs=0.01)


def test_alpha_rule_refuses_alphas_without_three_stages():
    times = clustering_grid(101, SCHEDULE.t_min)
    with pytest.raises(StageError, match="too low"):
        alpha_rule_boundaries(times, 1 - times, times, 0.55)           # t1 ≈ 0.9 > t2 ≈ 0.1
    with pytest.raises(StageError, match="too high"):
        alpha_rule_boundaries(times, 1 - times, times, 1.0)            # only [1, 1] averages to 1: empty stage
    with pytest.raises(StageError, match=r"alpha must lie in \(0, 1\]"):
        alpha_rule_boundaries(times, 1 - times, times, 1.5)


def test_crossing_boundary_interpolates_where_the_curves_meet():
    times = clustering_grid(11, SCHEDULE.t_min)
    assert crossing_boundary(times, 1 - times, times) == pytest.approx(0.5)
    # to_clean = 1 − t, to_noisy = t²: they meet at t = (√5 − 1)/2; linear interpolation on a 0.1 grid is close.
    assert crossing_boundary(times, 1 - times, times**2) == pytest.approx((5**0.5 - 1) / 2, abs=2e-3)
    with pytest.raises(StageError, match="degenerate"):
        crossing_boundary(times, torch.ones_like(times), torch.ones_like(times))


# ------------------------------------------------------------------------------------- cluster_stages
def test_cluster_stages_on_two_clusters_follows_its_own_curves():
    data = two_cluster_data()
    result = cluster_stages(data, SCHEDULE, stages=3, alpha=0.8, n_images=12, n_times=41, seed=0)
    assert result.boundaries == brute_force_alpha_rule(result.times, result.to_clean, result.to_noisy, 0.8)
    assert validate_boundaries(result.boundaries, 3) == result.boundaries
    assert result.to_clean[0] == 1 and result.to_noisy[-1] == 1
    assert result.settings["alpha"] == 0.8 and result.settings["eta"] == pytest.approx(4 / 255)
    assert result.baselines["time_uniform"] == (1 / 3, 2 / 3)
    json.dumps(result.to_dict())                                       # plain data, ready for stages.json

    again = cluster_stages(data, SCHEDULE, stages=3, alpha=0.8, n_images=12, n_times=41, seed=0)
    assert again.boundaries == result.boundaries and torch.equal(again.to_clean, result.to_clean)

    two = cluster_stages(data, SCHEDULE, stages=2, n_images=12, n_times=41, seed=0)
    (boundary,) = two.boundaries
    gap = two.to_clean - two.to_noisy
    k = int(torch.nonzero(gap <= 0)[0])
    assert two.times[k - 1] <= boundary <= two.times[k] and gap[k - 1] > 0
    assert two.settings["rule"] == "crossing"


def test_cluster_stages_refuses_stage_counts_without_a_rule():
    with pytest.raises(StageError, match=r"\[2, 3\] stages, not 4"):
        cluster_stages(two_cluster_data(), stages=4)


# ---------------------------------------------------------------------------------- baselines, validation
def test_time_uniform_boundaries():
    assert time_uniform_boundaries(3) == (1 / 3, 2 / 3)
    assert time_uniform_boundaries(4) == (0.25, 0.5, 0.75)
    assert time_uniform_boundaries(1) == ()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_logsnr_uniform_boundaries_split_lambda_evenly(kind):
    schedule = VPSchedule(kind)
    boundaries = logsnr_uniform_boundaries(3, schedule)
    lams = schedule.lambda_(torch.tensor([schedule.t_min, *boundaries, 1.0], dtype=torch.float64))
    steps = lams[:-1] - lams[1:]
    # rtol: the cosine schedule's closed-form t(λ) round-trips to ~1e-7 relative near t_min.
    torch.testing.assert_close(steps, steps.mean().expand(3), rtol=1e-6, atol=0)
    assert validate_boundaries(boundaries, 3) == boundaries


@pytest.mark.parametrize("boundaries,stages,message", [
    ((0.6, 0.4), 3, "strictly increasing"),
    ((0.4, 0.4), 3, "strictly increasing"),
    ((0.4,), 3, "3 stages need 2 interior boundaries"),
    ((0.0, 0.5), 3, r"strictly inside \(t_min=0.0001, 1\)"),
    ((1e-4, 0.5), 3, "strictly inside"),
    ((0.5, 1.0), 3, "strictly inside"),
    ((0.5, float("nan")), 3, "finite"),
    (("a", 0.5), 3, "list of numbers"),
    ((), 0, "positive integer"),
])
def test_bad_boundaries_are_refused(boundaries, stages, message):
    with pytest.raises(StageError, match=message) as info:
        validate_boundaries(boundaries, stages)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_good_boundaries_come_back_as_floats():
    assert validate_boundaries([0.442, 0.631], 3) == (0.442, 0.631)
    assert validate_boundaries([], 1) == ()
    assert validate_boundaries(torch.tensor([0.5]), 2) == (0.5,)


def test_stage_index_rule():
    t = torch.tensor([0.0, 0.442, 0.4421, 0.631, 0.632, 1.0], dtype=torch.float64)
    assert stage_index(t, (0.442, 0.631)).tolist() == [0, 0, 1, 1, 2, 2]
    assert stage_index(torch.tensor(0.442, dtype=torch.float32), (0.442, 0.631)).item() == 0
    assert stage_index(torch.tensor([0.3, 0.9]), ()).tolist() == [0, 0]
