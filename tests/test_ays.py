"""Align Your Steps (diffusion/ays.py), checked analytically on Gaussian data of std c.

For x0 ~ N(0, c² I_d) the σ-space denoiser is linear, the KLUB of a window is d c⁴ Z(lo, hi), its minimiser is
log(1 + c²/σ²) uniform, and deterministic DDIM's optimum is arctan(σ/c) uniform: every claim here has an exact
reference.
"""
import json
import math

import pytest
import torch
from scipy.integrate import quad

from oms_lightning.diffusion import ays
from oms_lightning.diffusion.denoiser import EpsDenoiser, GaussianDenoiser
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import ddim
from oms_lightning.diffusion.spacing import timesteps

C, DIM = 0.5, 64
SCHED = VPSchedule("linear")
T_END = 1e-3
SIGMA_MIN, SIGMA_MAX = ays.sigma_of_t(SCHED, T_END).item(), ays.sigma_of_t(SCHED, 1.0).item()   # ≈ 0.0316, 152


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny nets: see conftest.one_thread


def gaussian_data(std=C, n=4096, seed=0):
    return std * torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def g(sigma, hi, c=C):
    """The unnormalised proposal σ⁻³ (1/(σ² + c²) − 1/(hi² + c²))."""
    return sigma**-3 * (1 / (sigma**2 + c**2) - 1 / (hi**2 + c**2))


def quad_log(f, lo, hi):
    """∫_lo^hi f(σ) dσ in u = log σ (well conditioned over decades)."""
    val, _ = quad(lambda u: f(math.exp(u)) * math.exp(u), math.log(lo), math.log(hi),
                  epsabs=0, epsrel=1e-13, limit=500)
    return val


def spacing_sigmas(kind, steps):
    return ays.sigma_of_t(SCHED, timesteps(kind, steps, SCHED, t_end=T_END))


# ------------------------------------------------------------------------------------------ importance sampling
@pytest.mark.parametrize("lo,hi,c", [(0.002, 80.0, 0.5), (0.1, 0.2, 0.5), (1.0, 1.0001, 0.5), (0.03, 152.0, 0.5),
                                     (3.0, 80.0, 0.5), (0.01, 0.35, 1.3)])
def test_normaliser_matches_quadrature(lo, hi, c):
    z = ays.proposal_normaliser(lo, hi, c).item()
    assert z == pytest.approx(quad_log(lambda s: g(s, hi, c), lo, hi), rel=1e-9)


def test_proposal_sampler_inverts_the_cdf():
    lo, hi = 0.02, 3.0
    u = torch.tensor([1e-6, 0.01, 0.2, 0.5, 0.8, 0.99, 1 - 1e-6], dtype=torch.float64)
    sig = ays.sample_proposal(u, lo, hi, C)
    assert ((sig >= lo) & (sig <= hi)).all() and (sig[1:] > sig[:-1]).all()
    z = ays.proposal_normaliser(lo, hi, C).item()
    cdf = [quad_log(lambda s: g(s, hi), lo, s_k) / z for s_k in sig.tolist()]
    assert cdf == pytest.approx(u.tolist(), abs=1e-9)


@pytest.mark.parametrize("std", [C, 0.3])
def test_window_estimates_match_the_gaussian_closed_form(std):
    """E‖ΔD‖² = d std⁴ (1/(σ²+std²) − 1/(hi²+std²)), so each window's KLUB is d std⁴ Z_std(lo, hi); std ≠ c makes
    the importance weights non-constant. Each estimate must lie within 4 standard errors of the exact value."""
    sigmas = ays.edm_sigmas(0.002, 80.0, 6)
    est = ays.klub(ays.gaussian_sigma_denoiser(std), gaussian_data(std), sigmas, C, n_mc=2048, seed=3)
    exact = DIM * std**4 * ays.proposal_normaliser(sigmas[1:], sigmas[:-1], std)
    for e, se, x in zip(est.windows, est.window_stderr, exact.tolist()):
        assert abs(e - x) <= 4 * se and se < 0.05 * x
    assert abs(est.total - exact.sum().item()) <= 4 * est.stderr
    assert est.total == pytest.approx(ays.gaussian_klub(sigmas, std, DIM), rel=1e-12 + 4 * est.stderr / est.total)


def test_sigma_denoiser_of_vp_models_is_the_sigma_space_view():
    """D(x̃, σ) = D_vp(α x̃, t(σ)): the VP Gaussian denoiser and an exact ε-net both give c²/(c²+σ²) x̃."""
    x = gaussian_data(n=8)
    sig = torch.logspace(-1.5, 2, 8, dtype=torch.float64)
    want = ays.gaussian_sigma_denoiser(C)(x, sig)
    vp_gauss = GaussianDenoiser(0.0, C, SCHED)
    assert torch.allclose(ays.sigma_denoiser(vp_gauss, SCHED)(x, sig), want, rtol=1e-10, atol=1e-12)

    def eps_net(x_t, t):                                     # ε̂ = (x_t − α D)/σ_t from the exact Gaussian denoiser
        a, s = SCHED.alpha(t.double())[:, None], SCHED.sigma(t.double())[:, None]
        return (x_t - a * vp_gauss(x_t, t.double())) / s
    got = ays.sigma_denoiser(EpsDenoiser(eps_net, SCHED), SCHED)(x, sig)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)   # the ε-net sees float32 times
    t = ays.t_of_sigma(SCHED, sig)
    assert torch.allclose(ays.sigma_of_t(SCHED, t), sig, rtol=1e-12)


