"""IIA — Improved Integration Approximation (Zhang, Kenta, Kleijn, ICLR 2024): per-step correction coefficients
fitted once, offline, and reused at sampling time at no extra NFE.

Method (PAPERS.md §3). Step i of a solver maps the state z_i at t_i to its plain update; the solver's stepper also
exposes correction features f_{i,k} (solvers.IIA_FEATURE_SETS: the step's gradient terms and differences of
consecutive denoiser outputs, each scaled by its natural coefficient so that c = O(1)). The IIA step is
    z_{i+1} = update_i + Σ_k c_{i,k} f_{i,k}                                       (solvers.corrected)
and c_i minimises the batch mean of ‖update_i + Σ_k c_{i,k} f_{i,k} − ref_i‖², where ref_i is the same solver run
from z_i to t_{i+1} with M fine, λ-uniform sub-steps (`fine_reference`). With K ≤ 3 features this is a tiny linear
least-squares problem with a closed form: the normal equations G c = b with G_kl = mean ⟨f_k, f_l⟩ and
b_k = mean ⟨f_k, ref − update⟩, accumulated in float64, scaled to a unit diagonal (Jacobi) and solved with a ridge
ρ·I whose ρ is chosen from a small grid on a held-out batch of separate noise (`fit_step`). Steps are fitted in
order, each on the states the corrected sampler itself visits (`fit_coefficients`), so that the history of a
multistep solver is the one it will see at sampling time.

Conventions. Denoisers as in solvers.py: D(x, t) → x0, one callable or one per NFE (a model schedule). The fine
reference of a step uses the step's own NFE denoisers, repeated in every sub-step, or one `reference` callable
(e.g. a larger zoo member). A multistep solver's fine run starts fresh from z_i. Errors are means over samples of
the squared norm ‖·‖² of the whole sample (not per element). Coefficients are tied to the solver, the times, the
orders and the per-NFE denoisers: refit when any changes. Lower local error need not mean a better FID (the paper
warns so): validate on FID.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .noise_schedule import VPSchedule
from .solvers import SolverSpec, Stepper, corrected, get_solver, snap_times

# Ridges ρ tried on the held-out batch; ρ·I is added to the unit-diagonal Gram matrix, so ρ is unit-free.
DEFAULT_RIDGES: tuple[float, ...] = (0.0, 1e-8, 1e-6, 1e-4, 1e-2)
# A Gram matrix with a larger condition number is treated as singular: plain least squares (ρ = 0) is not tried.
MAX_CONDITION = 1e10
# The ridge used when a singular Gram meets a grid without a positive ridge.
FALLBACK_RIDGE = 1e-8


class IIAError(UserError, ValueError):
    """Bad input to an IIA fit (shapes, non-finite values, sub-steps); a ValueError too."""


class IIAFitWarning(UserWarning):
    """A least-squares fit was singular or ill-conditioned and fell back to a ridge."""


def _spec(solver) -> SolverSpec:
    return solver if isinstance(solver, SolverSpec) else get_solver(solver)


def mean_sq_error(x: Tensor, ref: Tensor) -> float:
    """Mean over samples of ‖x − ref‖² (float64)."""
    diff = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return diff.square().sum(1).mean().item()


# ----------------------------------------------------------------------------------------------- references
def fine_times(noise_schedule: VPSchedule, t: float, t_next: float, M: int) -> Tensor:
    """M + 1 times from t to t_next, uniform in λ (half-logSNR), the two ends exact (float64)."""
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise IIAError(f"the number of fine sub-steps M must be a positive integer, got {M!r}")
    lam = noise_schedule.lambda_(torch.tensor([t, t_next], dtype=torch.float64))
    ts = noise_schedule.t_of_lambda(torch.linspace(lam[0].item(), lam[1].item(), M + 1, dtype=torch.float64))
    ts[0], ts[-1] = t, t_next
    return ts


def fine_reference(solver, denoisers, z: Tensor, t: float, t_next: float, noise_schedule: VPSchedule, *,
                   order: int | None = None, M: int = 10) -> Tensor:
    """The same solver run from z at t to t_next with M λ-uniform sub-steps: IIA's target for one coarse step.

    denoisers: the step's own NFE denoisers (a list with one per NFE of the step, repeated in every sub-step) or
    one callable (e.g. a larger reference member). order: the step's NFEs (dpm_solver's order; default the
    solver's). A multistep solver starts fresh from z (its history is built inside the sub-steps)."""
    spec = _spec(solver)
    if spec.stochastic:
        raise IIAError(f"{spec.name} is stochastic: IIA needs a deterministic (ODE) solver")
    nfe = spec.uniform_nfe_per_step(order)
    if not callable(denoisers):
        denoisers = list(denoisers)
        if len(denoisers) != nfe:
            raise IIAError(f"a {spec.name} step of {nfe} NFE(s) needs {nfe} denoiser(s), one per NFE, or one "
                           f"callable; got {len(denoisers)}")
        denoisers = denoisers * M
    sub_ts = fine_times(noise_schedule, t, t_next, M)
    try:
        sub_ts = snap_times(sub_ts, noise_schedule)
    except ValueError as e:
        raise IIAError(f"{M} fine sub-steps between t={t} and t={t_next} collide in float32 ({e}); use fewer")
    return spec.run(denoisers, z, sub_ts, noise_schedule, [nfe] * M)


