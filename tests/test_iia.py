"""IIA (Zhang, Kenta, Kleijn, ICLR 2024): correction features of the solvers and the least-squares fit, checked on
Gaussian data, whose denoiser and probability-flow ODE solution are exact (oms_lightning/diffusion/gaussian.py)."""
import json
import math
import warnings

import pytest
import torch

from oms_lightning.diffusion.gaussian import GaussianDenoiser
from oms_lightning.diffusion.iia import (IIAError, IIAFit, IIAFitWarning, fine_reference, fine_solution, fine_times,
                                         fit_coefficients, fit_step, mean_sq_error, sampler_error)
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import (IIA_FEATURE_SETS, SOLVER_REGISTRY, SolverError, corrected, ddim,
                                             dpm_solver_pp, get_solver, heun, snap_times)
from oms_lightning.diffusion.spacing import timesteps
from oms_lightning.errors import UserError

SCHED = VPSchedule("linear")
SHAPE = (1, 8, 8)
N = 160                                   # samples per batch: fit, held-out and evaluation batches are separate noise


def _gaussian(shift: float = 0.0) -> GaussianDenoiser:
    """Per-pixel means in [-1, 1] and stds in [0.2, 1.5], so that one scalar per step cannot fix every pixel."""
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    std = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 1.3 + 0.2
    return GaussianDenoiser(mean + shift, std, SCHED)


