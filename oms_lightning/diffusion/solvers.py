"""Probability-flow ODE solvers (and stochastic DDIM) for VP diffusion, written as plain functions.

Every solver takes
  denoisers: one callable D(x, t) → x0 (data prediction), or a sequence with one callable per network
             evaluation (NFE) — the *model schedule* of OMS-DPM: NFE j uses denoisers[j];
  x:         the starting state x_{ts[0]} (its dtype is kept throughout);
  ts:        1-D tensor of times from noisy to clean (steps + 1 entries), see spacing.py;
  schedule:  the VPSchedule.
and returns the final state x_{ts[-1]} (not clamped).

Numerics: coefficients are computed as python floats from float64 schedule evaluations. Times are snapped to
float32 (the dtype the networks receive), and coefficients are computed from the snapped values, so the network
always sees exactly the time the update formula assumes. Notation: h = λ_t − λ_s (half-logSNR step).

`SOLVER_REGISTRY` (end of this file) is the one place that knows the solvers by name: how to run each over a model
schedule, how many NFEs a step may have, and at which times the NFEs evaluate. Adding a solver = one entry there.

Each solver is written once, as a `Stepper` (its steps one at a time, returning the plain update and the step's IIA
correction features, see IIA_FEATURE_SETS); the solver function integrates with it. IIA coefficients (fitted by
`oms_lightning.diffusion.iia`) enter through `corrected`, the one correction line all solvers share, via
`SolverSpec.run(..., coefficients=, feature_set=)`.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .denoiser import eps_from_x0
from .noise_schedule import VPSchedule
from .spacing import validate_times

Denoiser = Callable[[Tensor, Tensor], Tensor]


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


def snap_times(ts, schedule: VPSchedule) -> Tensor:
    """Validate, then round to float32-representable values (what the network receives), as float64.

    Times are host-side scalars (coefficients are python floats), so a grid handed over on a GPU is brought to
    the CPU first."""
    # a python list must not become float32 before validation: 1e-4 would round below t_min = 1e-4
    ts = ts if isinstance(ts, Tensor) else torch.tensor(ts, dtype=torch.float64)
    t32 = validate_times(ts.cpu(), schedule).to(torch.float32)
    low = t32.double() < schedule.t_min                    # e.g. t_min = 1e-4 rounds just below itself
    t32[low] = torch.nextafter(t32[low], torch.tensor(1.0))
    return validate_times(t32.to(torch.float64), schedule)


def _snap(t: float) -> float:
    return float(torch.tensor(t, dtype=torch.float32))


def _coeffs(schedule: VPSchedule, t: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) as python floats, evaluated in float64."""
    tt = torch.tensor(t, dtype=torch.float64)
    return schedule.alpha(tt).item(), schedule.sigma(tt).item(), schedule.lambda_(tt).item()


def _t_of_lambda(schedule: VPSchedule, lam: float) -> float:
    return _snap(schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64)).item())


# Singlestep DPM-Solver's intermediate points as fractions r of the step in λ (Lu et al. 2022, Algorithms 1-2):
# order 2 uses r1 = 1/2, order 3 uses r1 = 1/3, r2 = 2/3.
DPM_INNER_R: dict[int, tuple[float, ...]] = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def dpm_inner_times(schedule: VPSchedule, s: float, t: float, order: int) -> list[float]:
    """The snapped times at λ_s + r·h of a singlestep DPM-Solver step s → t (r from DPM_INNER_R[order]).

    The step functions evaluate exactly these times, and `SolverSpec.nfe_times` reports them."""
    return list(_dpm_inner_times(schedule, float(s), float(t), order))


@functools.lru_cache(maxsize=1 << 16)  # memoised like _nfe_times: the search's grids share their steps
def _dpm_inner_times(schedule: VPSchedule, s: float, t: float, order: int) -> tuple[float, ...]:
    _, _, l_s = _coeffs(schedule, s)
    _, _, l_t = _coeffs(schedule, t)
    h = l_t - l_s
    return tuple(_t_of_lambda(schedule, l_s + r * h) for r in DPM_INNER_R[order])


def _call(denoiser, x: Tensor, t: float) -> Tensor:
    """D(x, t) with t as a (B,) float32 tensor on x.device."""
    return denoiser(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))