@torch.no_grad()
def fine_solution(solver, denoisers, ts, orders, noise_schedule: VPSchedule, x: Tensor, *, fine_steps: int = 200,
                  reference=None) -> Tensor:
    """A fine reference of a whole sampler from x: every coarse step replaced by its fine_reference from the
    previous fine result, ⌈fine_steps / steps⌉ sub-steps each (≈ fine_steps in all)."""
    run = _spec(solver).stepper(denoisers, ts, noise_schedule, orders)
    M = math.ceil(fine_steps / run.n_steps)
    for i in range(run.n_steps):
        x = fine_reference(solver, step_reference(run, reference, i), x, run.ts[i], run.ts[i + 1], noise_schedule,
                           order=run.nfes[i], M=M)
    return x


def step_reference(run: Stepper, reference, i: int):
    """The fine reference's denoisers for step i. `reference`: None — the step's own denoisers; one callable —
    it for every step (e.g. a larger member); a sequence with one denoiser per NFE of the schedule — its entries
    for step i (e.g. the routed net in place of a multi-decoder stage, which may not run between NFE times)."""
    if reference is None:
        return run.step_denoisers(i)
    if callable(reference):
        return reference
    return list(reference)[run.first_nfe[i]:run.first_nfe[i] + run.nfes[i]]


@torch.no_grad()
def sampler_error(solver, denoisers, ts, orders, noise_schedule: VPSchedule, x: Tensor, *, coefficients=None,
                  feature_set: str | None = None, fine_steps: int = 200, reference=None) -> float:
    """Held-out error of a plain (coefficients None) or IIA-corrected sampler: mean ‖x_N − x_ref‖² of its final
    state against `fine_solution` from the same noise x (pass noise not used in the fit)."""
    out = _spec(solver).run(denoisers, x, ts, noise_schedule, orders, coefficients=coefficients,
                            feature_set=feature_set)
    return mean_sq_error(out, fine_solution(solver, denoisers, ts, orders, noise_schedule, x, fine_steps=fine_steps,
                                            reference=reference))


# ----------------------------------------------------------------------------------------------- one step
@dataclass
class StepFit:
    """The fit of one step: its coefficients (one per feature) and diagnostics.

    condition: condition number of the unit-diagonal Gram matrix of the non-zero features (None: all were zero);
    ridge: the chosen ridge ρ; fallback: the Gram was singular or ill-conditioned, so ρ = 0 was not tried;
    fit_/held_ before/after: mean ‖·‖² residual against the fine reference of the plain / corrected step, on the fit
    batch and on the held-out batch (None without one); zero_features: indices of identically zero features."""

    coefficients: list[float]
    condition: float | None
    ridge: float
    fallback: bool
    fit_before: float
    fit_after: float
    held_before: float | None = None
    held_after: float | None = None
    zero_features: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["condition"] is not None and not math.isfinite(d["condition"]):
            d["condition"] = None if math.isnan(d["condition"]) else "inf"   # strict JSON has no inf / nan
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepFit":
        d = dict(d)
        if d.get("condition") == "inf":
            d["condition"] = math.inf
        return cls(**d)


