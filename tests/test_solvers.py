"""Solvers, spacings, denoisers and per-sample seeding, checked against the analytic Gaussian-data ODE."""
import math

import numpy as np
import pytest
import torch

from oms_lightning.diffusion.denoiser import EpsDenoiser, GaussianDenoiser, eps_from_x0, x0_from_eps
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.seeding import SampleNoise, per_sample_noise
from oms_lightning.diffusion.solvers import (DPM_INNER_R, SOLVER_REGISTRY, SolverError, ddim, dpm_solver,
                                             dpm_solver_pp, get_solver, heun, nfe_of, per_nfe, snap_times)
from oms_lightning.diffusion.spacing import SPACINGS, default_t_end, timesteps, validate_times
from oms_lightning.errors import UserError

SCHED = VPSchedule("linear")
MEAN = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
STD = torch.tensor([0.3, 1.5, 0.5], dtype=torch.float64)


@pytest.fixture(scope="module")
def gauss():
    return GaussianDenoiser(MEAN, STD, SCHED)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# name → (run(D, x, ts) → x_end, nfe(n_steps), spacing, step counts in the asymptotic range, expected order)
def _orders(k):
    return lambda n: [k] * n


SOLVER_CASES = {
    "ddim": (lambda D, x, ts: ddim(D, x, ts, SCHED), lambda n: n, "logsnr_uniform", [20, 40, 80], 1),
    "dpm_solver_1": (lambda D, x, ts: dpm_solver(D, x, ts, [1] * (len(ts) - 1), SCHED), lambda n: n,
                     "logsnr_uniform", [20, 40, 80], 1),
    "dpm_solver_2": (lambda D, x, ts: dpm_solver(D, x, ts, [2] * (len(ts) - 1), SCHED), lambda n: 2 * n,
                     "logsnr_uniform", [10, 20, 40], 2),
    "dpm_solver_3": (lambda D, x, ts: dpm_solver(D, x, ts, [3] * (len(ts) - 1), SCHED), lambda n: 3 * n,
                     "logsnr_uniform", [16, 32, 64], 3),
    "dpm_solver_pp_2m": (lambda D, x, ts: dpm_solver_pp(D, x, ts, SCHED, order=2), lambda n: n,
                         "logsnr_uniform", [16, 32, 64], 2),
    # On a λ-uniform grid 3M's leading error term integrates to ~0 for this problem (slope ≈ 4 over a long
    # range); EDM's ρ-spacing is non-uniform in λ and shows the generic order 3.
    "dpm_solver_pp_3m": (lambda D, x, ts: dpm_solver_pp(D, x, ts, SCHED, order=3), lambda n: n,
                         "karras", [32, 64, 128], 3),
    "heun": (lambda D, x, ts: heun(D, x, ts, SCHED), lambda n: 2 * n, "logsnr_uniform", [10, 20, 40], 2),
}


def _error(run, D, x, kind, n):
    ts = snap_times(timesteps(kind, n, SCHED, t_end=1e-3), SCHED)
    ref = D.exact_ode_solution(x, ts[0].item(), ts[-1].item())
    return (run(D, x, ts) - ref).abs().max().item()


def fitted_slope(name, D, x):
    run, nfe, kind, steps, _ = SOLVER_CASES[name]
    errs = [_error(run, D, x, kind, n) for n in steps]
    nfes = [nfe(n) for n in steps]
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0], errs