def _eps(denoiser, x: Tensor, t: float, schedule: VPSchedule) -> Tensor:
    """ε̂ from the data prediction: ε = (x − α_t D)/σ_t."""
    a, s, _ = _coeffs(schedule, t)
    return eps_from_x0(x, _call(denoiser, x, t), a, s)


def _randn_like(noise, x: Tensor) -> Tensor:
    if noise is None:
        raise ValueError("stochastic DDIM (eta > 0) needs `noise` (a SampleNoise or a randn_like callable)")
    return noise.randn_like(x) if hasattr(noise, "randn_like") else noise(x)


# ----------------------------------------------------------------------------------------------- steppers, IIA
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
        a_s, sig_s, l_s = _coeffs(stepper.schedule, s)
        a_t, sig_t, l_t = _coeffs(stepper.schedule, t)
        h = l_t - l_s
        # the x0 coefficient of x_t = σ_t/σ_s x + α_t(1 − e^{−h}) x0 and the ε one of x_t = α_t/α_s x − σ_t(e^h − 1) ε
        x0_scale, eps_scale = a_t * -math.expm1(-h), -sig_t * math.expm1(h)
        eps = eps_from_x0(x, x0, a_s, sig_s) if {"eps", "eps_diff"} & set(stepper.features) else None
        features = stepper._pick({"x0_diff": lambda: _difference(x0, self.x0, x0_scale),
                                  "eps": lambda: eps_scale * eps,
                                  "eps_diff": lambda: _difference(eps, self.eps, eps_scale)})
        self.x0, self.eps = x0, eps
        return features


class Stepper:
    """One solver's steps taken one at a time: `step(state)` → (update, features), the plain update of the next step
    and its IIA features (a list of tensors shaped like the state; empty without a feature set).

    The state is x itself, except for EDM Heun, which integrates x̃ = x/α: `to_state(x)` enters the state space at
    ts[0] and `to_x(state, i)` leaves it at ts[i] (both linear). Steps must be taken in order, because multistep
    solvers (and the IIA differences) keep the previous denoiser outputs, evaluated on whatever states were passed.
    ds: one denoiser per NFE; ts: snapped times as floats; nfes: NFEs of each step; features: feature names.
    """

    def __init__(self, ds: Sequence, ts: Sequence[float], schedule: VPSchedule, nfes: Sequence[int],
                 features: Sequence[str] = ()):
        self.ds, self.ts, self.schedule, self.nfes = list(ds), list(ts), schedule, list(nfes)
        self.features = tuple(features)
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

    def integrate(self, x: Tensor, coefficients: Sequence[Sequence[float]] | None = None) -> Tensor:
        """All steps from x at ts[0]; with (checked) per-step coefficients, each step is IIA-corrected."""
        state = self.to_state(x)
        for i in range(self.n_steps):
            update, features = self.step(state)
            state = update if coefficients is None else corrected(update, features, coefficients[i])
        return self.to_x(state, self.n_steps)


# ----------------------------------------------------------------------------------------------- DDIM
class DDIMStepper(Stepper):
    """DDIM steps (Song et al. 2021, eq. 12 and 16): x_{t'} = α' x̂0 + sqrt(σ'² − c²) ε̂ + c z,
    c = η · σ'/σ · sqrt(1 − α²/α'²). Features (η = 0 only): eps, eps_diff, x0_diff (_StartOutputs)."""

    def __init__(self, ds, ts, schedule, nfes, features=(), eta: float = 0.0, noise=None):
        super().__init__(ds, ts, schedule, nfes, features)
        self.eta, self.noise = eta, noise
        self.outputs = _StartOutputs()

    def _step(self, i, ds, x):
        t, t_next = self.ts[i], self.ts[i + 1]
        a, s, _ = _coeffs(self.schedule, t)
        a_n, s_n, _ = _coeffs(self.schedule, t_next)
        x0 = _call(ds[0], x, t)
        eps = eps_from_x0(x, x0, a, s)
        c = self.eta * s_n / s * math.sqrt(max(0.0, 1.0 - (a / a_n) ** 2))
        update = a_n * x0 + math.sqrt(max(0.0, s_n**2 - c**2)) * eps
        if c > 0:
            update = update + c * _randn_like(self.noise, update)
        return update, self.outputs.features(self, x, x0, t, t_next)


