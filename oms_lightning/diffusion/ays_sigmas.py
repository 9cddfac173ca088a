"""Align Your Steps in σ-space: the views of the VP model, and schedules of noise levels (checked, the EDM and
closed-form Gaussian ones, refined and resampled). Part of the AYS method; `oms_lightning.diffusion.ays` re-exports
everything here.

Conventions
-----------
* σ-space ("variance exploding" view of the VP model): x̃ = x_t/α_t = x0 + σ ε with σ = σ_t/α_t = exp(−λ_t).
  A *σ-denoiser* is a callable D(x̃, σ) → x0 with σ a float64 tensor of shape (B,) on x̃'s device.
* A schedule is a 1-D float64 tensor of noise levels from noisy to clean, σ_max = sigmas[0] > … > sigmas[-1] =
  σ_min > 0 (the project's one direction of time; no trailing 0).
* Window i is (lo, hi) = (sigmas[i+1], sigmas[i]); the stochastic-DDIM step over it freezes the denoiser at hi.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError
from .noise_schedule import VPSchedule

SigmaDenoiser = Callable[[Tensor, Tensor], Tensor]


class AYSError(UserError, ValueError):
    """Bad input to the schedule optimiser (a ValueError too, so plain callers can catch it as one)."""


# ============================================================================================ σ-space views
def sigma_of_t(noise_schedule: VPSchedule, t) -> Tensor:
    """σ = σ_t/α_t = exp(−λ_t) (float64)."""
    return noise_schedule.edm_sigma(torch.as_tensor(t, dtype=torch.float64))


def t_of_sigma(noise_schedule: VPSchedule, sigma, check: bool = True) -> Tensor:
    """VP time of a σ-space noise level (float64); with `check`, σ outside the schedule's [σ(t_min), σ(1)] raises."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if (sigma <= 0).any() or not torch.isfinite(sigma).all():
        raise AYSError(f"noise levels must be finite and > 0, got {sigma.tolist()}")
    t = noise_schedule.t_of_edm_sigma(sigma)
    if check:
        lo, hi = sigma_of_t(noise_schedule, noise_schedule.t_min).item(), sigma_of_t(noise_schedule, 1.0).item()
        slack = 1e-9 * hi
        if sigma.min().item() < lo * (1 - 1e-9) or sigma.max().item() > hi + slack:
            raise AYSError(f"noise levels {sigma.min().item():.6g}..{sigma.max().item():.6g} lie outside the "
                           f"schedule's range [{lo:.6g}, {hi:.6g}] (t in [t_min={noise_schedule.t_min}, 1]); "
                           f"choose sigma_min/sigma_max inside it")
        t = t.clamp(noise_schedule.t_min, 1.0)          # round-trip ulps only
    return t