def _design(update: Tensor, features: Sequence[Tensor], target: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """(F, r): the features as rows of a float64 (K, N·D) matrix and the residual r = target − update, flat."""
    for name, v in [("target", target)] + [(f"feature {k}", f) for k, f in enumerate(features)]:
        if v.shape != update.shape:
            raise IIAError(f"IIA fit{where}: {name} has shape {tuple(v.shape)}, the update {tuple(update.shape)}")
    r = (target.to(torch.float64) - update.to(torch.float64)).reshape(-1)
    F = torch.stack([f.to(torch.float64).reshape(-1) for f in features]) if features else r.new_zeros(0, r.numel())
    if not (torch.isfinite(r).all() and torch.isfinite(F).all()):
        raise IIAError(f"IIA fit{where}: the update, target or features are not finite")
    return F, r


def _residual(F: Tensor, r: Tensor, c: Tensor, n: int) -> float:
    """Mean over the n samples of ‖r − Σ c_k F_k‖² (c: the coefficients, on the CPU)."""
    return ((r - c.to(F.device) @ F).square().sum() / n).item()


def fit_step(update: Tensor, features: Sequence[Tensor], target: Tensor, *,
             held_out: tuple[Tensor, Sequence[Tensor], Tensor] | None = None,
             ridges: Sequence[float] = DEFAULT_RIDGES, max_condition: float = MAX_CONDITION,
             step: int | None = None) -> StepFit:
    """Closed-form least squares for c minimising mean ‖update + Σ_k c_k f_k − target‖² (batch mean).

    held_out: (update, features, target) of a separate batch of noise; the relative ridge ρ (from `ridges`) with
    the smallest held-out residual is chosen (without one: the smallest ρ). A Gram matrix with condition number
    > max_condition falls back to the positive ridges, with an IIAFitWarning. Identically zero features get c = 0
    exactly. step: only names the step in messages."""
    where = "" if step is None else f" of step {step}"
    if not ridges or any(isinstance(p, bool) or not isinstance(p, numbers.Real) or not p >= 0 for p in ridges):
        raise IIAError(f"ridges must be a non-empty list of numbers >= 0, got {list(ridges)}")
    n = update.shape[0]
    F, r = _design(update, features, target, where)
    zero = [k for k in range(F.shape[0]) if not F[k].any()]
    active = [k for k in range(F.shape[0]) if k not in zero]
    held = None
    if held_out is not None:
        held = (*_design(*held_out, where=f"{where} (held-out batch)"), held_out[0].shape[0])
        if held[0].shape[0] != F.shape[0]:
            raise IIAError(f"IIA fit{where}: {held[0].shape[0]} held-out features but {F.shape[0]} fit features")

    coefficients, condition, ridge, fallback = torch.zeros(F.shape[0], dtype=torch.float64), None, 0.0, False
    if active:
        G, b = F[active] @ F[active].T / n, F[active] @ r / n   # normal equations in float64 (Zhang et al. 2024, §3)
        G, b = G.cpu(), b.cpu()                               # K×K: solved on the CPU, whatever the batch's device
        norms = G.diagonal().sqrt()                           # unit-diagonal (Jacobi) scaling: features of any size
        G, b = G / torch.outer(norms, norms), b / norms       # compare, and the ridge ρ is relative to their size
        condition = torch.linalg.cond(G).item()
        grid = sorted(set(float(p) for p in ridges))
        if not condition <= max_condition:
            fallback = True
            grid = [p for p in grid if p > 0] or [FALLBACK_RIDGE]
            warnings.warn(f"IIA fit{where}: the Gram matrix of the features is singular or ill-conditioned "
                          f"(condition number {condition:.3g} > {max_condition:.0e}); falling back to a ridge "
                          f"from {grid}", IIAFitWarning, stacklevel=2)
        candidates = []
        for p in grid:
            c = torch.zeros_like(coefficients)
            c[active] = torch.linalg.solve(G + p * torch.eye(len(active), dtype=torch.float64), b) / norms
            if torch.isfinite(c).all():
                score = _residual(held[0], held[1], c, held[2]) if held is not None else 0.0
                candidates.append((score, p, c))
        if not candidates:
            raise IIAError(f"IIA fit{where}: no ridge in {grid} gave finite coefficients")
        _, ridge, coefficients = min(candidates, key=lambda cand: cand[0])   # ties: the smallest ridge

    zeros = torch.zeros_like(coefficients)
    return StepFit(coefficients=coefficients.tolist(), condition=condition, ridge=ridge, fallback=fallback,
                   fit_before=_residual(F, r, zeros, n), fit_after=_residual(F, r, coefficients, n),
                   held_before=None if held is None else _residual(held[0], held[1], zeros, held[2]),
                   held_after=None if held is None else _residual(held[0], held[1], coefficients, held[2]),
                   zero_features=zero)


# ----------------------------------------------------------------------------------------------- a whole sampler
@dataclass
class IIAFit:
    """Fitted IIA coefficients of one sampler (solver, snapped times, orders, feature set), with per-step
    diagnostics; plain data (to_dict is JSON-able, from_dict reads it back)."""

    solver: str
    feature_set: str
    features: list[str]
    times: list[float]
    orders: list[int]
    sub_steps: int
    steps: list[StepFit]

    @property
    def coefficients(self) -> list[list[float]]:
        """One list per step, one coefficient per feature: what SolverSpec.run(coefficients=...) takes."""
        return [s.coefficients for s in self.steps]

    def run(self, denoisers, x: Tensor, noise_schedule: VPSchedule) -> Tensor:
        """The corrected sampler from x (the denoisers must be those the coefficients were fitted for)."""
        return get_solver(self.solver).run(denoisers, x, torch.tensor(self.times, dtype=torch.float64), noise_schedule,
                                           self.orders, coefficients=self.coefficients, feature_set=self.feature_set)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "steps"}, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "IIAFit":
        return cls(**{**d, "steps": [StepFit.from_dict(s) for s in d["steps"]]})


