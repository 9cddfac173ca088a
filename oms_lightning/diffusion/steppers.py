"""The solvers' mathematics, one `Stepper` per family: DDIM, singlestep DPM-Solver, multistep DPM-Solver++, EDM Heun.

A stepper takes its solver's steps one at a time: `step(state)` → (update, features), the plain update of the next
step and its IIA correction features (see IIA_FEATURE_SETS). `solvers.integrate` is the one loop that drives any
stepper over the schedule's times; `solvers.py` also holds the public solver functions and the registry, and
re-exports everything here, so callers import from `oms_lightning.diffusion.solvers`.

Numerics: coefficients are computed as python floats from float64 schedule evaluations. Times are snapped to
float32 (the dtype the networks receive), and coefficients are computed from the snapped values, so the network
always sees exactly the time the update formula assumes. Notation: h = λ_t − λ_s (half-logSNR step).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .denoiser import eps_from_x0
from .noise_schedule import VPSchedule
from .spacing import validate_times


class SolverError(UserError, ValueError):
    """An unknown solver name or NFEs per step the solver cannot make (a ValueError too, like the solvers' own)."""


# ----------------------------------------------------------------------------------------------- helpers
def per_nfe(denoisers, nfe: int) -> list:
    """One denoiser per NFE: a single callable is repeated; a sequence must have exactly `nfe` entries."""
    if callable(denoisers):
        return [denoisers] * nfe
    denoisers = list(denoisers)
    if len(denoisers) != nfe:
        raise ValueError(f"model schedule has {len(denoisers)} denoisers but the solver makes {nfe} NFEs "
                         f"(expected {nfe}, got {len(denoisers)})")
    return denoisers


def snap_times(ts, noise_schedule: VPSchedule) -> Tensor:
    """Validate, then round to float32-representable values (what the network receives), as float64.

    Times are host-side scalars (coefficients are python floats), so a grid handed over on a GPU is brought to
    the CPU first."""
    # a python list must not become float32 before validation: 1e-4 would round below t_min = 1e-4
    ts = ts if isinstance(ts, Tensor) else torch.tensor(ts, dtype=torch.float64)
    t32 = validate_times(ts.cpu(), noise_schedule).to(torch.float32)
    low = t32.double() < noise_schedule.t_min                    # e.g. t_min = 1e-4 rounds just below itself
    t32[low] = torch.nextafter(t32[low], torch.tensor(1.0))
    return validate_times(t32.to(torch.float64), noise_schedule)


def _snap(t: float) -> float:
    return float(torch.tensor(t, dtype=torch.float32))


def _coeffs(noise_schedule: VPSchedule, t: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) as python floats, evaluated in float64."""
    tt = torch.tensor(t, dtype=torch.float64)
    return noise_schedule.alpha(tt).item(), noise_schedule.sigma(tt).item(), noise_schedule.lambda_(tt).item()


def _t_of_lambda(noise_schedule: VPSchedule, lam: float) -> float:
    return _snap(noise_schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64)).item())


# Singlestep DPM-Solver's intermediate points as fractions r of the step in λ (Lu et al. 2022, Algorithms 1-2):
# order 2 uses r1 = 1/2, order 3 uses r1 = 1/3, r2 = 2/3.
DPM_INNER_R: dict[int, tuple[float, ...]] = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def dpm_inner_times(noise_schedule: VPSchedule, s: float, t: float, order: int) -> list[float]:
    """The snapped times at λ_s + r·h of a singlestep DPM-Solver step s → t (r from DPM_INNER_R[order]).

    DPMSolverStepper evaluates exactly these times, and `SolverSpec.nfe_times` reports them."""
    return list(_dpm_inner_times(noise_schedule, float(s), float(t), order))


@functools.lru_cache(maxsize=1 << 16)  # memoised like _nfe_times: the search's grids share their steps
def _dpm_inner_times(noise_schedule: VPSchedule, s: float, t: float, order: int) -> tuple[float, ...]:
    _, _, l_s = _coeffs(noise_schedule, s)
    _, _, l_t = _coeffs(noise_schedule, t)
    h = l_t - l_s
    return tuple(_t_of_lambda(noise_schedule, l_s + r * h) for r in DPM_INNER_R[order])


def _call(denoiser, x: Tensor, t: float) -> Tensor:
    """D(x, t) with t as a (B,) float32 tensor on x.device."""
    return denoiser(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))


def _eps(denoiser, x: Tensor, t: float, noise_schedule: VPSchedule) -> Tensor:
    """ε̂ from the data prediction: ε = (x − α_t D)/σ_t."""
    a, s, _ = _coeffs(noise_schedule, t)
    return eps_from_x0(x, _call(denoiser, x, t), a, s)


def _randn_like(noise, x: Tensor) -> Tensor:
    if noise is None:
        raise ValueError("stochastic DDIM (eta > 0) needs `noise` (a SampleNoise or a randn_like callable)")
    return noise.randn_like(x) if hasattr(noise, "randn_like") else noise(x)


# ----------------------------------------------------------------------------------------------- IIA features
# IIA (Zhang, Kenta, Kleijn, ICLR 2024, §3) corrects step i as x_{i+1} = update_i + Σ_k c_{i,k} f_{i,k}, where the
# features f are the step's gradient terms and differences of consecutive denoiser outputs. A feature set names the
# features a step exposes, in coefficient order. Every feature is a term of the step's own update, or a difference
# scaled by the coefficient of the term it differences, so c = 0.1 means "10% more of that term": coefficients are
# O(1) and comparable across steps (the fit also normalises the features, see iia.fit_step).
#   eps        −σ_t (e^h − 1) ε_i                 the ε term of DDIM = DPM-Solver-1, x_t = α_t/α_s x − σ_t(e^h − 1) ε
#   eps_diff   −σ_t (e^h − 1) (ε_i − ε_{i−1})     its difference with the previous step's ε (as in multistep ε solvers)
#   x0_diff    α_t (1 − e^{−h}) (D_i − D_{i−1})   D difference, scaled by the x0 coefficient J_0 = 1 − e^{−h} of the
#                                                exponential integrator x_t = σ_t/σ_s x + α_t J_0 D (DPM-Solver++);
#                                                Heun: (1 − σ̃'/σ̃)(D_i − D_{i−1}) in x̃ space, the same J_0, with
#                                                D_i the step's predictor output (the in-step one is `corrector`)
#   euler      (σ̃' − σ̃) d                        EDM Heun's Euler (predictor) term, d = (x̃ − D)/σ̃, in x̃ = x/α
#   corrector  (σ̃' − σ̃) (d' − d)/2              its trapezoidal corrector term: update = x̃ + euler + corrector. It
#                                                is the step's own D difference, −(σ̃' − σ̃)/(2σ̃') (D' − D), exactly
# Differences with the previous step are zero at the first step (no previous output): their coefficient fits to 0.
# `full` is every feature of a one-NFE step: the most accurate sampler on Gaussian data (tests/test_iia.py). After a
# plain DDIM step ε_1 − ε_0 = −(α_1/σ_1)(D_1 − D_0), which makes eps_diff = x0_diff exactly, so `full` is singular
# at step 1 of DDIM and DPM-Solver++ (whose first step is DDIM) and the fit falls back to a ridge there (warning).
# `eps` is the one coefficient per step the authors fit for Stable Diffusion's IIA-DDIM. (A rescaled x0 term
# α_t J_0 D_i was tried on Gaussian data and gained nothing over x0_diff.)
IIA_FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "eps": ("eps",),
    "eps_diff": ("eps_diff",),
    "x0_diff": ("x0_diff",),
    "full": ("eps", "eps_diff", "x0_diff"),
    "edm": ("euler", "corrector", "x0_diff"),
}


def corrected(update: Tensor, features: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """IIA's corrected step update + Σ_k c_k f_k: the one line every solver shares (Zhang et al. 2024, §3).

    Zero coefficients are skipped, so all-zero coefficients return the plain update itself, bit for bit."""
    for c, f in zip(coefficients, features, strict=True):
        if c != 0.0:
            update = update + c * f
    return update


def _difference(new: Tensor, old: Tensor | None, scale: float) -> Tensor:
    """scale·(new − old); zeros at the first step, which has no previous output."""
    return torch.zeros_like(new) if old is None else scale * (new - old)


class _StartOutputs:
    """IIA features of a step with one NFE, at its start (DDIM, multistep DPM-Solver++): the step's ε term and the
    differences of its ε and x0 with the previous step's (see IIA_FEATURE_SETS for the scaling)."""

    def __init__(self):
        self.x0 = self.eps = None                            # the previous step's outputs

    def features(self, stepper: "Stepper", x: Tensor, x0: Tensor, s: float, t: float) -> list[Tensor]:
        if not stepper.features:
            return []
        a_s, sig_s, l_s = _coeffs(stepper.noise_schedule, s)
        a_t, sig_t, l_t = _coeffs(stepper.noise_schedule, t)
        h = l_t - l_s
        # the x0 coefficient of x_t = σ_t/σ_s x + α_t(1 − e^{−h}) x0 and the ε one of x_t = α_t/α_s x − σ_t(e^h − 1) ε
        x0_scale, eps_scale = a_t * -math.expm1(-h), -sig_t * math.expm1(h)
        eps = eps_from_x0(x, x0, a_s, sig_s) if {"eps", "eps_diff"} & set(stepper.features) else None
        features = stepper._pick({"x0_diff": lambda: _difference(x0, self.x0, x0_scale),
                                  "eps": lambda: eps_scale * eps,
                                  "eps_diff": lambda: _difference(eps, self.eps, eps_scale)})
        self.x0, self.eps = x0, eps
        return features


# ----------------------------------------------------------------------------------------------- the stepper
class Stepper:
    """One solver's steps taken one at a time: `step(state)` → (update, features), the plain update of the next step
    and its IIA features (a list of tensors shaped like the state; empty without a feature set).

    The state is x itself, except for EDM Heun, which integrates x̃ = x/α: `to_state(x)` enters the state space at
    ts[0] and `to_x(state, i)` leaves it at ts[i] (both linear). Steps must be taken in order, because multistep
    solvers (and the IIA differences) keep the previous denoiser outputs, evaluated on whatever states were passed.
    ds: one denoiser per NFE; ts: snapped times as floats; nfes: NFEs of each step; features: feature names;
    noise: the per-sample noise of a stochastic stepper (a SampleNoise or a randn_like callable; the ODE steppers
    ignore it). Every family takes these arguments in this order, so the registry can build any of them alike.
    """

    def __init__(self, ds: Sequence, ts: Sequence[float], noise_schedule: VPSchedule, nfes: Sequence[int],
                 features: Sequence[str] = (), noise=None):
        self.ds, self.ts, self.noise_schedule, self.nfes = list(ds), list(ts), noise_schedule, list(nfes)
        self.features, self.noise = tuple(features), noise
        self.first_nfe = [sum(self.nfes[:i]) for i in range(len(self.nfes))]
        self.i = 0                                           # the next step to take

    @property
    def n_steps(self) -> int:
        return len(self.nfes)

    def step_denoisers(self, i: int) -> list:
        """The denoisers of step i's NFEs, in NFE order."""
        return self.ds[self.first_nfe[i]:self.first_nfe[i] + self.nfes[i]]

    def to_state(self, x: Tensor) -> Tensor:
        return x

    def to_x(self, state: Tensor, i: int) -> Tensor:
        return state

    def step(self, state: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.i >= self.n_steps:
            raise SolverError(f"all {self.n_steps} steps are taken; a new run needs a new stepper")
        i, self.i = self.i, self.i + 1
        return self._step(i, self.step_denoisers(i), state)

    def _step(self, i: int, ds: list, state: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def _pick(self, available: dict[str, Callable[[], Tensor]]) -> list[Tensor]:
        """The requested features, in order, computing only those."""
        return [available[name]() for name in self.features]


# ----------------------------------------------------------------------------------------------- DDIM
class DDIMStepper(Stepper):
    """DDIM steps (Song et al. 2021, eq. 12 and 16) with stochasticity η (eta = 0: deterministic, = DPM-Solver-1).
    Features (η = 0 only): eps, eps_diff, x0_diff (_StartOutputs)."""

    def __init__(self, ds, ts, schedule, nfes, features=(), noise=None, eta: float = 0.0):
        super().__init__(ds, ts, schedule, nfes, features, noise)
        self.eta = eta
        self.outputs = _StartOutputs()

    def _step(self, i, ds, x):
        t, t_next = self.ts[i], self.ts[i + 1]
        a, s, _ = _coeffs(self.noise_schedule, t)
        a_n, s_n, _ = _coeffs(self.noise_schedule, t_next)
        x0 = _call(ds[0], x, t)                              # x̂0 = D(x_t, t): eq. 12's "predicted x0"
        eps = eps_from_x0(x, x0, a, s)                       # ε̂ = (x_t − α x̂0)/σ
        # eq. 16 in our notation (DDIM's α is our α²): c = σ_t(η) = η · σ'/σ · sqrt(1 − α²/α'²)
        c = self.eta * s_n / s * math.sqrt(max(0.0, 1.0 - (a / a_n) ** 2))
        # eq. 12: α' x̂0 + sqrt(σ'² − c²) ε̂ ("direction pointing to x_t") ...
        update = a_n * x0 + math.sqrt(max(0.0, s_n**2 - c**2)) * eps
        if c > 0:
            update = update + c * _randn_like(self.noise, update)   # ... + c z, fresh noise z (η > 0 only)
        return update, self.outputs.features(self, x, x0, t, t_next)


# ----------------------------------------------------------------------------------------------- DPM-Solver
class DPMSolverStepper(Stepper):
    """Singlestep DPM-Solver steps (Lu et al. 2022) in ε form, step i of order nfes[i] ∈ {1, 2, 3}; inner points
    at λ_s + r·h (DPM_INNER_R). No IIA features yet (its registry entry offers none)."""

    def _step(self, i, ds, x):
        step = {1: self._order_1, 2: self._order_2, 3: self._order_3}[self.nfes[i]]
        return step(ds, x, self.ts[i], self.ts[i + 1]), self._pick({})

    def _order_1(self, ds, x, s, t):
        """DPM-Solver-1 (Lu et al. 2022, eq. 3.7) = DDIM: x_t = α_t/α_s x − σ_t (e^h − 1) ε_s."""
        a_s, _, l_s = _coeffs(self.noise_schedule, s)
        a_t, s_t, l_t = _coeffs(self.noise_schedule, t)
        eps_s = _eps(ds[0], x, s, self.noise_schedule)
        return a_t / a_s * x - s_t * math.expm1(l_t - l_s) * eps_s

    def _order_2(self, ds, x, s, t):
        """DPM-Solver-2 (Lu et al. 2022, Algorithm 1), intermediate point λ_s + r1·h (r1 = 1/2)."""
        a_s, _, l_s = _coeffs(self.noise_schedule, s)
        a_t, s_t, l_t = _coeffs(self.noise_schedule, t)
        h = l_t - l_s
        (s1,) = dpm_inner_times(self.noise_schedule, s, t, 2)
        a_1, s_1, l_1 = _coeffs(self.noise_schedule, s1)
        r1 = (l_1 - l_s) / h                                 # the r1 of the snapped time
        eps_s = _eps(ds[0], x, s, self.noise_schedule)
        # Alg. 1: u1 = α_s1/α_s x − σ_s1 (e^{r1 h} − 1) ε_s, a DPM-Solver-1 step to s1
        u1 = a_1 / a_s * x - s_1 * math.expm1(r1 * h) * eps_s
        eps_1 = _eps(ds[1], u1, s1, self.noise_schedule)
        # Alg. 1: x_t = α_t/α_s x − σ_t (e^h − 1) ε_s − σ_t/(2 r1) (e^h − 1)(ε_s1 − ε_s)
        return a_t / a_s * x - s_t * math.expm1(h) * eps_s - s_t / (2 * r1) * math.expm1(h) * (eps_1 - eps_s)

    def _order_3(self, ds, x, s, t):
        """DPM-Solver-3 (Lu et al. 2022, Algorithm 2), intermediate points λ_s + r1·h and λ_s + r2·h (1/3, 2/3)."""
        a_s, _, l_s = _coeffs(self.noise_schedule, s)
        a_t, s_t, l_t = _coeffs(self.noise_schedule, t)
        h = l_t - l_s
        s1, s2 = dpm_inner_times(self.noise_schedule, s, t, 3)
        a_1, s_1, l_1 = _coeffs(self.noise_schedule, s1)
        a_2, s_2, l_2 = _coeffs(self.noise_schedule, s2)
        r1, r2 = (l_1 - l_s) / h, (l_2 - l_s) / h           # the r's of the snapped times
        eps_s = _eps(ds[0], x, s, self.noise_schedule)
        # Alg. 2: u1 = α_s1/α_s x − σ_s1 (e^{r1 h} − 1) ε_s, and D1 = ε(u1, s1) − ε_s
        u1 = a_1 / a_s * x - s_1 * math.expm1(r1 * h) * eps_s
        d1 = _eps(ds[1], u1, s1, self.noise_schedule) - eps_s
        # Alg. 2: u2 = α_s2/α_s x − σ_s2 (e^{r2 h} − 1) ε_s − σ_s2 r2/r1 ((e^{r2 h} − 1)/(r2 h) − 1) D1
        u2 = (a_2 / a_s * x - s_2 * math.expm1(r2 * h) * eps_s
              - s_2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
        d2 = _eps(ds[2], u2, s2, self.noise_schedule) - eps_s
        # Alg. 2: x_t = α_t/α_s x − σ_t (e^h − 1) ε_s − σ_t/r2 ((e^h − 1)/h − 1) D2,  D2 = ε(u2, s2) − ε_s
        return a_t / a_s * x - s_t * math.expm1(h) * eps_s - s_t / r2 * (math.expm1(h) / h - 1) * d2


# ----------------------------------------------------------------------------------------------- DPM-Solver++
def _phi_integrals(h: float) -> tuple[float, float, float]:
    """J_k = ∫_0^h u^k e^{u−h} du for k = 0, 1, 2 (J_k = h^k − k J_{k−1}, by parts)."""
    j0 = -math.expm1(-h)
    j1 = h - j0
    return j0, j1, h * h - 2 * j1


class DPMSolverPPStepper(Stepper):
    """Multistep DPM-Solver++ 2M / 3M steps (Lu et al. 2022b, Algorithm 2 and its 3rd-order extension), x0 form:
    x_t = σ_t/σ_s x_s + α_t (J_0 m_0 + J_1 m'_0 + J_2 m''_0 / 2), the last `order` denoiser outputs' Newton
    polynomial in λ integrated exactly. Lower order while the history is short, and with lower_order_final and
    < 15 steps in the last steps too. Features: eps, eps_diff, x0_diff (_StartOutputs)."""

    def __init__(self, ds, ts, schedule, nfes, features=(), noise=None, order: int = 2,
                 lower_order_final: bool = True):
        super().__init__(ds, ts, schedule, nfes, features, noise)
        self.order, self.lower_order_final = order, lower_order_final
        self.hist: list[tuple[float, Tensor]] = []          # (λ, x0) of the last evaluations, newest last
        self.outputs = _StartOutputs()

    def _step(self, i, ds, x):
        n = self.n_steps
        s, t = self.ts[i], self.ts[i + 1]
        _, sig_s, l_s = _coeffs(self.noise_schedule, s)
        a_t, sig_t, l_t = _coeffs(self.noise_schedule, t)
        hist = self.hist = (self.hist + [(l_s, _call(ds[0], x, s))])[-3:]
        # the order this step can take: no more outputs than are stored, fewer at the end of a short run
        k = min(self.order, i + 1, n - i) if self.lower_order_final and n < 15 else min(self.order, i + 1)
        j0, j1, j2 = _phi_integrals(l_t - l_s)
        m0 = hist[-1][1]
        update = j0 * m0                                     # order 1: J_0 m_0 (= DDIM)
        if k >= 2:
            h0 = l_s - hist[-2][0]
            d01 = (m0 - hist[-2][1]) / h0                     # first divided difference ≈ m'_0
            if k == 3:
                h1 = hist[-2][0] - hist[-3][0]
                d12 = (hist[-2][1] - hist[-3][1]) / h1
                d012 = (d01 - d12) / (h0 + h1)               # second divided difference ≈ m''_0 / 2
                # the Newton polynomial's slope at λ_s is d01 + h0·d012, its curvature term d012
                update = update + j1 * (d01 + h0 * d012) + j2 * d012
            else:
                update = update + j1 * d01                   # 2M (Algorithm 2): + J_1 m'_0
        # the data-prediction exponential integrator: x_t = σ_t/σ_s x_s + α_t ∫ e^{λ−λ_t} x0(λ) dλ
        return sig_t / sig_s * x + a_t * update, self.outputs.features(self, x, m0, s, t)


# ----------------------------------------------------------------------------------------------- EDM Heun
class HeunStepper(Stepper):
    """EDM's deterministic Heun steps (Karras et al. 2022, Algorithm 1) in x̃ = x/α, σ̃ = σ/α = e^{−λ}, which
    solves dx̃/dσ̃ = (x̃ − D(α x̃, t))/σ̃. Our last time is t_end > 0 (σ̃ > 0), so every step is a full Heun step:
    NFE 2i is the Euler predictor of step i, 2i+1 its corrector. Features: euler, corrector, x0_diff."""

    def __init__(self, ds, ts, schedule, nfes, features=(), noise=None):
        super().__init__(ds, ts, schedule, nfes, features, noise)
        self.prev_x0 = None

    def _alpha(self, i: int) -> float:
        return _coeffs(self.noise_schedule, self.ts[i])[0]

    def to_state(self, x):
        return x / self._alpha(0)

    def to_x(self, state, i):
        return self._alpha(i) * state

    def _step(self, i, ds, xt):
        t, t_next = self.ts[i], self.ts[i + 1]
        a, _, l_ = _coeffs(self.noise_schedule, t)
        a_n, _, l_n = _coeffs(self.noise_schedule, t_next)
        sig, sig_n = math.exp(-l_), math.exp(-l_n)
        x0 = _call(ds[0], a * xt, t)
        d = (xt - x0) / sig                                  # Alg. 1 line 4: d = (x̃ − D(x̃; σ̃))/σ̃
        x_pred = xt + (sig_n - sig) * d                      # line 5: Euler predictor
        d_n = (x_pred - _call(ds[1], a_n * x_pred, t_next)) / sig_n   # line 7: d' at the predicted point
        update = xt + (sig_n - sig) * 0.5 * (d + d_n)        # line 8: trapezoidal corrector
        features = self._pick({"euler": lambda: (sig_n - sig) * d,
                               "corrector": lambda: (sig_n - sig) * 0.5 * (d_n - d),
                               "x0_diff": lambda: _difference(x0, self.prev_x0, -math.expm1(l_ - l_n))})
        self.prev_x0 = x0
        return update, features
