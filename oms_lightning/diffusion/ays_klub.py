"""The KLUB of Align Your Steps and its Monte-Carlo estimate: a closed-form importance-sampling proposal per window,
one draw of common random numbers shared by all windows, and the exact KLUB of Gaussian data. Conventions (σ-space,
schedules, windows): see ays_sigmas.py; `oms_lightning.diffusion.ays` re-exports everything here.

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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .ays_sigmas import AYSError, SigmaDenoiser, _check_c, _check_steps, validate_sigmas


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
