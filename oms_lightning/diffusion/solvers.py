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
"""
from __future__ import annotations

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
    t32 = validate_times(torch.as_tensor(ts).cpu(), schedule).to(torch.float32)
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
    _, _, l_s = _coeffs(schedule, s)
    _, _, l_t = _coeffs(schedule, t)
    h = l_t - l_s
    return [_t_of_lambda(schedule, l_s + r * h) for r in DPM_INNER_R[order]]


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


# ----------------------------------------------------------------------------------------------- DDIM
def ddim(denoisers, x: Tensor, ts, schedule: VPSchedule, eta: float = 0.0, noise=None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16); eta = 0 is deterministic (= DPM-Solver-1), NFE = steps.

    x_{t'} = α' x̂0 + sqrt(σ'² − c²) ε̂ + c z,  c = η · σ'/σ · sqrt(1 − α²/α'²).
    """
    ts = snap_times(ts, schedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        _randn_like(noise, x)
    ds = per_nfe(denoisers, len(ts) - 1)
    for i in range(len(ts) - 1):
        t, t_next = ts[i].item(), ts[i + 1].item()
        a, s, _ = _coeffs(schedule, t)
        a_n, s_n, _ = _coeffs(schedule, t_next)
        x0 = _call(ds[i], x, t)
        eps = eps_from_x0(x, x0, a, s)
        c = eta * s_n / s * math.sqrt(max(0.0, 1.0 - (a / a_n) ** 2))
        x = a_n * x0 + math.sqrt(max(0.0, s_n**2 - c**2)) * eps
        if c > 0:
            x = x + c * _randn_like(noise, x)
    return x


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
    ds = per_nfe(denoisers, sum(orders))
    j = 0
    for i, order in enumerate(orders):
        x = _DPM_STEPS[order](ds[j:j + order], x, ts[i].item(), ts[i + 1].item(), schedule)
        j += order
    return x


# ----------------------------------------------------------------------------------------------- DPM-Solver++
def _phi_integrals(h: float) -> tuple[float, float, float]:
    """J_k = ∫_0^h u^k e^{u−h} du for k = 0, 1, 2 (J_k = h^k − k J_{k−1}, by parts)."""
    j0 = -math.expm1(-h)
    j1 = h - j0
    return j0, j1, h * h - 2 * j1


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
    ds = per_nfe(denoisers, n)
    hist: list[tuple[float, Tensor]] = []                   # (λ, x0) of the last evaluations, newest last
    for i in range(n):
        s, t = ts[i].item(), ts[i + 1].item()
        _, sig_s, l_s = _coeffs(schedule, s)
        a_t, sig_t, l_t = _coeffs(schedule, t)
        hist = (hist + [(l_s, _call(ds[i], x, s))])[-3:]
        k = min(order, i + 1, n - i) if lower_order_final and n < 15 else min(order, i + 1)
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
        x = sig_t / sig_s * x + a_t * update
    return x


# ----------------------------------------------------------------------------------------------- EDM Heun
def heun(denoisers, x: Tensor, ts, schedule: VPSchedule) -> Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) in σ̃ = σ/α space.

    x̃ = x/α solves dx̃/dσ̃ = (x̃ − D(α x̃, t))/σ̃. Our last time is t_end > 0 (σ̃ > 0), so every step is a
    full Heun step: NFE = 2·steps (NFE 2i is the Euler predictor of step i, 2i+1 its corrector).
    """
    ts = snap_times(ts, schedule)
    n = len(ts) - 1
    ds = per_nfe(denoisers, 2 * n)
    a, _, l_ = _coeffs(schedule, ts[0].item())
    xt, sig = x / a, math.exp(-l_)
    for i in range(n):
        t, t_next = ts[i].item(), ts[i + 1].item()
        a_n, _, l_n = _coeffs(schedule, t_next)
        sig_n = math.exp(-l_n)
        d = (xt - _call(ds[2 * i], a * xt, t)) / sig
        x_pred = xt + (sig_n - sig) * d                      # Euler predictor
        d_n = (x_pred - _call(ds[2 * i + 1], a_n * x_pred, t_next)) / sig_n
        xt = xt + (sig_n - sig) * 0.5 * (d + d_n)            # trapezoidal corrector
        a, sig = a_n, sig_n
    return a * xt


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
    step_times(schedule, s, t, nfes) gives the snapped times of one step's NFEs in NFE order.
    """

    name: str
    function: Callable
    adapter: Callable
    step_times: Callable
    nfe_per_step: tuple[int, int]   # (fewest, most) NFEs per step
    multistep: bool                 # keeps denoiser outputs across steps
    paper: str
    stochastic: bool = False        # draws fresh noise every step: needs `noise` (a SampleNoise) to run

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
            noise=None) -> Tensor:
        """Integrate x from ts[0] to ts[-1]; NFE j uses denoisers[j] (or the one callable); orders as step_nfes.
        A stochastic solver needs `noise` (a SampleNoise of the batch's sample indices, so that image i is the
        same whatever the batch size); the ODE solvers ignore it."""
        nfes = self.step_nfes(len(snap_times(ts, schedule)) - 1, orders)
        return self.adapter(denoisers, x, ts, schedule, nfes, noise)

    def nfe_times(self, ts, orders: Sequence[int] | None, schedule: VPSchedule) -> list[float]:
        """The time each NFE evaluates at, in NFE order: exactly the (float32-snapped) t the denoiser receives."""
        ts = snap_times(ts, schedule).tolist()
        nfes = self.step_nfes(len(ts) - 1, orders)
        return [u for i, k in enumerate(nfes) for u in self.step_times(schedule, ts[i], ts[i + 1], k)]


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


SOLVER_REGISTRY: dict[str, SolverSpec] = {spec.name: spec for spec in (
    SolverSpec("ddim", function=ddim, adapter=_run_ddim, step_times=_starts, nfe_per_step=(1, 1),
               multistep=False, paper="Song et al. 2021, DDIM (ICLR), eta = 0"),
    # the sampler the AYS KLUB is derived for (Sabour et al. 2024): DDIM with eta = 1, i.e. ancestral DDPM steps
    SolverSpec("ddim_eta1", function=ddim, adapter=_run_ddim_eta1, step_times=_starts, nfe_per_step=(1, 1),
               multistep=False, paper="Song et al. 2021, DDIM (ICLR), eta = 1 (stochastic)", stochastic=True),
    SolverSpec("dpm_solver", function=dpm_solver, adapter=_run_dpm_solver, step_times=_dpm_times,
               nfe_per_step=(1, 3), multistep=False, paper="Lu et al. 2022, DPM-Solver (NeurIPS), singlestep 1-3"),
    SolverSpec("dpm_solver++", function=dpm_solver_pp, adapter=_run_dpm_solver_pp_2m, step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 2M"),
    SolverSpec("dpm_solver++3m", function=dpm_solver_pp, adapter=_run_dpm_solver_pp_3m, step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 3M"),
    SolverSpec("heun", function=heun, adapter=_run_heun, step_times=_heun_times, nfe_per_step=(2, 2),
               multistep=False, paper="Karras et al. 2022, EDM (NeurIPS), Algorithm 1"),
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