def sigma_denoiser(vp_denoiser, noise_schedule: VPSchedule) -> SigmaDenoiser:
    """The σ-space denoiser of a VP data-prediction denoiser D_vp(x_t, t) (e.g. an EpsDenoiser around an ε-net).

    x_t = α_t x̃ at t = t(σ), so D(x̃, σ) = D_vp(α_t x̃, t); for an ε-net this is x̃ − σ ε̂(α_t x̃, t) because
    D_vp = (x_t − σ_t ε̂)/α_t and σ = σ_t/α_t.
    """
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        t = noise_schedule.t_of_edm_sigma(torch.as_tensor(sigma, dtype=torch.float64, device=x.device))
        t = t.clamp(noise_schedule.t_min, 1.0)
        alpha = noise_schedule.alpha(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return vp_denoiser(alpha * x, t)
    return denoise


def gaussian_sigma_denoiser(std: float) -> SigmaDenoiser:
    """Exact denoiser for x0 ~ N(0, std² I): E[x0 | x̃] = std²/(std² + σ²) x̃ (Gaussian conditioning)."""
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (std**2 / (std**2 + sigma**2)).to(x.dtype) * x
    return denoise


# ============================================================================================ schedules
def _check_c(c: float) -> float:
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise AYSError(f"the data scale c must be a finite number > 0, got {c!r}")
    return float(c)


def _check_steps(steps, least: int, what: str = "steps") -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < least:
        raise AYSError(f"{what} must be an integer >= {least}, got {steps!r}")
    return int(steps)


def _check_ends(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise AYSError(f"need 0 < sigma_min < sigma_max (finite), got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return float(sigma_min), float(sigma_max)


def validate_sigmas(sigmas) -> Tensor:
    """A float64 CPU copy of a schedule, checked: 1-D, ≥ 2 entries, finite, > 0, strictly decreasing."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().clone()
    if s.ndim != 1 or s.numel() < 2:
        raise AYSError(f"sigmas must be a 1-D sequence with at least 2 entries, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise AYSError(f"sigmas must be finite and > 0, got {s.tolist()}")
    if not (s[1:] < s[:-1]).all():
        bad = int(torch.nonzero(s[1:] >= s[:-1])[0])
        raise AYSError(f"sigmas must be strictly decreasing (noisy → clean); sigmas[{bad}]={s[bad].item()} "
                       f"<= sigmas[{bad + 1}]={s[bad + 1].item()}")
    return s


def edm_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM ρ-spacing (Karras et al. 2022, eq. 5), steps + 1 levels from sigma_max down to sigma_min."""
    sigma_min, sigma_max = _check_ends(sigma_min, sigma_max)
    steps = _check_steps(steps, 1)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min
    return s


def kl_optimal_sigmas(sigma_min: float, sigma_max: float, steps: int, c: float = 0.5) -> Tensor:
    """The paper's closed-form "KL-optimal" schedule for Gaussian data of std c: arctan(σ/c) uniform in the step.

    σ_i = c tan(θ_max + i/N (θ_min − θ_max)), θ = arctan(σ/c) (PAPERS.md §2, "closed-form Gaussian-data optimum
    for DDIM"). Derivation (ours): deterministic DDIM is Euler on dx̃/dσ = (x̃ − D)/σ. For x0 ~ N(0, c²) the
    exact flow scales x̃ by √((c²+a²)/(c²+b²)) from σ = b to a, one Euler step by (c² + ab)/(c² + b²); with
    σ = c tan θ their ratio is exactly cos(θ_b − θ_a). The generated std is thus the true one times Π cos Δθ_i,
    and Σ −log cos Δθ_i under fixed Σ Δθ_i is convex, so equal Δθ_i is optimal for every N. NB this is the
    optimum of the *ODE/Euler* error; the stochastic-DDIM KLUB optimum is `klub_optimal_gaussian_sigmas`.
    """
    sigma_min, sigma_max = _check_ends(sigma_min, sigma_max)
    steps, c = _check_steps(steps, 1), _check_c(c)
    th_max, th_min = math.atan(sigma_max / c), math.atan(sigma_min / c)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    s = c * torch.tan(th_max + u * (th_min - th_max))
    s[0], s[-1] = sigma_max, sigma_min
    return s


def klub_optimal_gaussian_sigmas(sigma_min: float, sigma_max: float, steps: int, c: float = 0.5) -> Tensor:
    """Exact KLUB minimiser for Gaussian data of std c: ℓ = log(1 + c²/σ²) uniform in the step.

    Derivation (ours): with y = 1 + c²/σ² the window normaliser is Z = (r − 1 − log r)/(2c⁴), r = y_lo/y_hi (see
    `proposal_normaliser`), and the Gaussian KLUB is d c⁴ Σ Z. Π r_i = y(σ_min)/y(σ_max) is fixed and
    r ↦ r − 1 − log r = e^u − 1 − u (u = log r) is convex, so all Δℓ_i equal is the unique optimum for every N.
    ℓ is twice the per-dimension mutual information between x0 and x̃_σ: the optimum gives each step equal
    information. σ = c/√(expm1(ℓ)).
    """
    sigma_min, sigma_max = _check_ends(sigma_min, sigma_max)
    steps, c = _check_steps(steps, 1), _check_c(c)
    l_max = math.log1p(c**2 / sigma_max**2)         # small ℓ at the noisy end: log1p keeps it exact
    l_min = math.log1p(c**2 / sigma_min**2)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    s = c / torch.sqrt(torch.expm1(l_max + u * (l_min - l_max)))
    s[0], s[-1] = sigma_max, sigma_min
    return s


def insert_log_midpoints(sigmas) -> Tensor:
    """Double the step count: a geometric mean √(σ_i σ_{i+1}) between every neighbour pair (AYS refinement)."""
    s = validate_sigmas(sigmas)
    out = torch.empty(2 * len(s) - 1, dtype=torch.float64)
    out[0::2] = s
    out[1::2] = torch.sqrt(s[:-1] * s[1:])
    return out


def interpolate_log_linear(sigmas, n: int) -> Tensor:
    """Resample a schedule to n steps: log σ linear in the normalised step index j/n (AYS, other step counts).

    Position j/n maps to source index j·m/n (m = source steps), computed in integers so n = m returns the input
    exactly. Linear interpolation of a strictly decreasing sequence is strictly decreasing.
    """
    s = validate_sigmas(sigmas)
    n = _check_steps(n, 1, "the number of steps n")
    m = len(s) - 1
    log_s = torch.log(s)
    out = torch.empty(n + 1, dtype=torch.float64)
    for j in range(n + 1):
        k, rem = divmod(j * m, n)
        if rem == 0:
            out[j] = s[k]
        else:
            f = rem / n
            out[j] = torch.exp((1 - f) * log_s[k] + f * log_s[k + 1])
    return out
