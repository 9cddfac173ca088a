"""Align Your Steps (Sabour, Fidler, Kreis; ICML 2024): optimise a sampling schedule by minimising the KLUB.

Pure functions over a σ-space denoiser, data samples and noise levels; no Lightning. See PAPERS.md §2.
The method is split by concept, and this module re-exports the other two, so `from oms_lightning.diffusion.ays
import X` works for all of it:
  ays_sigmas.py  σ-space views of the VP model and schedules of noise levels (the conventions: σ-denoisers,
                 noisy-to-clean schedules, windows), the EDM and closed-form Gaussian schedules, refinement;
  ays_klub.py    the KLUB (the paper's Girsanov bound for stochastic DDIM) and its Monte-Carlo estimate;
  ays.py         (this module) the coordinate search on the KLUB, `optimize`, and its resumable records.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .ays_klub import (KLUBEstimate, MCDraw, _check_data, denoise_upper, gaussian_klub, importance_weight, klub,
                       proposal_density, proposal_normaliser, sample_proposal, window_terms)
from .ays_sigmas import (AYSError, SigmaDenoiser, _check_c, _check_ends, _check_steps, edm_sigmas,
                         gaussian_sigma_denoiser, insert_log_midpoints, interpolate_log_linear, kl_optimal_sigmas,
                         klub_optimal_gaussian_sigmas, sigma_denoiser, sigma_of_t, t_of_sigma, validate_sigmas)

__all__ = [
    # ays_sigmas
    "AYSError", "SigmaDenoiser", "edm_sigmas", "gaussian_sigma_denoiser", "insert_log_midpoints",
    "interpolate_log_linear", "kl_optimal_sigmas", "klub_optimal_gaussian_sigmas", "sigma_denoiser", "sigma_of_t",
    "t_of_sigma", "validate_sigmas",
    # ays_klub
    "KLUBEstimate", "MCDraw", "denoise_upper", "gaussian_klub", "importance_weight", "klub", "proposal_density",
    "proposal_normaliser", "sample_proposal", "window_terms",
    # the search
    "LevelRecord", "OptimizeResult", "SweepRecord", "candidate_fractions", "optimize", "record_seed",
]


# ============================================================================================ coordinate search
@dataclass
class SweepRecord:
    """One sweep of one level: the schedule after it, its KLUB (fixed record seed) and quality (None if unused)."""
    sweep: int
    klub: float
    quality: float | None
    sigmas: list[float]


@dataclass
class LevelRecord:
    """One refinement level: sweep 0 is its starting schedule; chosen_sweep is set when the level is finished."""
    steps: int
    sweeps: list[SweepRecord] = field(default_factory=list)
    chosen_sweep: int | None = None

    @property
    def sigmas(self) -> Tensor:
        """The chosen schedule (the latest one while the level is still running)."""
        i = self.chosen_sweep if self.chosen_sweep is not None else -1
        return torch.tensor(self.sweeps[i].sigmas, dtype=torch.float64)


@dataclass
class OptimizeResult:
    """Result of `optimize`, and its resumable state at sweep granularity while `done` is False.

    levels[k] holds steps·2^k; `widths` is the per-point candidate window (fraction of the log-gap between the
    neighbours) of the running level; `config` guards a resume against different settings. Plain data:
    to_dict()/from_dict() round-trip through JSON.
    """
    config: dict
    levels: list[LevelRecord] = field(default_factory=list)
    widths: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def sigmas(self) -> Tensor:
        """The finest level's chosen schedule."""
        return self.levels[-1].sigmas

    def schedule(self, n: int) -> Tensor:
        """A schedule of n steps: the level with exactly n steps if any, else log-linear from the finest."""
        exact = [lv for lv in self.levels if lv.steps == n]
        return exact[0].sigmas if exact else interpolate_log_linear(self.sigmas, n)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeResult":
        levels = [LevelRecord(lv["steps"], [SweepRecord(**sw) for sw in lv["sweeps"]], lv["chosen_sweep"])
                  for lv in d["levels"]]
        return cls(dict(d["config"]), levels, list(d["widths"]), bool(d["done"]))


