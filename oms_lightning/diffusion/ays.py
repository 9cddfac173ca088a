"""Align Your Steps (Sabour, Fidler, Kreis; ICML 2024): optimise a sampling schedule by minimising the KLUB.

Pure functions over a σ-space denoiser, data samples and noise levels; no Lightning. See PAPERS.md §2.

Conventions
-----------
* σ-space ("variance exploding" view of the VP model): x̃ = x_t/α_t = x0 + σ ε with σ = σ_t/α_t = exp(−λ_t).
  A *σ-denoiser* is a callable D(x̃, σ) → x0 with σ a float64 tensor of shape (B,) on x̃'s device.
* A schedule is a 1-D float64 tensor of noise levels from noisy to clean, σ_max = sigmas[0] > … > sigmas[-1] =
  σ_min > 0 (the project's one direction of time; no trailing 0).
* Window i is (lo, hi) = (sigmas[i+1], sigmas[i]); the stochastic-DDIM step over it freezes the denoiser at hi.

The KLUB (PAPERS.md §2; the paper's Girsanov bound for stochastic DDIM in σ-space)
----------------------------------------------------------------------------------
  KLUB = Σ_windows ∫_lo^hi σ⁻³ E‖D(x_σ, σ) − D(x_hi, hi)‖² dσ,   x_σ = x0 + σ ε,  x_hi = x_σ + √(hi² − σ²) ε′.
Derivation of the weight: the reverse VE SDE dx = −2σσ̇ ∇log p dt + √(2σσ̇) dw̄ has drift −(2σ̇/σ)(D − x); stochastic
DDIM is the same SDE with D frozen at the step's start. Girsanov: KL ≤ ½∫ ‖Δdrift‖²/g² dt = ∫ σ̇ σ⁻³ ‖ΔD‖² dt.

Gaussian data x0 ~ N(0, s² I_d) (used to test everything exactly)
----------------------------------------------------------------
D(x̃, σ) = s²/(s² + σ²) x̃, and one finds E‖ΔD‖² = d s⁴ (1/(σ² + s²) − 1/(hi² + s²)), so the KLUB integrand is
d s⁴ · g_s(σ) with g the importance density below: the proposal is exact for Gaussian data of std c.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .noise_schedule import VPSchedule

SigmaDenoiser = Callable[[Tensor, Tensor], Tensor]


class AYSError(UserError, ValueError):
    """Bad input to the schedule optimiser (a ValueError too, so plain callers can catch it as one)."""


# ============================================================================================ σ-space views
def sigma_of_t(schedule: VPSchedule, t) -> Tensor:
    """σ = σ_t/α_t = exp(−λ_t) (float64)."""
    return schedule.edm_sigma(torch.as_tensor(t, dtype=torch.float64))


def t_of_sigma(schedule: VPSchedule, sigma, check: bool = True) -> Tensor:
    """VP time of a σ-space noise level (float64); with `check`, σ outside the schedule's [σ(t_min), σ(1)] raises."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if (sigma <= 0).any() or not torch.isfinite(sigma).all():
        raise AYSError(f"noise levels must be finite and > 0, got {sigma.tolist()}")
    t = schedule.t_of_edm_sigma(sigma)
    if check:
        lo, hi = sigma_of_t(schedule, schedule.t_min).item(), sigma_of_t(schedule, 1.0).item()
        slack = 1e-9 * hi
        if sigma.min().item() < lo * (1 - 1e-9) or sigma.max().item() > hi + slack:
            raise AYSError(f"noise levels {sigma.min().item():.6g}..{sigma.max().item():.6g} lie outside the "
                           f"schedule's range [{lo:.6g}, {hi:.6g}] (t in [t_min={schedule.t_min}, 1]); "
                           f"choose sigma_min/sigma_max inside it")
        t = t.clamp(schedule.t_min, 1.0)          # round-trip ulps only
    return t