# ------------------------------------------------------------------------------------------ closed-form schedules
def test_klub_optimal_closed_form_is_the_minimum():
    best = ays.klub_optimal_gaussian_sigmas(SIGMA_MIN, SIGMA_MAX, 10, C)
    k_best = ays.gaussian_klub(best, C, DIM)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = best.clone()
        other[1:-1] *= torch.exp(0.05 * torch.randn(9, dtype=torch.float64, generator=gen))
        assert ays.gaussian_klub(other, C, DIM) > k_best


def test_kl_optimal_arctan_schedule_is_the_ddim_optimum():
    """Deterministic DDIM on N(0, c²) data scales x̃ by Π cos Δθ_i relative to the exact flow (θ = arctan σ/c), so
    arctan-uniform steps minimise its error; it is not the KLUB optimum (stochastic DDIM)."""
    steps = 8
    x_t = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gauss = GaussianDenoiser(0.0, C, SCHED)

    def ddim_scale(sigmas):
        """DDIM's output over the exact flow's (one factor for every sample; 1 is exact, DDIM shrinks)."""
        ts = ays.t_of_sigma(SCHED, sigmas)
        return (ddim(gauss, x_t, ts, SCHED) / gauss.exact_ode_solution(x_t, ts[0], ts[-1])).mean().item()

    kl_opt = ays.kl_optimal_sigmas(SIGMA_MIN, SIGMA_MAX, steps, C)
    theta = torch.atan(kl_opt / C)
    assert ddim_scale(kl_opt) == pytest.approx(torch.cos(theta[:-1] - theta[1:]).prod().item(), rel=1e-5)
    for kind in ("karras", "logsnr_uniform", "time_uniform"):
        assert ddim_scale(spacing_sigmas(kind, steps)) < ddim_scale(kl_opt)
    assert ays.gaussian_klub(kl_opt, C, DIM) > ays.gaussian_klub(
        ays.klub_optimal_gaussian_sigmas(SIGMA_MIN, SIGMA_MAX, steps, C), C, DIM)


# ------------------------------------------------------------------------------------------ the search
@pytest.fixture(scope="module")
def optimised():
    """The default search (10-step EDM start, 11 candidates, refinement 10 → 20 → 40) on exact Gaussian data."""
    sweeps = []
    res = ays.optimize(ays.gaussian_sigma_denoiser(C), gaussian_data(), SIGMA_MIN, SIGMA_MAX, steps=10, c=C,
                       n_mc=256, seed=0, max_sweeps=100, batch_size=4096, on_sweep=sweeps.append)
    return res, sweeps


def test_optimiser_converges_to_the_gaussian_klub_optimum(optimised):
    res, _ = optimised
    assert res.done and [lv.steps for lv in res.levels] == [10, 20, 40]
    for lv in res.levels:
        opt = ays.klub_optimal_gaussian_sigmas(SIGMA_MIN, SIGMA_MAX, lv.steps, C)
        assert lv.sigmas[0] == SIGMA_MAX and lv.sigmas[-1] == SIGMA_MIN
        assert torch.allclose(lv.sigmas, opt, rtol=0.03), (lv.steps, (lv.sigmas / opt - 1).abs().max())
        assert ays.gaussian_klub(lv.sigmas, C, DIM) < 1.001 * ays.gaussian_klub(opt, C, DIM)
        assert lv.chosen_sweep == min(lv.sweeps, key=lambda sw: sw.klub).sweep
        assert lv.sweeps[-1].klub < lv.sweeps[0].klub and all(sw.quality is None for sw in lv.sweeps)
    assert torch.equal(res.schedule(20), res.levels[1].sigmas)


def test_optimised_klub_is_below_every_standard_spacing(optimised):
    res, _ = optimised
    for lv in res.levels:
        mine = ays.gaussian_klub(lv.sigmas, C, DIM)
        for kind in ("karras", "logsnr_uniform", "time_uniform", "time_quadratic"):
            assert mine < ays.gaussian_klub(spacing_sigmas(kind, lv.steps), C, DIM), (lv.steps, kind)
        assert mine < ays.gaussian_klub(ays.kl_optimal_sigmas(SIGMA_MIN, SIGMA_MAX, lv.steps, C), C, DIM)


def test_refinement_moves_only_the_new_points(optimised):
    res, sweeps = optimised
    for coarse, fine in zip(res.levels, res.levels[1:]):
        assert torch.equal(fine.sigmas[0::2], coarse.sigmas)
    assert sweeps[-1].done and sum(len(lv.sweeps) for lv in res.levels) + 1 == len(sweeps)