def _noise(seed: int, n: int = N, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _times(n: int) -> torch.Tensor:
    return snap_times(timesteps("logsnr_uniform", n, SCHED, t_end=1e-3), SCHED)


@pytest.fixture(scope="module")
def gauss():
    return _gaussian()


WITH_FEATURES = [(name, fs) for name, spec in SOLVER_REGISTRY.items() for fs in spec.feature_sets]


def _fit(name, fs, D, ts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IIAFitWarning)          # `full` is singular at step 1, see below
        return fit_coefficients(name, D, ts, None, SCHED, _noise(1), _noise(2), fs, **kw)


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_the_feature_sets_of_each_solver():
    one_nfe = ("full", "eps", "eps_diff", "x0_diff")
    expected = {"ddim": one_nfe, "dpm_solver++": one_nfe, "dpm_solver++3m": one_nfe, "heun": ("edm",),
                "dpm_solver": (), "ddim_eta1": ()}
    assert {name: spec.feature_sets for name, spec in SOLVER_REGISTRY.items()} == expected
    assert set(IIA_FEATURE_SETS) == {"full", "eps", "eps_diff", "x0_diff", "edm"}
    assert get_solver("heun").feature_names("edm") == ("euler", "corrector", "x0_diff")
    assert get_solver("ddim").feature_names(None) == ()


# ------------------------------------------------------------------------------------------ zero = plain, bit for bit
def _schedule_of_members(name: str, n: int) -> list:
    """A model schedule: a different Gaussian member at every NFE (float32 run, like the networks')."""
    nfe = sum(get_solver(name).step_nfes(n))
    return [_gaussian(shift=0.1 * (j % 3)) for j in range(nfe)]


@pytest.mark.parametrize("name, fs", WITH_FEATURES)
def test_zero_coefficients_give_the_plain_sampler_bit_for_bit(name, fs):
    spec, n = get_solver(name), 5
    ds, x, ts = _schedule_of_members(name, n), _noise(3, 8, torch.float32), timesteps("karras", n, SCHED)
    plain = spec.run(ds, x, ts, SCHED)
    zeros = [[0.0] * len(IIA_FEATURE_SETS[fs])] * n
    assert torch.equal(spec.run(ds, x, ts, SCHED, coefficients=zeros, feature_set=fs), plain)
    assert torch.equal(spec.run(ds, x, ts, SCHED, feature_set=fs), plain)          # no coefficients: plain
    pure = {"ddim": lambda: ddim(ds, x, ts, SCHED), "dpm_solver++": lambda: dpm_solver_pp(ds, x, ts, SCHED),
            "dpm_solver++3m": lambda: dpm_solver_pp(ds, x, ts, SCHED, order=3), "heun": lambda: heun(ds, x, ts, SCHED)}
    assert torch.equal(pure[name](), plain) and plain.dtype == torch.float32
    some = [[0.05] * len(IIA_FEATURE_SETS[fs])] * n                                # and coefficients do act
    assert not torch.equal(spec.run(ds, x, ts, SCHED, coefficients=some, feature_set=fs), plain)


def test_corrected_is_update_plus_weighted_features():
    u, f1, f2 = torch.ones(2, 3), torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    assert corrected(u, [f1, f2], [0.0, 0.0]) is u                                  # skipped, not added
    torch.testing.assert_close(corrected(u, [f1, f2], [0.5, 3.0]), torch.full((2, 3), -1.0))


# ------------------------------------------------------------------------------------------ the fit, on Gaussian data
@pytest.mark.parametrize("name, fs", WITH_FEATURES)
def test_fit_beats_the_plain_step_and_sampler_on_gaussian_data(name, fs, gauss):
    ts = _times(4)
    fit = _fit(name, fs, gauss, ts)
    for i, step in enumerate(fit.steps):       # each corrected step is closer to its fine reference, held-out noise
        if len(step.zero_features) == len(fit.features):
            assert step.coefficients == [0.0] * len(fit.features) and step.held_after == step.held_before
        else:
            assert step.held_after < step.held_before, (i, step)
            assert step.fit_after < step.fit_before, (i, step)
    x = _noise(3)                              # and the whole corrected sampler is closer to the exact ODE solution
    exact = gauss.exact_ode_solution(x, ts[0].item(), ts[-1].item())
    spec = get_solver(name)
    plain_err = mean_sq_error(spec.run(gauss, x, ts, SCHED), exact)
    corrected_out = spec.run(gauss, x, ts, SCHED, coefficients=fit.coefficients, feature_set=fs)
    assert mean_sq_error(corrected_out, exact) < plain_err
    assert torch.equal(fit.run(gauss, x, SCHED), corrected_out)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver++", "dpm_solver++3m"])
@pytest.mark.parametrize("n", [5, 6])
def test_full_feature_set_gains_an_order_of_magnitude(name, n, gauss):
    """`full` (ε term, ε and x0 differences) on 5-6 steps: ≥ 10x lower error against the exact solution. (Single
    features can lose to DPM-Solver++'s own error cancellation there: the fit is greedy, step by step.)"""
    ts = _times(n)
    fit = _fit(name, "full", gauss, ts)
    x = _noise(3)
    exact = gauss.exact_ode_solution(x, ts[0].item(), ts[-1].item())
    plain_err = mean_sq_error(get_solver(name).run(gauss, x, ts, SCHED), exact)
    assert mean_sq_error(fit.run(gauss, x, SCHED), exact) < 0.1 * plain_err


def test_eps_and_x0_differences_coincide_after_a_plain_ddim_step(gauss):
    """After a plain DDIM step ε_1 − ε_0 = −(α_1/σ_1)(D_1 − D_0), and with their scalings the two features are equal:
    `full` is singular at step 1 of DDIM and DPM-Solver++ (whose first step is DDIM) and falls back to a ridge."""
    run = get_solver("ddim").stepper(gauss, _times(4), SCHED, feature_set="full")
    x = _noise(4)
    x, _ = run.step(x)
    _, (_, eps_diff, x0_diff) = run.step(x)
    torch.testing.assert_close(eps_diff, x0_diff, rtol=1e-9, atol=1e-12)
    with pytest.warns(IIAFitWarning, match="step 1"):
        fit = fit_coefficients("ddim", gauss, _times(4), None, SCHED, _noise(1), _noise(2), "full")
    assert [s.fallback for s in fit.steps] == [False, True, False, False]
    assert all(math.isfinite(c) for s in fit.steps for c in s.coefficients)


def test_steps_are_fitted_on_the_states_the_corrected_sampler_visits(gauss):
    """held_before of step k = error of a plain step k taken from the corrected sampler's own state (not from the
    plain sampler's), multistep history included."""
    ts, k = _times(4), 2
    fit = _fit("dpm_solver++", "x0_diff", gauss, ts)
    run = get_solver("dpm_solver++").stepper(gauss, ts, SCHED, feature_set="x0_diff")
    x = _noise(2)
    for i in range(k):
        x = corrected(*run.step(x), fit.coefficients[i])
    target = fine_reference("dpm_solver++", gauss, x, run.ts[k], run.ts[k + 1], SCHED)
    plain_step, _ = run.step(x)
    assert mean_sq_error(plain_step, target) == pytest.approx(fit.steps[k].held_before, rel=1e-10)


def test_first_step_differences_are_zero_and_get_zero_coefficients(gauss):
    fit = _fit("ddim", "x0_diff", gauss, _times(4))
    assert fit.steps[0].coefficients == [0.0] and fit.steps[0].zero_features == [0]
    assert fit.steps[0].condition is None and fit.steps[0].fit_after == fit.steps[0].fit_before


# ------------------------------------------------------------------------------------------ fit_step
def _synthetic(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    update, f1, f2 = (torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    target = update + 0.7 * f1 - 1.3 * f2 + 1e-3 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    return update, [f1, f2], target


def test_fit_step_recovers_known_coefficients():
    fit = fit_step(*_synthetic(0), held_out=_synthetic(1))
    assert fit.coefficients == pytest.approx([0.7, -1.3], abs=1e-3)
    assert fit.held_after < 1e-4 * fit.held_before and fit.condition < 2 and not fit.fallback


def test_a_zero_feature_gets_exactly_zero():
    update, (f1, _), target = _synthetic(0)
    held_update, (h1, _), held_target = _synthetic(1)
    zero = torch.zeros_like(f1)
    fit = fit_step(update, [zero, f1], target, held_out=(held_update, [zero, h1], held_target))
    assert fit.coefficients[0] == 0.0 and fit.coefficients[1] == pytest.approx(0.7, abs=0.05)
    assert fit.zero_features == [0]
    only_zero = fit_step(update, [zero], target)
    assert only_zero.coefficients == [0.0] and only_zero.fit_after == only_zero.fit_before


def test_identical_features_fall_back_to_a_ridge_with_a_warning():
    update, (f1, _), target = _synthetic(0)
    held_update, (h1, _), held_target = _synthetic(1)
    with pytest.warns(IIAFitWarning, match=r"step 3: .*singular or ill-conditioned"):
        fit = fit_step(update, [f1, f1.clone()], target, held_out=(held_update, [h1, h1.clone()], held_target),
                       step=3)
    assert fit.fallback and fit.ridge > 0 and all(math.isfinite(c) for c in fit.coefficients)
    assert fit.coefficients[0] == pytest.approx(fit.coefficients[1]) == pytest.approx(0.35, abs=0.05)
    assert fit.held_after < fit.held_before


def test_fit_step_bad_input_names_the_step():
    update, (f1, f2), target = _synthetic(0)
    with pytest.raises(IIAError, match="step 2: .*not finite") as e:
        fit_step(update, [f1, f2 * float("nan")], target, step=2)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    with pytest.raises(IIAError, match=r"step 4: feature 1 has shape \(200, 3\)"):
        fit_step(update, [f1, f2[:, :3]], target, step=4)
    with pytest.raises(IIAError, match="ridges"):
        fit_step(update, [f1], target, ridges=[-1.0])


# ------------------------------------------------------------------------------------------ coefficient checks
@pytest.mark.parametrize("name, fs, coefficients, match", [
    ("ddim", "x0_diff", [[0.1], [0.2], [0.3, 0.4], [0.0]], r"coefficients of step 2: expected 1 number\(s\), one "
                                                           r"per feature of 'x0_diff' \(x0_diff\), got \[0.3, 0.4\]"),
    ("heun", "edm", [[0.0, 0.0, 0.0], [0.0, float("nan"), 0.0], [0.0] * 3, [0.0] * 3],
     r"coefficient 1 \(corrector\) of step 1 must be a finite number"),
    ("dpm_solver++", "eps", [[0.1]] * 3, "4 steps but 3 per-step entries"),
    ("dpm_solver++", "eps", [[0.1], [True], [0.1], [0.1]], r"coefficient 0 \(eps\) of step 1"),
    ("ddim", "eps", [[0.1], 0.2, [0.1], [0.1]], "coefficients of step 1: expected 1"),
    ("heun", "x0_diff", [[0.0] * 3] * 4, "heun has no IIA feature set 'x0_diff'; it supports: edm"),
    ("ddim", "bogus", [[0.0]] * 4, "ddim has no IIA feature set 'bogus'; it supports: full, eps, eps_diff, x0_diff"),
    ("dpm_solver", "eps", [[0.0]] * 4, r"dpm_solver supports no IIA feature sets \(none implemented yet\)"),
    ("ddim_eta1", "eps", [[0.0]] * 4, r"ddim_eta1 supports no IIA feature sets \(it is stochastic\)"),
    ("ddim", None, [[0.0]] * 4, "IIA coefficients need a feature_set; ddim supports: full"),
])
def test_bad_coefficients_are_refused_clearly(name, fs, coefficients, match, gauss):
    with pytest.raises(SolverError, match=match):
        get_solver(name).run(gauss, _noise(0, 4), _times(4), SCHED, coefficients=coefficients, feature_set=fs)


def test_fit_refuses_unknown_sets_and_reused_noise(gauss):
    with pytest.raises(SolverError, match="it supports: edm"):
        fit_coefficients("heun", gauss, _times(3), None, SCHED, _noise(1), _noise(2), "eps")
    with pytest.raises(IIAError, match="needs a feature_set; ddim supports: full, eps"):
        fit_coefficients("ddim", gauss, _times(3), None, SCHED, _noise(1), _noise(2), None)
    with pytest.raises(IIAError, match="separate noise"):
        fit_coefficients("ddim", gauss, _times(3), None, SCHED, _noise(1), _noise(1), "eps")


# ------------------------------------------------------------------------------------------ references
def test_fine_times_are_logsnr_uniform_with_exact_ends():
    ts = fine_times(SCHED, 0.8, 0.05, 10)
    assert ts[0].item() == 0.8 and ts[-1].item() == 0.05 and len(ts) == 11
    lam = SCHED.lambda_(ts)
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=torch.float64))
    with pytest.raises(IIAError, match="positive integer"):
        fine_times(SCHED, 0.8, 0.05, 0)


class Recorder:
    def __init__(self, d):
        self.d, self.calls = d, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.d(x, t)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver++3m", "heun"])
def test_fine_reference_is_much_closer_to_the_exact_step(name, gauss):
    ts, x = _times(4).tolist(), _noise(5)
    s, t = ts[1], ts[2]
    z = gauss.exact_ode_solution(x, ts[0], s)
    exact = gauss.exact_ode_solution(z, s, t)
    coarse = get_solver(name).run(gauss, z, torch.tensor([s, t], dtype=torch.float64), SCHED)
    fine = fine_reference(name, gauss, z, s, t, SCHED, M=10)
    assert mean_sq_error(fine, exact) < 0.05 * mean_sq_error(coarse, exact)


def test_fine_reference_uses_the_step_denoisers_or_the_reference(gauss):
    ts = _times(4).tolist()
    pred, corr = Recorder(gauss), Recorder(gauss)
    fine_reference("heun", [pred, corr], _noise(5), ts[1], ts[2], SCHED, M=7)
    assert (pred.calls, corr.calls) == (7, 7)                       # the step's NFE slots, repeated per sub-step
    member, big = Recorder(gauss), Recorder(gauss)
    fit = fit_coefficients("ddim", member, _times(3), None, SCHED, _noise(1, 8), _noise(2, 8), "eps", M=4,
                           reference=big)
    assert member.calls == 2 * 3 and big.calls == 2 * 3 * 4          # fit + held-out batch, 3 steps, 4 sub-steps
    assert len(fit.steps) == 3
    with pytest.raises(IIAError, match="needs 2 denoiser"):
        fine_reference("heun", [gauss], _noise(5), ts[1], ts[2], SCHED)
    with pytest.raises(IIAError, match="stochastic"):
        fine_reference("ddim_eta1", gauss, _noise(5), ts[1], ts[2], SCHED)


def test_sampler_error_against_a_fine_reference(gauss):
    ts = _times(4)
    x = _noise(3)
    exact = gauss.exact_ode_solution(x, ts[0].item(), ts[-1].item())
    assert mean_sq_error(fine_solution("heun", gauss, ts, None, SCHED, x), exact) < 1e-4      # plain: ~100
    fit = _fit("heun", "edm", gauss, ts)
    plain = sampler_error("heun", gauss, ts, None, SCHED, x)
    iia = sampler_error("heun", gauss, ts, None, SCHED, x, coefficients=fit.coefficients, feature_set="edm")
    assert iia < 0.01 * plain


# ------------------------------------------------------------------------------------------ results as data
def test_fit_result_is_json_data_and_reloads(gauss):
    fit = _fit("heun", "edm", gauss, _times(3))
    d = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    assert d["solver"] == "heun" and d["features"] == ["euler", "corrector", "x0_diff"] and d["sub_steps"] == 10
    assert set(d["steps"][0]) >= {"coefficients", "condition", "ridge", "fit_before", "fit_after", "held_before",
                                  "held_after", "fallback"}
    again = IIAFit.from_dict(d)
    assert again.coefficients == fit.coefficients and again.times == fit.times
    x = _noise(3, 8)
    assert torch.equal(again.run(gauss, x, SCHED), fit.run(gauss, x, SCHED))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_the_cpu(gauss):
    ts = _times(3)
    cpu = fit_coefficients("dpm_solver++", gauss, ts, None, SCHED, _noise(1), _noise(2), "eps")
    gpu = fit_coefficients("dpm_solver++", gauss, ts, None, SCHED, _noise(1).cuda(), _noise(2).cuda(), "eps")
    assert gpu.coefficients == pytest.approx(cpu.coefficients, rel=1e-6, abs=1e-9)
    x = _noise(3, 8).cuda()
    assert gpu.run(gauss, x, SCHED).device == x.device