def candidate_fractions(u: float, width: float, n_candidates: int) -> list[float]:
    """Candidate positions as fractions of the log-gap between the neighbours: the current u first (so ties keep
    it), then u ∓ δ, u ∓ 2δ, … outwards (δ = width/(n − 1), so they span a window of the given width centred on
    u), clipped to stay 1/(2n) away from the neighbours. width = 1 around the gap's middle is the paper's 11 points
    across the gap; narrower windows refine a point that has stopped moving.
    """
    margin, m = 1 / (2 * n_candidates), n_candidates - 1
    delta = width / max(m, 1)
    offsets = [sign * k * delta for k in range(1, m // 2 + 2) for sign in (-1, 1)][:m]
    return [u] + [min(max(u + o, margin), 1 - margin) for o in offsets]


def _pass_seed(seed: int, level: int, sweep: int, parity: int) -> int:
    """A seed for one (level, sweep, parity) pass, so a resumed run draws exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, level, sweep, parity]).generate_state(1)[0])


def record_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, 2**31 - 1]).generate_state(1)[0])


@dataclass
class _Search:
    """Everything a sweep needs; its methods are the steps of the coordinate search."""
    denoiser: SigmaDenoiser
    data: Tensor
    c: float
    n_mc: int
    seed: int
    n_candidates: int
    shrink: float
    batch_size: int
    device: object

    def best_point(self, draw: MCDraw, s: Tensor, i: int, width: float) -> tuple[float, int]:
        """The best of the candidates for interior point i between s[i+1] and s[i-1]; returns (σ, index chosen)."""
        lo, hi = s[i + 1].item(), s[i - 1].item()
        log_lo, log_gap = math.log(lo), math.log(hi) - math.log(lo)
        u_now = (math.log(s[i].item()) - log_lo) / log_gap
        cands = [math.exp(log_lo + f * log_gap) for f in candidate_fractions(u_now, width, self.n_candidates)]
        cands[0] = s[i].item()                                        # the current value, exactly
        d_hi = denoise_upper(self.denoiser, draw, hi, self.batch_size)    # shared by every upper window
        cost = (window_terms(self.denoiser, draw, [lo] * len(cands), cands, self.c, self.batch_size).mean(1)
                + window_terms(self.denoiser, draw, cands, [hi] * len(cands), self.c, self.batch_size, d_hi).mean(1))
        k = int(torch.argmin(cost))
        return cands[k], k

    def new_width(self, width: float, k: int) -> float:
        """Pattern-search rule: stayed → narrow, picked an outermost candidate → widen, otherwise keep."""
        if k == 0:
            return max(width * self.shrink, 1e-6)
        if k >= self.n_candidates - 2:
            return min(width / self.shrink, 1.0)
        return width

    def sweep(self, s: Tensor, widths: list[float], movable: list[int], level: int, sweep: int):
        """Even points, then odd points; points of one parity only see fixed neighbours, so order inside is free."""
        s, widths = s.clone(), list(widths)
        for parity in (0, 1):
            points = [i for i in movable if i % 2 == parity]
            if not points:
                continue
            draw = MCDraw.draw(self.data, self.n_mc, _pass_seed(self.seed, level, sweep, parity), self.device)
            for i in points:
                s[i], k = self.best_point(draw, s, i, widths[i])
                widths[i] = self.new_width(widths[i], k)
        return s, widths


def _stop_level(level: LevelRecord, use_quality: bool, max_sweeps: int, patience: int, tol: float) -> bool:
    """Stop after max_sweeps, or when the metric (quality if given, else KLUB) has not improved by a relative tol
    for `patience` sweeps."""
    if level.sweeps[-1].sweep >= max_sweeps:
        return True
    metric = [sw.quality if use_quality else sw.klub for sw in level.sweeps]
    best, best_at = metric[0], 0
    for j, v in enumerate(metric[1:], 1):
        if v < best - tol * abs(best):
            best, best_at = v, j
    return len(metric) - 1 - best_at >= patience


def _choose(level: LevelRecord, use_quality: bool) -> int:
    metric = [sw.quality if use_quality else sw.klub for sw in level.sweeps]
    return level.sweeps[int(np.argmin(metric))].sweep


def optimize(denoiser_sigma_fn: SigmaDenoiser, data_samples: Tensor, sigma_min: float, sigma_max: float,
             steps: int = 10, c: float = 0.5, n_mc: int = 8192, seed: int = 0,
             quality_fn: Callable[[Tensor], float] | None = None,
             on_sweep: Callable[[OptimizeResult], None] | None = None,
             state: OptimizeResult | dict | None = None, *, refinements: int = 2, n_candidates: int = 11,
             max_sweeps: int = 30, patience: int = 3, tol: float = 1e-4, shrink: float = 0.5, rho: float = 7.0,
             init=None, batch_size: int = 1024, device=None) -> OptimizeResult:
    """AYS schedule search (PAPERS.md §2): coordinate search on the KLUB, then refinement by log-midpoints.

    Level 0 starts from `init` or the EDM ρ-spacing with `steps` steps and fixed ends; each sweep moves the even,
    then the odd interior points to the best of `n_candidates` positions between their neighbours (current one
    included, all scored on the same draw). Level k+1 inserts log-midpoints into level k's chosen schedule and
    moves only the new points; `refinements` levels follow level 0 (10 → 20 → 40 by default).

    Per level, sweep 0 is the start; every sweep records the KLUB (one fixed seed for all sweeps, so the numbers
    compare) and quality_fn(sigmas) if given (lower is better; it must draw its own, fixed noise). The level stops
    when its metric — quality if given, since the KLUB keeps falling after FID is best, else the KLUB — has not
    improved for `patience` sweeps, or after `max_sweeps`; the chosen sweep is the metric's argmin.

    on_sweep(snapshot) is called after every recorded sweep with a deep copy of the result-so-far; pass such a
    snapshot (or its to_dict()) back as `state` to resume: the run continues exactly as if uninterrupted.
    denoiser_sigma_fn(x̃, σ) is a σ-space denoiser (see `sigma_denoiser`); data_samples are real data in [-1, 1]
    (n_mc = 8192 of them per estimate, as in the paper), on `device` or where the denoiser runs.

    One deliberate addition to the paper: a point whose best candidate is its current value narrows its candidate
    window (`shrink`), one that picks an outermost candidate widens it again, so positions converge below the
    grid's 1/10-of-the-gap resolution; shrink = 1 keeps the paper's fixed grid over the whole gap.
    """
    sigma_min, sigma_max = _check_ends(float(sigma_min), float(sigma_max))
    steps, c = _check_steps(steps, 2), _check_c(c)
    _check_data(data_samples)
    config = {"sigma_min": sigma_min, "sigma_max": sigma_max, "steps": steps, "c": c,
              "n_mc": _check_steps(n_mc, 2, "n_mc"), "seed": int(seed),
              "refinements": _check_steps(refinements, 0, "refinements"),
              "n_candidates": _check_steps(n_candidates, 2, "n_candidates"), "shrink": float(shrink),
              "quality": quality_fn is not None}
    if not 0 < shrink <= 1:
        raise AYSError(f"shrink must lie in (0, 1], got {shrink}")
    res = _resume(state, config)
    search = _Search(denoiser_sigma_fn, data_samples, c, n_mc, int(seed), n_candidates, shrink, batch_size, device)

    def record(level: LevelRecord, sweep: int, s: Tensor):
        est = klub(denoiser_sigma_fn, data_samples, s, c, n_mc, record_seed(int(seed)), batch_size, device)
        q = float(quality_fn(s.clone())) if quality_fn is not None else None
        level.sweeps.append(SweepRecord(sweep, est.total, q, s.tolist()))
        if on_sweep is not None:
            on_sweep(copy.deepcopy(res))

    if not res.levels:
        s0 = validate_sigmas(init) if init is not None else edm_sigmas(sigma_min, sigma_max, steps, rho)
        if len(s0) != steps + 1 or s0[0] != sigma_max or s0[-1] != sigma_min:
            raise AYSError(f"init must have {steps + 1} levels from sigma_max={sigma_max} to sigma_min={sigma_min}")
        res.levels.append(LevelRecord(steps))
        res.widths = [1.0] * (steps + 1)
        record(res.levels[0], 0, s0)
    while not res.done:
        k, level = len(res.levels) - 1, res.levels[-1]
        if _stop_level(level, quality_fn is not None, max_sweeps, patience, tol):
            level.chosen_sweep = _choose(level, quality_fn is not None)
            if k == config["refinements"]:
                res.done = True
                if on_sweep is not None:
                    on_sweep(copy.deepcopy(res))
                break
            nxt = LevelRecord(level.steps * 2)
            res.levels.append(nxt)
            res.widths = [1.0] * (nxt.steps + 1)
            record(nxt, 0, insert_log_midpoints(level.sigmas))
            continue
        movable = list(range(1, level.steps)) if k == 0 else list(range(1, level.steps, 2))
        sweep = level.sweeps[-1].sweep + 1
        s, res.widths = search.sweep(torch.tensor(level.sweeps[-1].sigmas, dtype=torch.float64), res.widths,
                                     movable, k, sweep)
        record(level, sweep, s)
    return res


def _resume(state, config: dict) -> OptimizeResult:
    if state is None:
        return OptimizeResult(config)
    res = OptimizeResult.from_dict(state.to_dict() if isinstance(state, OptimizeResult) else state)
    diff = {k: (res.config.get(k), v) for k, v in config.items() if res.config.get(k) != v}
    if diff:
        raise AYSError("cannot resume: the saved state was made with different settings "
                       + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
    return res