def sigma_denoiser(vp_denoiser, schedule: VPSchedule) -> SigmaDenoiser:
    """The σ-space denoiser of a VP data-prediction denoiser D_vp(x_t, t) (e.g. an EpsDenoiser around an ε-net).

    x_t = α_t x̃ at t = t(σ), so D(x̃, σ) = D_vp(α_t x̃, t); for an ε-net this is x̃ − σ ε̂(α_t x̃, t) because
    D_vp = (x_t − σ_t ε̂)/α_t and σ = σ_t/α_t.
    """
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        t = schedule.t_of_edm_sigma(torch.as_tensor(sigma, dtype=torch.float64, device=x.device))
        t = t.clamp(schedule.t_min, 1.0)
        alpha = schedule.alpha(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
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


# ============================================================================================ importance sampling
def _delta_y(lo: Tensor, hi: Tensor, c: float) -> Tensor:
    """r − 1 for r = y_lo/y_hi, y = 1 + c²/σ², written without cancellation: c²(hi² − lo²)/(lo² (hi² + c²))."""
    return c**2 * (hi - lo) * (hi + lo) / (lo**2 * (hi**2 + c**2))


def _r_minus_1_minus_log_r(delta: Tensor) -> Tensor:
    """δ − log(1 + δ); a Taylor series for small δ, where the difference cancels."""
    series = delta**2 * (1 / 2 - delta * (1 / 3 - delta * (1 / 4 - delta * (1 / 5 - delta / 6))))
    return torch.where(delta < 1e-3, series, delta - torch.log1p(delta))


def proposal_normaliser(lo, hi, c: float = 0.5) -> Tensor:
    """Z = ∫_lo^hi σ⁻³ (1/(σ² + c²) − 1/(hi² + c²)) dσ in closed form (float64, broadcasts over lo and hi).

    Derivation (ours; the paper gives no formula): partial fractions 1/(σ³(σ²+c²)) = 1/(c²σ³) − 1/(c⁴σ) +
    σ/(c⁴(σ²+c²)) give the antiderivative G(σ) = (log y − (y − 1)/y_hi)/(2c⁴) with y = 1 + c²/σ², hence
    Z = G(hi) − G(lo) = (r − 1 − log r)/(2c⁴), r = y_lo/y_hi ≥ 1.
    """
    c = _check_c(c)
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    if (lo <= 0).any() or (hi < lo).any():
        raise AYSError(f"need 0 < lo <= hi, got lo={lo.tolist()}, hi={hi.tolist()}")
    return _r_minus_1_minus_log_r(_delta_y(lo, hi, c)) / (2 * c**4)


def proposal_density(sigma, lo, hi, c: float = 0.5) -> Tensor:
    """π(σ) = g(σ)/Z on [lo, hi], g(σ) = σ⁻³ (1/(σ² + c²) − 1/(hi² + c²)) (float64)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    g = (hi - sigma) * (hi + sigma) / (sigma**3 * (sigma**2 + c**2) * (hi**2 + c**2))
    return g / proposal_normaliser(lo, hi, c)


def sample_proposal(u: Tensor, lo, hi, c: float = 0.5) -> Tensor:
    """σ = F⁻¹(u) for π on [lo, hi], u ∈ [0, 1) (float64); the same u for every window gives common random numbers.

    lo and hi may be tensors of shape (K, 1) against u of shape (n,): K windows at once, result (K, n).
    With s = y(σ)/y_hi ∈ [1, r] and h(s) = s − 1 − log s, the CDF from `proposal_normaliser` is
    F = 1 − h(s)/h(r), so h(s) = (1 − u) h(r) =: H. Newton on δ = s − 1 (f = δ − log1p δ − H, f′ = δ/(1 + δ)) is
    monotone from δ₀ = 2H + √(2H), which lies right of the root because h(1 + t) ≥ t²/(2(1 + t)).
    Then σ = c/√(y − 1) with y − 1 = δ(1 + q_hi) + q_hi, q_hi = c²/hi².
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    lo = torch.as_tensor(lo, dtype=torch.float64, device=u.device)
    hi = torch.as_tensor(hi, dtype=torch.float64, device=u.device)
    big_h = (1 - u) * _r_minus_1_minus_log_r(_delta_y(lo, hi, c))
    delta = 2 * big_h + torch.sqrt(2 * big_h)
    for _ in range(100):
        step = (_r_minus_1_minus_log_r(delta) - big_h) * (1 + delta) / delta
        step = torch.where(delta > 0, step, torch.zeros_like(step))
        delta = delta - step
        if (step.abs() <= 1e-10 * delta).all():       # quadratic convergence: the error is now ~1e-20
            break
    q_hi = c**2 / hi**2
    return torch.minimum(torch.maximum(c / torch.sqrt(delta * (1 + q_hi) + q_hi), lo), hi)


def importance_weight(sigma: Tensor, hi: float, z: Tensor | float, c: float = 0.5) -> Tensor:
    """σ⁻³/π(σ) = Z (σ² + c²)(hi² + c²)/(hi² − σ²): multiplies ‖ΔD‖² to estimate the window integral."""
    return z * (sigma**2 + c**2) * (hi**2 + c**2) / ((hi - sigma) * (hi + sigma))


# ============================================================================================ KLUB estimation
@dataclass
class MCDraw:
    """The random numbers of one estimate, shared by every window (common random numbers).

    x_hi = x0 + hi η and, given it, the Brownian bridge x_σ = x0 + (σ/hi)² (x_hi − x0) + σ √(1 − σ²/hi²) ξ:
    the same joint law as x_σ = x0 + σ ε, x_hi = x_σ + √(hi² − σ²) ε′, but D(x_hi, hi) no longer depends on σ,
    so one evaluation at a window's fixed upper end serves every candidate below it.
    """
    x0: Tensor
    eta: Tensor
    xi: Tensor
    u: Tensor          # (n,) float64 uniforms for σ

    @classmethod
    def draw(cls, data: Tensor, n: int, seed: int, device=None) -> "MCDraw":
        device = torch.device(device) if device is not None else data.device
        gen = torch.Generator(device=device).manual_seed(int(seed))
        pick = torch.randperm(len(data), generator=gen, device=device)[:n] if len(data) >= n else \
            torch.randint(len(data), (n,), generator=gen, device=device)
        x0 = data[pick.to(data.device)].to(device)
        return cls(x0, torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype),
                   torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype),
                   torch.rand(n, generator=gen, device=device, dtype=torch.float64))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def denoise_upper(denoiser: SigmaDenoiser, draw: MCDraw, hi: float, batch_size: int) -> Tensor:
    """D(x_hi, hi) for every sample of the draw (in chunks), reusable by all windows with upper end hi."""
    out = []
    for j in range(0, len(draw.x0), batch_size):
        x_hi = draw.x0[j:j + batch_size] + hi * draw.eta[j:j + batch_size]
        out.append(denoiser(x_hi, torch.full((len(x_hi),), hi, dtype=torch.float64, device=x_hi.device)))
    return torch.cat(out)


