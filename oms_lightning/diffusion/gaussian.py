"""Exact denoiser and exact probability-flow ODE solution for Gaussian data x0 ~ N(μ, diag(s²)).

For such data x_t = α_t x0 + σ_t ε ~ N(α_t μ, α_t² s² + σ_t²) per coordinate, so
E[x0 | x_t] = μ + α_t s² / (α_t² s² + σ_t²) · (x_t − α_t μ)   (Gaussian conditioning).
The probability-flow ODE (Song et al. 2021) transports quantiles: z = (x_t − α_t μ)/sqrt(α_t² s² + σ_t²) is
constant along trajectories. Used to test solver convergence orders against an analytic reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .noise_schedule import VPSchedule


class GaussianDenoiser:
    """D(x, t) = E[x0 | x_t] for x0 ~ N(mean, diag(std²)); mean/std broadcast to one sample's shape."""

    def __init__(self, mean, std, noise_schedule: VPSchedule):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.noise_schedule = noise_schedule

    def _coeffs(self, x: Tensor, t):
        """(α, σ) as float64 tensors broadcastable to x: scalar t or per-sample (B,) t."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 1:
            t = t.reshape(-1, *([1] * (x.ndim - 1)))
        return self.noise_schedule.alpha(t), self.noise_schedule.sigma(t)

    def _stats(self, x: Tensor):
        return self.mean.to(x.device), self.std.to(x.device)

    def __call__(self, x: Tensor, t) -> Tensor:
        a, s = self._coeffs(x, t)
        mu, sd = self._stats(x)
        var_t = a**2 * sd**2 + s**2
        x0 = mu + a * sd**2 / var_t * (x.to(torch.float64) - a * mu)
        return x0.to(x.dtype)

    def sample_prior(self, n: int, shape, generator=None) -> Tensor:
        """Samples of x0 (float64) — handy for tests."""
        z = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
        return self.mean + self.std * z

    def exact_ode_solution(self, x_start: Tensor, t_start, t_end) -> Tensor:
        """Probability-flow ODE from t_start to t_end: preserve z = (x − α μ)/sqrt(α² s² + σ²) per coordinate."""
        a_s, s_s = self._coeffs(x_start, t_start)
        a_e, s_e = self._coeffs(x_start, t_end)
        mu, sd = self._stats(x_start)
        scale = torch.sqrt(a_e**2 * sd**2 + s_e**2) / torch.sqrt(a_s**2 * sd**2 + s_s**2)
        x_end = a_e * mu + scale * (x_start.to(torch.float64) - a_s * mu)
        return x_end.to(x_start.dtype)