def test_quality_metric_stops_the_search_and_picks_its_best_sweep():
    """A quality best at a schedule short of the KLUB optimum: the level stops `patience` sweeps after it."""
    start = ays.edm_sigmas(SIGMA_MIN, SIGMA_MAX, 4)
    target = math.sqrt(start[2].item() * ays.klub_optimal_gaussian_sigmas(SIGMA_MIN, SIGMA_MAX, 4, C)[2].item())
    calls = []

    def quality(sigmas):                                  # lower is better; minimal halfway to the KLUB optimum
        calls.append(len(sigmas))
        return abs(math.log(sigmas[2].item() / target))
    res = ays.optimize(ays.gaussian_sigma_denoiser(C), gaussian_data(), SIGMA_MIN, SIGMA_MAX, steps=4, c=C,
                       n_mc=64, seed=1, quality_fn=quality, refinements=0, patience=2, max_sweeps=40)
    (lv,) = res.levels
    q = [sw.quality for sw in lv.sweeps]
    assert lv.chosen_sweep == q.index(min(q)) and 0 < lv.chosen_sweep < len(q) - 1
    assert len(q) - 1 - lv.chosen_sweep == 2 and calls == [5] * len(q)
    assert torch.equal(res.sigmas, torch.tensor(lv.sweeps[lv.chosen_sweep].sigmas, dtype=torch.float64))
    assert lv.sweeps[-1].klub < lv.sweeps[lv.chosen_sweep].klub      # the KLUB kept falling after the best quality


def test_resume_from_a_snapshot_continues_exactly():
    kw = dict(steps=4, c=C, n_mc=32, seed=5, refinements=1, max_sweeps=4, batch_size=4096)
    args = (ays.gaussian_sigma_denoiser(C), gaussian_data(), SIGMA_MIN, SIGMA_MAX)
    straight = ays.optimize(*args, **kw)
    saved = []

    def interrupt(state):
        saved.append(json.dumps(state.to_dict()))         # what a checkpointing callback would write
        if len(saved) == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ays.optimize(*args, on_sweep=interrupt, **kw)
    assert not json.loads(saved[-1])["done"]
    resumed = ays.optimize(*args, state=json.loads(saved[-1]), **kw)
    assert resumed.to_dict() == straight.to_dict()
    with pytest.raises(ValueError, match="different settings.*seed"):
        ays.optimize(*args, state=json.loads(saved[-1]), **{**kw, "seed": 6})


# ------------------------------------------------------------------------------------------ interpolation
def test_log_linear_interpolation():
    sigmas = ays.klub_optimal_gaussian_sigmas(SIGMA_MIN, SIGMA_MAX, 10, C)
    assert torch.equal(ays.interpolate_log_linear(sigmas, 10), sigmas)
    assert torch.allclose(ays.interpolate_log_linear(sigmas, 20), ays.insert_log_midpoints(sigmas), rtol=1e-14)
    for n in (1, 3, 7, 13, 40, 57):
        out = ays.interpolate_log_linear(sigmas, n)
        assert len(out) == n + 1 and out[0] == sigmas[0] and out[-1] == sigmas[-1]
        assert (out[1:] < out[:-1]).all()
    coarse = ays.interpolate_log_linear(ays.interpolate_log_linear(sigmas, 40), 10)
    assert torch.allclose(coarse, sigmas, rtol=1e-14)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,match", [
    (lambda D, x: ays.optimize(D, x, 0.01, 80.0, steps=1), "steps must be an integer >= 2"),
    (lambda D, x: ays.optimize(D, x, 0.01, 80.0, c=0.0), "c must be a finite number > 0"),
    (lambda D, x: ays.optimize(D, x, 80.0, 0.01), "sigma_min < sigma_max"),
    (lambda D, x: ays.optimize(D, x[:0], 0.01, 80.0), "data_samples must be a non-empty"),
    (lambda D, x: ays.optimize(D, x, 0.01, 80.0, init=[80.0, 1.0, 3.0, 0.5, 0.1, 0.01] * 2), "strictly decreasing"),
    (lambda D, x: ays.klub(D, x, [0.01, 0.1, 1.0]), "strictly decreasing"),
    (lambda D, x: ays.klub(D, x, [1.0, 0.1], c=-1.0), "c must be a finite number > 0"),
    (lambda D, x: ays.interpolate_log_linear([1.0, 2.0, 0.5], 4), "strictly decreasing"),
    (lambda D, x: ays.interpolate_log_linear([2.0, 1.0], 0), "n must be an integer >= 1"),
    (lambda D, x: ays.kl_optimal_sigmas(0.01, 80.0, 10, c=0), "c must be a finite number > 0"),
    (lambda D, x: ays.proposal_normaliser(1.0, 0.5), "0 < lo <= hi"),
    (lambda D, x: ays.t_of_sigma(SCHED, 1e4), "outside the schedule's range"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(ays.gaussian_sigma_denoiser(C), gaussian_data(n=16))