def _advance_with_reference(spec: SolverSpec, run: Stepper, state: Tensor, reference, noise_schedule: VPSchedule,
                            M: int):
    """Take run's next step from state: (update, features) in the stepper's state space, and the fit data
    (update, features, fine reference) in x space."""
    i = run.i
    z = run.to_x(state, i)
    target = fine_reference(spec, step_reference(run, reference, i), z, run.ts[i], run.ts[i + 1], noise_schedule,
                            order=run.nfes[i], M=M)
    update, features = run.step(state)
    fit_data = (run.to_x(update, i + 1), [run.to_x(f, i + 1) for f in features], target)
    return update, features, fit_data


@torch.no_grad()
def fit_coefficients(solver, denoisers, ts, orders, noise_schedule: VPSchedule, x_fit: Tensor, x_held: Tensor,
                     feature_set: str, M: int = 10, *, reference=None,
                     ridges: Sequence[float] = DEFAULT_RIDGES,
                     on_step: Callable[[int, "StepFit"], None] | None = None) -> IIAFit:
    """Fit IIA coefficients step by step (Zhang et al. 2024, §3).

    x_fit / x_held: starting noise at ts[0] of the fit batch and of the held-out batch (separate noise, which picks
    the ridge). Step i is fitted on the states the corrected sampler visits, then both batches advance with the
    corrected step i. M: fine sub-steps per step; reference: one callable for every fine reference (default: each
    step's own denoisers); on_step(i, fit of step i) after each step (progress)."""
    spec = _spec(solver)
    if feature_set is None:
        supported = ", ".join(spec.feature_sets) or "none"
        raise IIAError(f"an IIA fit needs a feature_set; {spec.name} supports: {supported}")
    if x_fit.shape[1:] != x_held.shape[1:]:
        raise IIAError(f"fit and held-out batches differ in sample shape: {tuple(x_fit.shape[1:])} vs "
                       f"{tuple(x_held.shape[1:])}")
    if x_fit.shape == x_held.shape and torch.equal(x_fit, x_held):
        raise IIAError("the held-out batch must be separate noise, not the fit batch")
    fit_run = spec.stepper(denoisers, ts, noise_schedule, orders, feature_set=feature_set)
    held_run = spec.stepper(denoisers, ts, noise_schedule, orders, feature_set=feature_set)
    fit_state, held_state = fit_run.to_state(x_fit), held_run.to_state(x_held)
    steps = []
    for i in range(fit_run.n_steps):
        fit_update, fit_features, fit_data = _advance_with_reference(spec, fit_run, fit_state, reference,
                                                                     noise_schedule, M)
        held_update, held_features, held_data = _advance_with_reference(spec, held_run, held_state, reference,
                                                                        noise_schedule, M)
        result = fit_step(*fit_data, held_out=held_data, ridges=ridges, step=i)
        fit_state = corrected(fit_update, fit_features, result.coefficients)
        held_state = corrected(held_update, held_features, result.coefficients)
        steps.append(result)
        if on_step is not None:
            on_step(i, result)
    return IIAFit(solver=spec.name, feature_set=feature_set, features=list(spec.feature_names(feature_set)),
                  times=list(fit_run.ts), orders=list(fit_run.nfes), sub_steps=M, steps=steps)
