"""Denoisers: data-prediction (x0) wrappers around ε-prediction networks.

Conventions (see PAPERS.md, "Shared background"): x_t = α_t x_0 + σ_t ε, so
x0 = (x − σ_t ε)/α_t and ε = (x − α_t x0)/σ_t. A *denoiser* is a callable D(x, t) → x0 with t of shape (B,)
(or a scalar, broadcast to the batch). Solvers only ever see denoisers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .noise_schedule import VPSchedule


def eps_from_x0(x: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    """ε = (x − α_t x0)/σ_t (inverse of the forward process x_t = α_t x0 + σ_t ε)."""
    return (x - alpha * x0) / sigma


def x0_from_eps(x: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """x0 = (x − σ_t ε)/α_t (Ho et al. 2020, eq. 15 in continuous form)."""
    return (x - sigma * eps) / alpha


def batch_times(t, x: Tensor) -> Tensor:
    """t (scalar or (B,)) → float64 tensor of shape (B,) on x.device."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(B,) coefficient → shape (B, 1, ..., 1) in x.dtype, to broadcast against x."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class EpsDenoiser:
    """Wrap an ε-prediction network net(x, t) (t: (B,) float32 in (0, 1]) as a data-prediction denoiser."""

    def __init__(self, net, noise_schedule: VPSchedule):
        self.net, self.noise_schedule = net, noise_schedule

    def eps(self, x: Tensor, t) -> Tensor:
        t = batch_times(t, x)
        return self.net(x, t.to(torch.float32))

    def __call__(self, x: Tensor, t) -> Tensor:
        t = batch_times(t, x)
        alpha, sigma = self.noise_schedule.alpha(t), self.noise_schedule.sigma(t)   # float64
        return x0_from_eps(x, self.net(x, t.to(torch.float32)), per_sample(alpha, x), per_sample(sigma, x))


from .gaussian import GaussianDenoiser  # noqa: E402,F401  (re-export)