@torch.no_grad()
def window_terms(denoiser: SigmaDenoiser, draw: MCDraw, lo, hi, c: float = 0.5, batch_size: int = 1024,
                 d_hi: Tensor | None = None) -> Tensor:
    """Per-sample importance-weighted terms w(σ_j) ‖D(x_σj, σ_j) − D(x_hi, hi)‖² of K windows: (K, n) float64.

    lo, hi: K window ends (sequences or floats). Row means estimate each window's KLUB ∫_lo^hi σ⁻³ E‖ΔD‖² dσ; the
    weight carries the normaliser Z. d_hi: `denoise_upper` output when all windows share one upper end. The K·n
    evaluations run in chunks of batch_size rows, whatever window they belong to.
    """
    dev = draw.u.device
    lo = torch.as_tensor(lo, dtype=torch.float64, device=dev).reshape(-1, 1)
    hi = torch.as_tensor(hi, dtype=torch.float64, device=dev).reshape(-1, 1)
    z = proposal_normaliser(lo, hi, c)
    sig = sample_proposal(draw.u, lo, hi, c)                              # (K, n)
    w = importance_weight(sig, hi, z, c)
    n = len(draw.u)
    sig, hi_rows = sig.flatten(), hi.expand(-1, n).flatten()
    sq = torch.empty_like(sig)
    for a in range(0, len(sig), batch_size):
        rows = torch.arange(a, min(a + batch_size, len(sig)), device=dev)
        j, s, h = rows % n, sig[rows], hi_rows[rows]
        x0 = draw.x0[j]
        x_hi = x0 + _bcast(h, x0) * draw.eta[j]
        x_s = x0 + _bcast((s / h) ** 2, x0) * (x_hi - x0) + _bcast(s * torch.sqrt(1 - (s / h) ** 2), x0) * draw.xi[j]
        up = d_hi[j] if d_hi is not None else denoiser(x_hi, h)
        sq[rows] = ((denoiser(x_s, s) - up).to(torch.float64).flatten(1) ** 2).sum(1)
    sq = sq.reshape(-1, n)
    return torch.where(sig.reshape(-1, n) < hi, w * sq, torch.zeros_like(sq))   # σ = hi has measure zero


@dataclass
class KLUBEstimate:
    """A Monte-Carlo KLUB: total and per-window values with standard errors (windows noisy → clean)."""
    total: float
    stderr: float
    windows: list[float]
    window_stderr: list[float]


def klub(denoiser: SigmaDenoiser, data: Tensor, sigmas, c: float = 0.5, n_mc: int = 8192, seed: int = 0,
         batch_size: int = 1024, device=None) -> KLUBEstimate:
    """Estimate the KLUB of a whole schedule with one draw shared by all windows.

    The total's standard error uses each sample's sum over windows, so the windows' correlation is accounted for.
    """
    s = validate_sigmas(sigmas)
    c = _check_c(c)
    draw = MCDraw.draw(_check_data(data), _check_steps(n_mc, 2, "n_mc"), seed, device)
    terms = window_terms(denoiser, draw, s[1:], s[:-1], c, batch_size)
    n = terms.shape[1]
    per_sample = terms.sum(0)
    return KLUBEstimate(per_sample.mean().item(), (per_sample.std() / math.sqrt(n)).item(),
                        terms.mean(1).tolist(), (terms.std(1) / math.sqrt(n)).tolist())


def gaussian_klub(sigmas, std: float, dim: int) -> float:
    """The exact KLUB of a schedule for x0 ~ N(0, std² I_dim): dim · std⁴ · Σ Z_std(lo, hi) (module docstring)."""
    s = validate_sigmas(sigmas)
    return float(dim * std**4 * proposal_normaliser(s[1:], s[:-1], std).sum())


def _check_data(data) -> Tensor:
    if not isinstance(data, Tensor) or data.ndim < 2 or len(data) == 0 or not data.is_floating_point():
        raise AYSError("data_samples must be a non-empty floating-point tensor of shape (N, ...) scaled to [-1, 1]")
    return data


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