def ddim(denoisers, x: Tensor, ts, schedule: VPSchedule, eta: float = 0.0, noise=None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16); eta = 0 is deterministic (= DPM-Solver-1), NFE = steps.

    x_{t'} = α' x̂0 + sqrt(σ'² − c²) ε̂ + c z,  c = η · σ'/σ · sqrt(1 − α²/α'²).
    """
    ts = snap_times(ts, schedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        _randn_like(noise, x)
    n = len(ts) - 1
    return DDIMStepper(per_nfe(denoisers, n), ts.tolist(), schedule, [1] * n, eta=eta, noise=noise).integrate(x)


# ----------------------------------------------------------------------------------------------- DPM-Solver
def _dpm_step_1(ds, x, s, t, schedule):
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7): x_t = α_t/α_s x − σ_t (e^h − 1) ε_s."""
    a_s, _, l_s = _coeffs(schedule, s)
    a_t, s_t, l_t = _coeffs(schedule, t)
    eps_s = _eps(ds[0], x, s, schedule)
    return a_t / a_s * x - s_t * math.expm1(l_t - l_s) * eps_s


def _dpm_step_2(ds, x, s, t, schedule):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1), intermediate point λ_s + r1·h (r1 = 1/2)."""
    a_s, _, l_s = _coeffs(schedule, s)
    a_t, s_t, l_t = _coeffs(schedule, t)
    h = l_t - l_s
    (s1,) = dpm_inner_times(schedule, s, t, 2)
    a_1, s_1, l_1 = _coeffs(schedule, s1)
    r1 = (l_1 - l_s) / h                                     # the r1 of the snapped time
    eps_s = _eps(ds[0], x, s, schedule)
    u1 = a_1 / a_s * x - s_1 * math.expm1(r1 * h) * eps_s
    eps_1 = _eps(ds[1], u1, s1, schedule)
    return a_t / a_s * x - s_t * math.expm1(h) * eps_s - s_t / (2 * r1) * math.expm1(h) * (eps_1 - eps_s)


def _dpm_step_3(ds, x, s, t, schedule):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2), intermediate points λ_s + r1·h and λ_s + r2·h (1/3, 2/3)."""
    a_s, _, l_s = _coeffs(schedule, s)
    a_t, s_t, l_t = _coeffs(schedule, t)
    h = l_t - l_s
    s1, s2 = dpm_inner_times(schedule, s, t, 3)
    a_1, s_1, l_1 = _coeffs(schedule, s1)
    a_2, s_2, l_2 = _coeffs(schedule, s2)
    r1, r2 = (l_1 - l_s) / h, (l_2 - l_s) / h               # the r's of the snapped times
    eps_s = _eps(ds[0], x, s, schedule)
    u1 = a_1 / a_s * x - s_1 * math.expm1(r1 * h) * eps_s
    d1 = _eps(ds[1], u1, s1, schedule) - eps_s
    u2 = (a_2 / a_s * x - s_2 * math.expm1(r2 * h) * eps_s
          - s_2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
    d2 = _eps(ds[2], u2, s2, schedule) - eps_s
    return a_t / a_s * x - s_t * math.expm1(h) * eps_s - s_t / r2 * (math.expm1(h) / h - 1) * d2


_DPM_STEPS = {1: _dpm_step_1, 2: _dpm_step_2, 3: _dpm_step_3}


class DPMSolverStepper(Stepper):
    """Singlestep DPM-Solver steps of order nfes[i]. No IIA features yet (its registry entry offers none)."""

    def _step(self, i, ds, x):
        return _DPM_STEPS[self.nfes[i]](ds, x, self.ts[i], self.ts[i + 1], self.schedule), self._pick({})


def dpm_solver(denoisers, x: Tensor, ts, orders: Sequence[int], schedule: VPSchedule) -> Tensor:
    """Singlestep DPM-Solver (Lu et al. 2022) in ε form; step i has order orders[i] ∈ {1, 2, 3}.

    NFE = sum(orders); NFE j uses denoisers[j] (OMS-DPM's search space). Inner points are λ-uniform in the step.
    """
    ts = snap_times(ts, schedule)
    orders = [int(o) for o in orders]
    if len(orders) != len(ts) - 1:
        raise ValueError(f"need one order per step: {len(ts) - 1} steps but {len(orders)} orders")
    if any(o not in _DPM_STEPS for o in orders):
        raise ValueError(f"orders must be 1, 2 or 3, got {orders}")
    return DPMSolverStepper(per_nfe(denoisers, sum(orders)), ts.tolist(), schedule, orders).integrate(x)


# ----------------------------------------------------------------------------------------------- DPM-Solver++
def _phi_integrals(h: float) -> tuple[float, float, float]:
    """J_k = ∫_0^h u^k e^{u−h} du for k = 0, 1, 2 (J_k = h^k − k J_{k−1}, by parts)."""
    j0 = -math.expm1(-h)
    j1 = h - j0
    return j0, j1, h * h - 2 * j1


class DPMSolverPPStepper(Stepper):
    """Multistep DPM-Solver++ steps (see dpm_solver_pp). Features: eps, eps_diff, x0_diff (_StartOutputs)."""

    def __init__(self, ds, ts, schedule, nfes, features=(), order: int = 2, lower_order_final: bool = True):
        super().__init__(ds, ts, schedule, nfes, features)
        self.order, self.lower_order_final = order, lower_order_final
        self.hist: list[tuple[float, Tensor]] = []          # (λ, x0) of the last evaluations, newest last
        self.outputs = _StartOutputs()

    def _step(self, i, ds, x):
        n = self.n_steps
        s, t = self.ts[i], self.ts[i + 1]
        _, sig_s, l_s = _coeffs(self.schedule, s)
        a_t, sig_t, l_t = _coeffs(self.schedule, t)
        hist = self.hist = (self.hist + [(l_s, _call(ds[0], x, s))])[-3:]
        k = min(self.order, i + 1, n - i) if self.lower_order_final and n < 15 else min(self.order, i + 1)
        j0, j1, j2 = _phi_integrals(l_t - l_s)
        m0 = hist[-1][1]
        update = j0 * m0
        if k >= 2:
            h0 = l_s - hist[-2][0]
            d01 = (m0 - hist[-2][1]) / h0                     # first divided difference
            if k == 3:
                h1 = hist[-2][0] - hist[-3][0]
                d12 = (hist[-2][1] - hist[-3][1]) / h1
                d012 = (d01 - d12) / (h0 + h1)               # second divided difference
                update = update + j1 * (d01 + h0 * d012) + j2 * d012
            else:
                update = update + j1 * d01
        return sig_t / sig_s * x + a_t * update, self.outputs.features(self, x, m0, s, t)


def dpm_solver_pp(denoisers, x: Tensor, ts, schedule: VPSchedule, order: int = 2,
                  lower_order_final: bool = True) -> Tensor:
    """Multistep DPM-Solver++ 2M / 3M (Lu et al. 2022b, Algorithm 2 and its 3rd-order extension), x0 form.

    Data-prediction exponential integrator: x_t = σ_t/σ_s x_s + σ_t ∫ e^λ x0(λ) dλ, with x0(λ) replaced by the
    Newton polynomial through the last `order` denoiser outputs (in λ), integrated exactly:
        x_t = σ_t/σ_s x_s + α_t (J_0 m_0 + J_1 m'_0 + J_2 m''_0 / 2).
    The first steps use lower order while the history is short; with lower_order_final and < 15 steps the last
    steps drop order too (Lu et al. 2022b). NFE = steps.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    ts = snap_times(ts, schedule)
    n = len(ts) - 1
    return DPMSolverPPStepper(per_nfe(denoisers, n), ts.tolist(), schedule, [1] * n, order=order,
                              lower_order_final=lower_order_final).integrate(x)


# ----------------------------------------------------------------------------------------------- EDM Heun
class HeunStepper(Stepper):
    """EDM Heun steps in x̃ = x/α space (see heun). Features: euler, corrector, x0_diff."""

    def __init__(self, ds, ts, schedule, nfes, features=()):
        super().__init__(ds, ts, schedule, nfes, features)
        self.prev_x0 = None

    def _alpha(self, i: int) -> float:
        return _coeffs(self.schedule, self.ts[i])[0]

    def to_state(self, x):
        return x / self._alpha(0)

    def to_x(self, state, i):
        return self._alpha(i) * state

    def _step(self, i, ds, xt):
        t, t_next = self.ts[i], self.ts[i + 1]
        a, _, l_ = _coeffs(self.schedule, t)
        a_n, _, l_n = _coeffs(self.schedule, t_next)
        sig, sig_n = math.exp(-l_), math.exp(-l_n)
        x0 = _call(ds[0], a * xt, t)
        d = (xt - x0) / sig
        x_pred = xt + (sig_n - sig) * d                      # Euler predictor
        d_n = (x_pred - _call(ds[1], a_n * x_pred, t_next)) / sig_n
        update = xt + (sig_n - sig) * 0.5 * (d + d_n)        # trapezoidal corrector
        features = self._pick({"euler": lambda: (sig_n - sig) * d,
                               "corrector": lambda: (sig_n - sig) * 0.5 * (d_n - d),
                               "x0_diff": lambda: _difference(x0, self.prev_x0, -math.expm1(l_ - l_n))})
        self.prev_x0 = x0
        return update, features


def heun(denoisers, x: Tensor, ts, schedule: VPSchedule) -> Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) in σ̃ = σ/α space.

    x̃ = x/α solves dx̃/dσ̃ = (x̃ − D(α x̃, t))/σ̃. Our last time is t_end > 0 (σ̃ > 0), so every step is a
    full Heun step: NFE = 2·steps (NFE 2i is the Euler predictor of step i, 2i+1 its corrector).
    """
    ts = snap_times(ts, schedule)
    n = len(ts) - 1
    return HeunStepper(per_nfe(denoisers, 2 * n), ts.tolist(), schedule, [2] * n).integrate(x)


# ----------------------------------------------------------------------------------------------- registry
def _starts(schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    """One NFE at the step start: DDIM and the multistep solvers (whose history holds the earlier outputs)."""
    return [s]


def _dpm_times(schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    return [s] + dpm_inner_times(schedule, s, t, nfes)


def _heun_times(schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    """Euler predictor at the step start, trapezoidal corrector at the step end (Karras et al. 2022, Alg. 1)."""
    return [s, t]


@dataclass(frozen=True)
class SolverSpec:
    """Everything the project knows about one solver, looked up by name through `get_solver`.

    adapter(denoisers, x, ts, schedule, nfes, noise) runs the pure solver function `function` with nfes = the NFEs
    of every step (noise: the per-sample noise of a stochastic solver, None for the ODE solvers);
    step_times(schedule, s, t, nfes) gives the snapped times of one step's NFEs in NFE order;
    make_stepper(ds, ts, schedule, nfes, noise, features) builds the per-step form (a Stepper, ds one denoiser per
    NFE, ts snapped floats) that exposes each step's update and IIA features; feature_sets names the IIA feature sets
    (IIA_FEATURE_SETS) the steps can expose.
    """

    name: str
    function: Callable
    adapter: Callable
    step_times: Callable
    nfe_per_step: tuple[int, int]   # (fewest, most) NFEs per step
    multistep: bool                 # keeps denoiser outputs across steps
    paper: str
    make_stepper: Callable
    stochastic: bool = False        # draws fresh noise every step: needs `noise` (a SampleNoise) to run
    feature_sets: tuple[str, ...] = ()

    @property
    def default_nfe_per_step(self) -> int:
        """NFEs per step when none are given (the fewest: heun 2, the others 1; dpm_solver 1 = DDIM)."""
        return self.nfe_per_step[0]

    @property
    def variable_order(self) -> bool:
        """Whether steps may differ in their number of NFEs (singlestep DPM-Solver 1-3)."""
        return self.nfe_per_step[0] < self.nfe_per_step[1]

    @property
    def rule(self) -> str:
        """The NFEs-per-step rule in words, for error messages."""
        lo, hi = self.nfe_per_step
        if lo == hi:
            return f"{self.name} needs exactly {lo} NFE{'s' if lo > 1 else ''} per step"
        return f"{self.name} allows {lo}–{hi} NFEs per step"

    def step_nfes(self, n_steps: int, orders: Sequence[int] | None = None) -> list[int]:
        """NFEs of each of n_steps steps: `orders` (one per step, each within nfe_per_step) or the default."""
        if orders is None:
            return [self.default_nfe_per_step] * n_steps
        orders = [int(o) if isinstance(o, numbers.Integral) and not isinstance(o, bool) else o for o in orders]
        if len(orders) != n_steps:
            raise SolverError(f"{self.name} needs one order (NFEs) per step: {n_steps} steps but "
                              f"{len(orders)} orders {orders}")
        lo, hi = self.nfe_per_step
        if not all(type(o) is int and lo <= o <= hi for o in orders):
            raise SolverError(f"{self.rule}, got orders {orders}")
        return orders

    def uniform_nfe_per_step(self, order: int | None = None) -> int:
        """NFEs of every step of a plain sampler (one order throughout): `order`, checked, where steps may differ
        (dpm_solver); the fixed count otherwise, where an `order` other than that count is refused, not ignored."""
        if order is None:
            return self.default_nfe_per_step
        if not self.variable_order and order != self.default_nfe_per_step:
            raise SolverError(f"{self.name} takes {self.default_nfe_per_step} NFE(s) per step and no order; "
                              f"order applies to {', '.join(n for n, s in SOLVER_REGISTRY.items() if s.variable_order)}"
                              " (leave it unset)")
        return self.step_nfes(1, [order])[0]

    def run(self, denoisers, x: Tensor, ts, schedule: VPSchedule, orders: Sequence[int] | None = None,
            noise=None, *, coefficients: Sequence[Sequence[float]] | None = None,
            feature_set: str | None = None) -> Tensor:
        """Integrate x from ts[0] to ts[-1]; NFE j uses denoisers[j] (or the one callable); orders as step_nfes.
        A stochastic solver needs `noise` (a SampleNoise of the batch's sample indices, so that image i is the
        same whatever the batch size); the ODE solvers ignore it.

        With `coefficients` (one list per step, one float per feature of `feature_set`, e.g. from
        oms_lightning.diffusion.iia) every step is IIA-corrected; all-zero coefficients give the plain result bit
        for bit."""
        if coefficients is None:
            self.feature_names(feature_set)                  # checked, though a plain run computes no features
            nfes = self.step_nfes(len(snap_times(ts, schedule)) - 1, orders)
            return self.adapter(denoisers, x, ts, schedule, nfes, noise)
        stepper = self.stepper(denoisers, ts, schedule, orders, noise, feature_set=feature_set)
        return stepper.integrate(x, self.check_coefficients(coefficients, stepper.n_steps, feature_set))

    def feature_names(self, feature_set: str | None) -> tuple[str, ...]:
        """The features of one of this solver's IIA feature sets, in coefficient order (none for None)."""
        if feature_set is None:
            return ()
        if isinstance(feature_set, str) and feature_set in self.feature_sets:
            return IIA_FEATURE_SETS[feature_set]
        if not self.feature_sets:
            why = "it is stochastic" if self.stochastic else "none implemented yet"
            with_features = ", ".join(n for n, s in SOLVER_REGISTRY.items() if s.feature_sets)
            raise SolverError(f"{self.name} supports no IIA feature sets ({why}), got feature set {feature_set!r}; "
                              f"solvers with IIA features: {with_features}")
        raise SolverError(f"{self.name} has no IIA feature set {feature_set!r}; it supports: "
                          f"{', '.join(self.feature_sets)}")

    def stepper(self, denoisers, ts, schedule: VPSchedule, orders: Sequence[int] | None = None, noise=None, *,
                feature_set: str | None = None) -> "Stepper":
        """The per-step form of this solver over ts (a fresh Stepper), exposing `feature_set`'s IIA features."""
        features = self.feature_names(feature_set)
        ts = snap_times(ts, schedule)
        nfes = self.step_nfes(len(ts) - 1, orders)
        if self.stochastic and noise is None:
            raise SolverError(f"{self.name} is stochastic and needs `noise` (a SampleNoise) to run")
        return self.make_stepper(per_nfe(denoisers, sum(nfes)), ts.tolist(), schedule, nfes, noise, features)

    def check_coefficients(self, coefficients, n_steps: int, feature_set: str | None) -> list[tuple[float, ...]]:
        """IIA coefficients as one tuple of floats per step; SolverError naming the step for a wrong count, a
        non-finite value or a missing feature set."""
        if feature_set is None:
            raise SolverError(f"IIA coefficients need a feature_set; {self.name} supports: "
                              f"{', '.join(self.feature_sets) or 'none'}")
        names = self.feature_names(feature_set)
        steps = list(coefficients)
        if len(steps) != n_steps:
            raise SolverError(f"IIA coefficients: {n_steps} steps but {len(steps)} per-step entries")
        return [self._step_coefficients(i, step, feature_set, names) for i, step in enumerate(steps)]

    @staticmethod
    def _step_coefficients(i: int, given, feature_set: str, names: tuple[str, ...]) -> tuple[float, ...]:
        try:
            step = None if isinstance(given, (str, bytes)) else list(given)
        except TypeError:
            step = None
        if step is None or len(step) != len(names):
            raise SolverError(f"IIA coefficients of step {i}: expected {len(names)} number(s), one per feature of "
                              f"{feature_set!r} ({', '.join(names)}), got {given!r}")
        values = [c.item() if isinstance(c, Tensor) and c.numel() == 1 else c for c in step]
        for k, c in enumerate(values):
            if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
                raise SolverError(f"IIA coefficient {k} ({names[k]}) of step {i} must be a finite number, got {c!r}")
        return tuple(float(c) for c in values)

    def nfe_times(self, ts, orders: Sequence[int] | None, schedule: VPSchedule) -> list[float]:
        """The time each NFE evaluates at, in NFE order: exactly the (float32-snapped) t the denoiser receives."""
        try:  # a hashable key for the memo; anything else takes the unmemoised path, whose checks say what is wrong
            grid = tuple(float(u) for u in (ts.tolist() if isinstance(ts, Tensor) else ts))
        except (TypeError, ValueError):
            return list(_nfe_times.__wrapped__(self, ts, orders, schedule))
        return list(_nfe_times(self, grid, tuple(self.step_nfes(len(grid) - 1, orders)), schedule))


# Memoised: a search asks for the same few grids' NFE times thousands of times (member range checks, routed
# multi-decoder costs), and each singlestep inner time costs several scalar tensor ops.
@functools.lru_cache(maxsize=1 << 16)
def _nfe_times(spec: SolverSpec, ts, orders, schedule: VPSchedule) -> tuple[float, ...]:
    ts = snap_times(ts, schedule).tolist()
    nfes = spec.step_nfes(len(ts) - 1, orders)
    return tuple(u for i, k in enumerate(nfes) for u in spec.step_times(schedule, ts[i], ts[i + 1], k))


# Adapters to the common signature (denoisers, x, ts, schedule, nfes, noise): module-level, so a SolverSpec pickles.
def _run_ddim(ds, x, ts, schedule, nfes, noise):
    return ddim(ds, x, ts, schedule)


def _run_ddim_eta1(ds, x, ts, schedule, nfes, noise):
    return ddim(ds, x, ts, schedule, eta=1.0, noise=noise)


def _run_dpm_solver(ds, x, ts, schedule, nfes, noise):
    return dpm_solver(ds, x, ts, nfes, schedule)


def _run_dpm_solver_pp_2m(ds, x, ts, schedule, nfes, noise):
    return dpm_solver_pp(ds, x, ts, schedule, order=2)


def _run_dpm_solver_pp_3m(ds, x, ts, schedule, nfes, noise):
    return dpm_solver_pp(ds, x, ts, schedule, order=3)


def _run_heun(ds, x, ts, schedule, nfes, noise):
    return heun(ds, x, ts, schedule)


# Stepper factories, common signature (ds, ts, schedule, nfes, noise, features), module-level for pickling too.
def _ddim_stepper(ds, ts, schedule, nfes, noise, features):
    return DDIMStepper(ds, ts, schedule, nfes, features)


def _ddim_eta1_stepper(ds, ts, schedule, nfes, noise, features):
    return DDIMStepper(ds, ts, schedule, nfes, features, eta=1.0, noise=noise)


def _dpm_solver_stepper(ds, ts, schedule, nfes, noise, features):
    return DPMSolverStepper(ds, ts, schedule, nfes, features)


def _dpm_solver_pp_2m_stepper(ds, ts, schedule, nfes, noise, features):
    return DPMSolverPPStepper(ds, ts, schedule, nfes, features, order=2)


def _dpm_solver_pp_3m_stepper(ds, ts, schedule, nfes, noise, features):
    return DPMSolverPPStepper(ds, ts, schedule, nfes, features, order=3)


def _heun_stepper(ds, ts, schedule, nfes, noise, features):
    return HeunStepper(ds, ts, schedule, nfes, features)


# feature_sets: the IIA feature sets of each solver (Zhang et al. 2024 fit IIA-DDIM, IIA-EDM and IIA-DPM-Solver++),
# the first the one to try first (the best on Gaussian data, tests/test_iia.py). None yet for singlestep dpm_solver
# (its inner NFEs would need features of their own), none for stochastic DDIM (IIA fits a deterministic map).
ONE_NFE_FEATURE_SETS = ("full", "eps", "eps_diff", "x0_diff")   # DDIM and multistep DPM-Solver++ (_StartOutputs)
SOLVER_REGISTRY: dict[str, SolverSpec] = {spec.name: spec for spec in (
    SolverSpec("ddim", function=ddim, adapter=_run_ddim, step_times=_starts, nfe_per_step=(1, 1),
               multistep=False, paper="Song et al. 2021, DDIM (ICLR), eta = 0", make_stepper=_ddim_stepper,
               feature_sets=ONE_NFE_FEATURE_SETS),
    # the sampler the AYS KLUB is derived for (Sabour et al. 2024): DDIM with eta = 1, i.e. ancestral DDPM steps
    SolverSpec("ddim_eta1", function=ddim, adapter=_run_ddim_eta1, step_times=_starts, nfe_per_step=(1, 1),
               multistep=False, paper="Song et al. 2021, DDIM (ICLR), eta = 1 (stochastic)",
               make_stepper=_ddim_eta1_stepper, stochastic=True),
    SolverSpec("dpm_solver", function=dpm_solver, adapter=_run_dpm_solver, step_times=_dpm_times,
               nfe_per_step=(1, 3), multistep=False, paper="Lu et al. 2022, DPM-Solver (NeurIPS), singlestep 1-3",
               make_stepper=_dpm_solver_stepper),
    SolverSpec("dpm_solver++", function=dpm_solver_pp, adapter=_run_dpm_solver_pp_2m, step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 2M",
               make_stepper=_dpm_solver_pp_2m_stepper, feature_sets=ONE_NFE_FEATURE_SETS),
    SolverSpec("dpm_solver++3m", function=dpm_solver_pp, adapter=_run_dpm_solver_pp_3m, step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 3M",
               make_stepper=_dpm_solver_pp_3m_stepper, feature_sets=ONE_NFE_FEATURE_SETS),
    SolverSpec("heun", function=heun, adapter=_run_heun, step_times=_heun_times, nfe_per_step=(2, 2),
               multistep=False, paper="Karras et al. 2022, EDM (NeurIPS), Algorithm 1", make_stepper=_heun_stepper,
               feature_sets=("edm",)),
)}


# The solvers a search and its baselines enumerate. Stochastic DDIM is left out: it is the sampler AYS's KLUB is
# derived for, not a fast one (each ancestral step drops the posterior variance of x0, see the Gaussian variance
# test in tests/test_solvers.py; not yet measured on digits), and its fresh noise per step would make the
# predictor's FID records noisier; it stays one `solver=` / `sampler:ddim_eta1` away.
ODE_SOLVERS: tuple[str, ...] = tuple(sorted(n for n, spec in SOLVER_REGISTRY.items() if not spec.stochastic))


def get_solver(name) -> SolverSpec:
    """The registry entry of `name`; SolverError listing the known names."""
    if isinstance(name, str) and name in SOLVER_REGISTRY:
        return SOLVER_REGISTRY[name]
    # the retired spelling of the python function's name gets a pointer to the one registry name
    respelled = name.replace("_pp", "++") if isinstance(name, str) else None
    hint = f" (did you mean {respelled!r}?)" if respelled in SOLVER_REGISTRY else ""
    raise SolverError(f"unknown solver {name!r}; choose one of: {', '.join(sorted(SOLVER_REGISTRY))}{hint}")


def nfe_of(solver, n_steps: int, orders: Sequence[int] | None = None) -> int:
    """Network evaluations of `solver` (a registry name or one of the solver functions) for n_steps steps.

    `orders` (one per step) is needed by variable-order solvers (dpm_solver: NFE = sum(orders)); the others make
    nfe_per_step NFEs every step and ignore it (heun: 2·n_steps, the last step ends at t_end > 0).
    """
    spec = next((s for s in SOLVER_REGISTRY.values() if s.function is solver), None) if callable(solver) else None
    spec = spec or get_solver(solver)
    if not spec.variable_order:
        return spec.default_nfe_per_step * n_steps
    if orders is None:
        raise SolverError(f"{spec.name} needs one order per step: {n_steps} steps, orders=None")
    return sum(spec.step_nfes(n_steps, orders))
