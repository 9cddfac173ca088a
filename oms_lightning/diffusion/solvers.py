"""Probability-flow ODE solvers (and stochastic DDIM) for VP diffusion: one stepper per solver family, one
integration loop, one short function per family, and the registry that knows the solvers by name.

Every solver function takes
  denoisers: one callable D(x, t) → x0 (data prediction), or a sequence with one callable per network
             evaluation (NFE) — the *model schedule* of OMS-DPM: NFE j uses denoisers[j];
  x:         the starting state x_{ts[0]} (its dtype is kept throughout);
  ts:        1-D tensor of times from noisy to clean (steps + 1 entries), see spacing.py;
  schedule:  the VPSchedule.
and returns the final state x_{ts[-1]} (not clamped).

The maths lives in `steppers.py` (re-exported here, so everything imports from this module): each family is a
`Stepper` that takes its steps one at a time, returning the plain update and the step's IIA correction features
(IIA_FEATURE_SETS). `integrate` is the one loop that drives any stepper over the schedule's times; `ddim`,
`dpm_solver`, `dpm_solver_pp` and `heun` check their arguments, build their stepper and integrate it. Times are
snapped to float32 and coefficients are python floats from float64 schedule evaluations (see steppers.py).

`SOLVER_REGISTRY` (end of this file) is the one place that knows the solvers by name: each entry's stepper factory
is the one handle from which `SolverSpec.run` (integrate it) and `SolverSpec.stepper` (step it by hand, as the IIA
fit does) both derive; the entry also says how many NFEs a step may have and at which times the NFEs evaluate.
Adding a solver = a Stepper subclass and one entry there. IIA coefficients (fitted by `oms_lightning.diffusion.iia`)
enter through `corrected`, the one correction line all solvers share, via `SolverSpec.run(..., coefficients=,
feature_set=)`.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

from .noise_schedule import VPSchedule
from .steppers import (DPM_INNER_R, IIA_FEATURE_SETS, DDIMStepper, DPMSolverPPStepper, DPMSolverStepper,
                       HeunStepper, SolverError, Stepper, _randn_like, corrected, dpm_inner_times, per_nfe,
                       snap_times)

__all__ = ["DPM_INNER_R", "IIA_FEATURE_SETS", "ODE_SOLVERS", "ONE_NFE_FEATURE_SETS", "SOLVER_REGISTRY",
           "DDIMStepper", "DPMSolverPPStepper", "DPMSolverStepper", "HeunStepper", "SolverError", "SolverSpec",
           "Stepper", "corrected", "ddim", "dpm_inner_times", "dpm_solver", "dpm_solver_pp", "get_solver", "heun",
           "integrate", "nfe_of", "per_nfe", "snap_times"]


# ----------------------------------------------------------------------------------------------- the loop
def integrate(stepper: Stepper, x: Tensor, coefficients: Sequence[Sequence[float]] | None = None) -> Tensor:
    """Drive a fresh stepper through all its steps from x at ts[0]; x at ts[-1]. With (checked) per-step IIA
    coefficients each step is corrected (`corrected`), otherwise the plain update is the next state."""
    state = stepper.to_state(x)
    for i in range(stepper.n_steps):
        update, features = stepper.step(state)
        state = update if coefficients is None else corrected(update, features, coefficients[i])
    return stepper.to_x(state, stepper.n_steps)


def _over(make_stepper: Callable, denoisers, ts: Tensor, noise_schedule: VPSchedule, nfes: list[int],
          **options) -> Stepper:
    """A stepper over snapped times ts, NFE j using the j-th of the denoisers (or the one callable)."""
    return make_stepper(per_nfe(denoisers, sum(nfes)), ts.tolist(), noise_schedule, nfes, **options)


# ----------------------------------------------------------------------------------------------- the solvers
def ddim(denoisers, x: Tensor, ts, noise_schedule: VPSchedule, eta: float = 0.0, noise=None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16); eta = 0 is deterministic (= DPM-Solver-1), NFE = steps.

    x_{t'} = α' x̂0 + sqrt(σ'² − c²) ε̂ + c z,  c = η · σ'/σ · sqrt(1 − α²/α'²). eta > 0 needs `noise` (a
    SampleNoise or a randn_like callable) for the fresh z of every step.
    """
    ts = snap_times(ts, noise_schedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        _randn_like(noise, x)                                # raises: says what noise must be
    return integrate(_over(DDIMStepper, denoisers, ts, noise_schedule, [1] * (len(ts) - 1), eta=eta, noise=noise), x)


def dpm_solver(denoisers, x: Tensor, ts, orders: Sequence[int], noise_schedule: VPSchedule) -> Tensor:
    """Singlestep DPM-Solver (Lu et al. 2022) in ε form; step i has order orders[i] ∈ {1, 2, 3}.

    NFE = sum(orders); NFE j uses denoisers[j] (OMS-DPM's search space). Inner points are λ-uniform in the step.
    """
    ts = snap_times(ts, noise_schedule)
    orders = [int(o) for o in orders]
    if len(orders) != len(ts) - 1:
        raise ValueError(f"need one order per step: {len(ts) - 1} steps but {len(orders)} orders")
    if any(o not in DPM_INNER_R for o in orders):
        raise ValueError(f"orders must be 1, 2 or 3, got {orders}")
    return integrate(_over(DPMSolverStepper, denoisers, ts, noise_schedule, orders), x)


def dpm_solver_pp(denoisers, x: Tensor, ts, noise_schedule: VPSchedule, order: int = 2,
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
    ts = snap_times(ts, noise_schedule)
    stepper = _over(DPMSolverPPStepper, denoisers, ts, noise_schedule, [1] * (len(ts) - 1), order=order,
                    lower_order_final=lower_order_final)
    return integrate(stepper, x)


def heun(denoisers, x: Tensor, ts, noise_schedule: VPSchedule) -> Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) in σ̃ = σ/α space.

    x̃ = x/α solves dx̃/dσ̃ = (x̃ − D(α x̃, t))/σ̃. Our last time is t_end > 0 (σ̃ > 0), so every step is a
    full Heun step: NFE = 2·steps (NFE 2i is the Euler predictor of step i, 2i+1 its corrector).
    """
    ts = snap_times(ts, noise_schedule)
    return integrate(_over(HeunStepper, denoisers, ts, noise_schedule, [2] * (len(ts) - 1)), x)


# ----------------------------------------------------------------------------------------------- registry
def _starts(noise_schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    """One NFE at the step start: DDIM and the multistep solvers (whose history holds the earlier outputs)."""
    return [s]


def _dpm_times(noise_schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    return [s] + dpm_inner_times(noise_schedule, s, t, nfes)


def _heun_times(noise_schedule: VPSchedule, s: float, t: float, nfes: int) -> list[float]:
    """Euler predictor at the step start, trapezoidal corrector at the step end (Karras et al. 2022, Alg. 1)."""
    return [s, t]


@dataclass(frozen=True)
class SolverSpec:
    """Everything the project knows about one solver, looked up by name through `get_solver`.

    make_stepper(ds, ts, schedule, nfes, features, noise) builds the solver's Stepper (ds one denoiser per NFE, ts
    snapped floats, nfes the NFEs of every step, features the names of an IIA feature set, noise the per-sample
    noise of a stochastic solver): a Stepper class, or a functools.partial of one fixing its options (picklable
    either way). `run` integrates it, `stepper` hands it out to be stepped by hand. step_times(schedule, s, t,
    nfes) gives the snapped times of one step's NFEs in NFE order; feature_sets names the IIA feature sets
    (IIA_FEATURE_SETS) the steps can expose.
    """

    name: str
    make_stepper: Callable
    step_times: Callable
    nfe_per_step: tuple[int, int]   # (fewest, most) NFEs per step
    multistep: bool                 # keeps denoiser outputs across steps
    paper: str
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

    def run(self, denoisers, x: Tensor, ts, noise_schedule: VPSchedule, orders: Sequence[int] | None = None,
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
            return integrate(self.stepper(denoisers, ts, noise_schedule, orders, noise), x)
        stepper = self.stepper(denoisers, ts, noise_schedule, orders, noise, feature_set=feature_set)
        return integrate(stepper, x, self.check_coefficients(coefficients, stepper.n_steps, feature_set))

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

    def stepper(self, denoisers, ts, noise_schedule: VPSchedule, orders: Sequence[int] | None = None, noise=None, *,
                feature_set: str | None = None) -> Stepper:
        """This solver over ts as a fresh Stepper (see `run` for the arguments), exposing `feature_set`'s IIA
        features."""
        features = self.feature_names(feature_set)
        ts = snap_times(ts, noise_schedule)
        nfes = self.step_nfes(len(ts) - 1, orders)
        if self.stochastic and noise is None:
            raise SolverError(f"{self.name} is stochastic and needs `noise` (a SampleNoise) to run")
        return _over(self.make_stepper, denoisers, ts, noise_schedule, nfes, features=features, noise=noise)

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

    def nfe_times(self, ts, orders: Sequence[int] | None, noise_schedule: VPSchedule) -> list[float]:
        """The time each NFE evaluates at, in NFE order: exactly the (float32-snapped) t the denoiser receives."""
        try:  # a hashable key for the memo; anything else takes the unmemoised path, whose checks say what is wrong
            grid = tuple(float(u) for u in (ts.tolist() if isinstance(ts, Tensor) else ts))
        except (TypeError, ValueError):
            return list(_nfe_times.__wrapped__(self, ts, orders, noise_schedule))
        return list(_nfe_times(self, grid, tuple(self.step_nfes(len(grid) - 1, orders)), noise_schedule))


# Memoised: a search asks for the same few grids' NFE times thousands of times (member range checks, routed
# multi-decoder costs), and each singlestep inner time costs several scalar tensor ops.
@functools.lru_cache(maxsize=1 << 16)
def _nfe_times(spec: SolverSpec, ts, orders, noise_schedule: VPSchedule) -> tuple[float, ...]:
    ts = snap_times(ts, noise_schedule).tolist()
    nfes = spec.step_nfes(len(ts) - 1, orders)
    return tuple(u for i, k in enumerate(nfes) for u in spec.step_times(noise_schedule, ts[i], ts[i + 1], k))


# feature_sets: the IIA feature sets of each solver (Zhang et al. 2024 fit IIA-DDIM, IIA-EDM and IIA-DPM-Solver++),
# the first the one to try first (the best on Gaussian data, tests/test_iia.py). None yet for singlestep dpm_solver
# (its inner NFEs would need features of their own), none for stochastic DDIM (IIA fits a deterministic map).
ONE_NFE_FEATURE_SETS = ("full", "eps", "eps_diff", "x0_diff")   # DDIM and multistep DPM-Solver++ (_StartOutputs)
SOLVER_REGISTRY: dict[str, SolverSpec] = {spec.name: spec for spec in (
    SolverSpec("ddim", DDIMStepper, step_times=_starts, nfe_per_step=(1, 1), multistep=False,
               paper="Song et al. 2021, DDIM (ICLR), eta = 0", feature_sets=ONE_NFE_FEATURE_SETS),
    # the sampler the AYS KLUB is derived for (Sabour et al. 2024): DDIM with eta = 1, i.e. ancestral DDPM steps
    SolverSpec("ddim_eta1", functools.partial(DDIMStepper, eta=1.0), step_times=_starts, nfe_per_step=(1, 1),
               multistep=False, paper="Song et al. 2021, DDIM (ICLR), eta = 1 (stochastic)", stochastic=True),
    SolverSpec("dpm_solver", DPMSolverStepper, step_times=_dpm_times, nfe_per_step=(1, 3), multistep=False,
               paper="Lu et al. 2022, DPM-Solver (NeurIPS), singlestep 1-3"),
    SolverSpec("dpm_solver++", functools.partial(DPMSolverPPStepper, order=2), step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 2M",
               feature_sets=ONE_NFE_FEATURE_SETS),
    SolverSpec("dpm_solver++3m", functools.partial(DPMSolverPPStepper, order=3), step_times=_starts,
               nfe_per_step=(1, 1), multistep=True, paper="Lu et al. 2022b, DPM-Solver++ multistep 3M",
               feature_sets=ONE_NFE_FEATURE_SETS),
    SolverSpec("heun", HeunStepper, step_times=_heun_times, nfe_per_step=(2, 2), multistep=False,
               paper="Karras et al. 2022, EDM (NeurIPS), Algorithm 1", feature_sets=("edm",)),
)}


# The solvers a search and its baselines enumerate. Stochastic DDIM is left out: it is the sampler AYS's KLUB is
# derived for, not a fast one (each ancestral step drops the posterior variance of x0, see the Gaussian variance
# test in tests/test_solvers.py; not yet measured on digits), and its fresh noise per step would make the
# predictor's FID records noisier; it stays one `solver=` / `sampler:ddim_eta1` away.
ODE_SOLVERS: tuple[str, ...] = tuple(sorted(n for n, spec in SOLVER_REGISTRY.items() if not spec.stochastic))

# The registry name of each solver function, for nfe_of (ddim: its deterministic entry).
_FUNCTION_NAMES = ((ddim, "ddim"), (dpm_solver, "dpm_solver"), (dpm_solver_pp, "dpm_solver++"), (heun, "heun"))


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
    name = next((n for f, n in _FUNCTION_NAMES if f is solver), None) if callable(solver) else None
    spec = get_solver(name or solver)
    if not spec.variable_order:
        return spec.default_nfe_per_step * n_steps
    if orders is None:
        raise SolverError(f"{spec.name} needs one order per step: {n_steps} steps, orders=None")
    return sum(spec.step_nfes(n_steps, orders))