# ------------------------------------------------------------------------------------------ (a), (b) convergence
@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_converges_to_exact_solution(name, gauss, x_T):
    run, _, kind, _, _ = SOLVER_CASES[name]
    errs = [_error(run, gauss, x_T, kind, n) for n in (10, 40, 160)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.05, errs


@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_order_of_convergence(name, gauss, x_T):
    slope, errs = fitted_slope(name, gauss, x_T)
    expected = SOLVER_CASES[name][4]
    assert abs(slope - expected) < 0.35, f"{name}: slope {slope:.2f}, expected {expected}; errors {errs}"


def test_gaussian_denoiser_is_consistent_with_its_ode(gauss, x_T):
    # The exact ODE solution composes, and the ε of the exact denoiser drives the exact flow (fine DDIM ≈ exact).
    a = gauss.exact_ode_solution(gauss.exact_ode_solution(x_T, 1.0, 0.3), 0.3, 0.01)
    b = gauss.exact_ode_solution(x_T, 1.0, 0.01)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # at t → 0 the denoiser returns (nearly) the input
    x0 = gauss.sample_prior(4, (3,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gauss(x0, torch.full((4,), 1e-4, dtype=torch.float64)), x0, rtol=0, atol=1e-3)


def test_eps_x0_roundtrip_and_eps_denoiser(gauss, x_T):
    t = torch.full((16,), 0.37, dtype=torch.float64)
    a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
    x0 = gauss(x_T, t)
    eps = eps_from_x0(x_T, x0, a, s)
    torch.testing.assert_close(x0_from_eps(x_T, eps, a, s), x0, rtol=1e-12, atol=1e-12)

    def net(x, tt):            # the exact ε-network of the Gaussian data
        assert tt.shape == (x.shape[0],) and tt.dtype == torch.float32
        a_, s_ = SCHED.alpha(tt.double())[:, None], SCHED.sigma(tt.double())[:, None]
        return eps_from_x0(x, gauss(x, tt.double()), a_, s_)

    d = EpsDenoiser(net, SCHED)
    t32 = torch.full((16,), 0.375, dtype=torch.float32)          # exactly representable
    torch.testing.assert_close(d(x_T, t32), gauss(x_T, t32.double()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d(x_T, 0.375), gauss(x_T, 0.375), rtol=1e-10, atol=1e-10)   # scalar t
    torch.testing.assert_close(d.eps(x_T, 0.375), net(x_T, t32))


# ------------------------------------------------------------------------------------------ (c) DDIM = DPM-Solver-1
@pytest.mark.parametrize("kind", SPACINGS)
def test_ddim_equals_dpm_solver_1(kind, gauss, x_T):
    ts = timesteps(kind, 12, SCHED)
    a = ddim(gauss, x_T, ts, SCHED)
    b = dpm_solver(gauss, x_T, ts, [1] * 12, SCHED)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ (d) model schedules
class Counting:
    def __init__(self, d):
        self.d, self.calls, self.ts = d, 0, []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32 and t.device == x.device
        self.calls += 1
        self.ts.append(t[0].item())
        return self.d(x, t)


RUNS = {
    "ddim": (lambda ds, x, ts: ddim(ds, x, ts, SCHED), 6),
    "dpm_solver": (lambda ds, x, ts: dpm_solver(ds, x, ts, [3, 1, 2, 2, 1, 3], SCHED), 12),
    "dpm_solver++3m": (lambda ds, x, ts: dpm_solver_pp(ds, x, ts, SCHED, order=3), 6),
    "heun": (lambda ds, x, ts: heun(ds, x, ts, SCHED), 12),
}


@pytest.mark.parametrize("solver", list(RUNS))
def test_model_schedule_lists(solver, gauss):
    run, nfe = RUNS[solver]
    assert nfe_of(solver, 6, orders=[3, 1, 2, 2, 1, 3]) == nfe
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = GaussianDenoiser(MEAN[:1].reshape(1, 1, 1), STD[:1].reshape(1, 1, 1), SCHED)
    ts = timesteps("logsnr_uniform", 6, SCHED)
    single = run(d, x, ts)
    assert torch.equal(run([d] * nfe, x, ts), single)            # same callable per NFE → bit-identical
    counters = [Counting(d) for _ in range(nfe)]
    assert torch.equal(run(counters, x, ts), single)
    assert [c.calls for c in counters] == [1] * nfe                # NFE j used denoisers[j], once
    times = [c.ts[0] for c in counters]
    assert times[0] == pytest.approx(1.0) and all(b <= a for a, b in zip(times, times[1:]))
    # swapping in a different model at one NFE changes the result
    other = GaussianDenoiser(MEAN[:1].reshape(1, 1, 1) + 0.5, STD[:1].reshape(1, 1, 1), SCHED)
    mixed = [d] * nfe
    mixed[nfe // 2] = other
    assert not torch.allclose(run(mixed, x, ts), single)
    with pytest.raises(ValueError, match="expected"):
        run([d] * (nfe + 1), x, ts)


def test_per_nfe_and_argument_errors(gauss, x_T):
    assert per_nfe(gauss, 3) == [gauss] * 3
    with pytest.raises(ValueError, match=r"expected 3, got 2"):
        per_nfe([gauss, gauss], 3)
    ts = timesteps("logsnr_uniform", 4, SCHED)
    with pytest.raises(ValueError, match="one order per step"):
        dpm_solver(gauss, x_T, ts, [1, 2, 3], SCHED)
    with pytest.raises(ValueError, match="orders must be"):
        dpm_solver(gauss, x_T, ts, [1, 2, 3, 4], SCHED)
    with pytest.raises(ValueError, match="noise"):
        ddim(gauss, x_T, ts, SCHED, eta=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(gauss, x_T, ts.flip(0), SCHED)
    with pytest.raises(ValueError):
        nfe_of("rk4", 3)
    with pytest.raises(ValueError, match="one order per step"):
        nfe_of("dpm_solver", 3)
    assert nfe_of(heun, 5) == 10 and nfe_of("dpm_solver", 3, orders=[1, 2, 3]) == 6
    assert nfe_of(dpm_solver_pp, 4) == 4 and nfe_of("dpm_solver++", 4) == 4


def test_lower_order_final_changes_only_short_runs(gauss, x_T):
    short = timesteps("logsnr_uniform", 8, SCHED)
    a = dpm_solver_pp(gauss, x_T, short, SCHED, order=3, lower_order_final=True)
    b = dpm_solver_pp(gauss, x_T, short, SCHED, order=3, lower_order_final=False)
    assert not torch.equal(a, b)
    long = timesteps("logsnr_uniform", 16, SCHED)
    assert torch.equal(dpm_solver_pp(gauss, x_T, long, SCHED, order=3, lower_order_final=True),
                       dpm_solver_pp(gauss, x_T, long, SCHED, order=3, lower_order_final=False))


# ------------------------------------------------------------------------------------------ registry
def test_registry_entries():
    assert sorted(SOLVER_REGISTRY) == ["ddim", "ddim_eta1", "dpm_solver", "dpm_solver++", "dpm_solver++3m", "heun"]
    expected = {"ddim": ((1, 1), False), "ddim_eta1": ((1, 1), False), "dpm_solver": ((1, 3), False),
                "dpm_solver++": ((1, 1), True), "dpm_solver++3m": ((1, 1), True), "heun": ((2, 2), False)}
    for name, spec in SOLVER_REGISTRY.items():
        assert get_solver(name) is spec and spec.name == name and spec.paper
        assert (spec.nfe_per_step, spec.multistep) == expected[name]
        assert spec.default_nfe_per_step == (2 if name == "heun" else 1)
        assert spec.variable_order == (name == "dpm_solver")
        assert spec.stochastic == (name == "ddim_eta1")
    assert SOLVER_REGISTRY["dpm_solver"].uniform_nfe_per_step(3) == 3
    assert SOLVER_REGISTRY["heun"].uniform_nfe_per_step(2) == 2            # its fixed count may be named
    with pytest.raises(SolverError, match="heun takes 2 NFE.*order applies to dpm_solver"):
        SOLVER_REGISTRY["heun"].uniform_nfe_per_step(3)                    # issue 11: never silently ignored


def test_unknown_solver_lists_the_names():
    for bad in ("nope", "dpm_solver_pp", 3, None):
        with pytest.raises(SolverError, match=r"choose one of: ddim, ddim_eta1, dpm_solver, dpm_solver\+\+, "
                                              r"dpm_solver\+\+3m, heun") as e:
            get_solver(bad)
        assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    with pytest.raises(SolverError, match=r"did you mean 'dpm_solver\+\+'"):
        get_solver("dpm_solver_pp")                  # the retired spelling: refused, with a pointer


class Recorder:
    """A denoiser that records the time of every call (all batch entries must share it)."""

    def __init__(self, d):
        self.d, self.ts = d, []

    def __call__(self, x, t):
        assert t.dtype == torch.float32 and (t == t[0]).all()
        self.ts.append(t[0].item())
        return self.d(x, t)


# name → orders of a 4-step grid (None: the solver's default)
TIME_CASES = [("ddim", None), ("dpm_solver", [3, 1, 2, 3]), ("dpm_solver", [2, 2, 2, 2]), ("dpm_solver", None),
              ("dpm_solver++", None), ("dpm_solver++3m", [1, 1, 1, 1]), ("heun", None), ("heun", [2, 2, 2, 2])]


@pytest.mark.parametrize("name, orders", TIME_CASES)
def test_nfe_times_are_the_times_the_solver_evaluates(name, orders, gauss, x_T):
    spec = get_solver(name)
    ts = timesteps("logsnr_uniform", 4, SCHED, t_end=1e-3)
    times = spec.nfe_times(ts, orders, SCHED)
    assert len(times) == sum(spec.step_nfes(4, orders)) == nfe_of(name, 4, orders or [1] * 4)
    rec = Recorder(gauss)
    out = spec.run(rec, x_T, ts, SCHED, orders)
    assert rec.ts == times                                              # exactly, not approximately
    per_nfe_rec = [Recorder(gauss) for _ in times]                     # and NFE j is denoisers[j]
    assert torch.equal(spec.run(per_nfe_rec, x_T, ts, SCHED, orders), out)
    assert [r.ts for r in per_nfe_rec] == [[t] for t in times]


def _lam(t: float) -> float:
    return SCHED.lambda_(torch.tensor(t, dtype=torch.float64)).item()


@pytest.mark.parametrize("name, orders", TIME_CASES)
def test_nfe_times_structure(name, orders):
    spec = get_solver(name)
    ts = snap_times(timesteps("logsnr_uniform", 4, SCHED, t_end=1e-3), SCHED).tolist()
    times = iter(spec.nfe_times(ts, orders, SCHED))
    for i, k in enumerate(spec.step_nfes(4, orders)):
        s, t = ts[i], ts[i + 1]
        step = [next(times) for _ in range(k)]
        assert step[0] == s                                             # every step starts at its start
        if name == "heun":
            assert step == [s, t]                                       # corrector at the step end
        elif name == "dpm_solver":                                      # inner points λ-uniform in the step
            h = _lam(t) - _lam(s)
            for u, r in zip(step[1:], DPM_INNER_R[k]):
                assert s > u > t and (_lam(u) - _lam(s)) / h == pytest.approx(r, abs=1e-5)
                assert u == float(torch.tensor(u, dtype=torch.float32))   # float32-snapped
        else:
            assert k == 1                                               # DDIM / multistep: the step starts only
    assert next(times, None) is None


def test_nfe_times_are_memoised_without_loosening_the_checks():
    from oms_lightning.diffusion.solvers import _nfe_times
    spec = get_solver("dpm_solver")
    ts = timesteps("logsnr_uniform", 4, SCHED, t_end=1e-3)
    _nfe_times.cache_clear()
    first = spec.nfe_times(ts, [3, 1, 2, 1], SCHED)
    # a tensor, a list or numpy floats and an equal schedule object give the same times, from the memo
    again = spec.nfe_times(ts.tolist(), np.array([3, 1, 2, 1]), VPSchedule(**SCHED.to_dict()))
    assert again == first and _nfe_times.cache_info().hits == 1
    assert hash(VPSchedule(**SCHED.to_dict())) == hash(SCHED)
    assert spec.nfe_times(ts, [3, 1, 2, 1], VPSchedule(kind="cosine")) != first   # the schedule is in the key
    with pytest.raises(SolverError, match="got orders"):       # a bool or float order is refused, memo or not
        spec.nfe_times(ts, [True, 1, 2, 1], SCHED)
    with pytest.raises(SolverError, match="got orders"):
        spec.nfe_times(ts, [3.0, 1, 2, 1], SCHED)
    with pytest.raises(ValueError):                              # not a 1-D grid: the unmemoised checks explain
        spec.nfe_times(ts.reshape(1, -1), None, SCHED)


def test_run_checks_the_orders(gauss, x_T):
    ts = timesteps("logsnr_uniform", 3, SCHED)
    with pytest.raises(SolverError, match="heun needs exactly 2 NFEs per step"):
        get_solver("heun").run(gauss, x_T, ts, SCHED, [1, 1, 1])
    with pytest.raises(SolverError, match="dpm_solver allows 1–3 NFEs per step"):
        get_solver("dpm_solver").run(gauss, x_T, ts, SCHED, [1, 4, 1])
    with pytest.raises(SolverError, match="3 steps but 2 orders"):
        get_solver("dpm_solver").nfe_times(ts, [1, 2], SCHED)
    with pytest.raises(SolverError, match="1–3 NFEs per step, got orders \\[0\\]"):
        get_solver("dpm_solver").uniform_nfe_per_step(0)
    # the registry runs the pure functions unchanged
    assert torch.equal(get_solver("dpm_solver").run(gauss, x_T, ts, SCHED, [3, 1, 2]),
                       dpm_solver(gauss, x_T, ts, [3, 1, 2], SCHED))
    assert torch.equal(get_solver("dpm_solver++").run(gauss, x_T, ts, SCHED), dpm_solver_pp(gauss, x_T, ts, SCHED))


# ------------------------------------------------------------------------------------------ (e) batch independence
class TinyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t[:, None, None, None])


@pytest.mark.parametrize("solver", list(RUNS))
def test_sample_does_not_depend_on_batch_size(solver):
    torch.manual_seed(0)
    d = EpsDenoiser(TinyEps().eval(), SCHED)
    run, _ = RUNS[solver]
    ts = timesteps("logsnr_uniform", 6, SCHED)
    with torch.no_grad():
        big = run(d, per_sample_noise((1, 4, 4), range(8), seed=3), ts)
        small = run(d, per_sample_noise((1, 4, 4), range(3), seed=3), ts)
    assert big.dtype == torch.float32
    torch.testing.assert_close(small, big[:3], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ (f) spacing
@pytest.mark.parametrize("kind", SPACINGS)
@pytest.mark.parametrize("n", [1, 5, 20])
def test_spacing_shape_and_ends(kind, n):
    ts = timesteps(kind, n, SCHED)
    assert ts.dtype == torch.float64 and ts.shape == (n + 1,)
    assert (ts[1:] < ts[:-1]).all()
    assert ts[0].item() == 1.0 and ts[-1].item() == default_t_end(n)
    ts = timesteps(kind, n, SCHED, t_start=0.8, t_end=0.01)
    assert ts[0].item() == 0.8 and ts[-1].item() == 0.01
    validate_times(ts, SCHED)


def test_spacing_details():
    assert default_t_end(14) == 1e-3 and default_t_end(15) == 1e-4
    lam = SCHED.lambda_(timesteps("logsnr_uniform", 10, SCHED))
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=torch.float64))
    sig = SCHED.edm_sigma(timesteps("karras", 10, SCHED, rho=7.0)) ** (1 / 7)
    torch.testing.assert_close(sig.diff(), torch.full((10,), (sig[-1] - sig[0]).item() / 10, dtype=torch.float64))
    torch.testing.assert_close(timesteps("time_uniform", 4, SCHED, t_end=0.2),
                               torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="logsnr_uniform"):
        timesteps("bogus", 10, SCHED)


@pytest.mark.parametrize("bad, msg", [
    (torch.ones(2, 2), "1-D"), (torch.tensor([1.0]), "at least 2"), (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([0.5, 0.5]), "strictly decreasing"), (torch.tensor([0.1, 0.5]), "strictly decreasing"),
    (torch.tensor([1.5, 0.5]), r"\[t_min"), (torch.tensor([1.0, 0.0]), r"\[t_min"),
])
def test_validate_times_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        validate_times(bad, SCHED)


def test_explicit_times_accepted(gauss, x_T):
    ts = torch.tensor([1.0, 0.7, 0.3, 0.05, 0.001], dtype=torch.float64)
    out = dpm_solver(gauss, x_T, ts, [2, 2, 3, 1], SCHED)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ (g), (h) seeding
def test_per_sample_noise_independent_of_batch_and_device():
    full = per_sample_noise((2, 3), range(8), seed=7)
    assert full.shape == (8, 2, 3) and full.dtype == torch.float32
    torch.testing.assert_close(per_sample_noise((2, 3), [5, 2, 7], seed=7), full[[5, 2, 7]], rtol=0, atol=0)
    torch.testing.assert_close(per_sample_noise((2, 3), torch.tensor([4]), seed=7), full[4:5], rtol=0, atol=0)
    assert not torch.equal(per_sample_noise((2, 3), range(8), seed=8), full)
    assert not torch.equal(full[0], full[1])
    f64 = per_sample_noise((2, 3), range(8), seed=7, dtype=torch.float64)
    assert f64.dtype == torch.float64 and torch.equal(f64, full.double())
    if torch.cuda.is_available():
        assert torch.equal(per_sample_noise((2, 3), range(8), seed=7, device="cuda").cpu(), full)


def test_stochastic_ddim_reproducible(gauss):
    ts = timesteps("logsnr_uniform", 10, SCHED)
    x = per_sample_noise((3,), range(8), seed=1, dtype=torch.float64)

    def run(idx, seed):
        return ddim(gauss, x[idx], ts, SCHED, eta=1.0, noise=SampleNoise(idx, seed))

    a = run(list(range(8)), 5)
    assert torch.equal(run(list(range(8)), 5), a)
    torch.testing.assert_close(run([0, 1, 2], 5), a[:3], rtol=0, atol=1e-12)
    assert not torch.allclose(run(list(range(8)), 6), a)
    assert not torch.allclose(ddim(gauss, x, ts, SCHED), a)
    noise = SampleNoise(range(2), 0)
    z = torch.zeros(2, 3)
    assert not torch.equal(noise.randn_like(z), noise.randn_like(z))     # each call advances the streams


def test_stochastic_ddim_needs_noise_and_keeps_each_image_whatever_the_batch():
    spec = SOLVER_REGISTRY["ddim_eta1"]
    gauss = GaussianDenoiser(torch.zeros(4), torch.full((4,), 0.5), SCHED)
    ts = torch.linspace(1.0, 1e-3, 6, dtype=torch.float64)
    x = per_sample_noise((4,), range(6), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs `noise`"):
        spec.run(gauss, x, ts, SCHED)
    whole = spec.run(gauss, x, ts, SCHED, noise=SampleNoise(range(6), seed=3))
    halves = torch.cat([spec.run(gauss, x[:2], ts, SCHED, noise=SampleNoise(range(2), seed=3)),
                        spec.run(gauss, x[2:], ts, SCHED, noise=SampleNoise(range(2, 6), seed=3))])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, spec.run(gauss, x, ts, SCHED, noise=SampleNoise(range(6), seed=4)))


def test_stochastic_ddim_variance_follows_its_analytic_recursion_on_gaussian_data():
    """For N(0, c²) data the exact denoiser is linear, D = g·x with g = αc²/(α²c² + σ²), so one DDIM(η) step is
    x' = k·x + c_η·z with k = α'g + sqrt(σ'² − c_η²)(1 − αg)/σ (DDIM eq. 12): Var x' = k² Var x + c_η². The
    samples' variance must follow that recursion (it is not the true marginal: the step plugs in the posterior
    mean of x0 and drops its variance, so few steps lose variance)."""
    c = 0.5
    gauss = GaussianDenoiser(torch.zeros(1), torch.full((1,), c), SCHED)
    ts = snap_times(torch.linspace(1.0, 1e-3, 4, dtype=torch.float64), SCHED).tolist()
    ab = lambda t: (SCHED.alpha(torch.tensor(t)).item(), SCHED.sigma(torch.tensor(t)).item())  # noqa: E731
    a, s = ab(ts[0])
    var = a**2 * c**2 + s**2  # x_T from the exact marginal at t = 1
    x_T = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(var)
    for t, t_next in zip(ts[:-1], ts[1:]):
        (a, s), (a_n, s_n) = ab(t), ab(t_next)
        g = a * c**2 / (a**2 * c**2 + s**2)
        c_eta = s_n / s * math.sqrt(1 - (a / a_n) ** 2)
        k = a_n * g + math.sqrt(s_n**2 - c_eta**2) * (1 - a * g) / s
        var = k**2 * var + c_eta**2
    gen = torch.Generator().manual_seed(1)
    out = SOLVER_REGISTRY["ddim_eta1"].run(gauss, x_T, torch.tensor(ts, dtype=torch.float64), SCHED,
                                           noise=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    assert out.var().item() == pytest.approx(var, rel=0.03)
