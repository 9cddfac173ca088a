"""Timestep spacings for samplers: times t_0 = t_start > t_1 > … > t_N = t_end (noisy → clean), float64.

Solvers accept any tensor of times that passes `validate_times`; these spacings are only helpers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ays_sigmas import kl_optimal_sigmas
from .noise_schedule import VPSchedule

SPACINGS = ("time_uniform", "time_quadratic", "logsnr_uniform", "karras", "kl_optimal")
KL_OPTIMAL_C = 0.5  # the data's scale in [-1, 1] (AYS's c)


def default_t_end(n_steps: int) -> float:
    """DPM-Solver's advice (Lu et al. 2022, §5): t_end = 1e-4 for ≥ 15 NFE/steps, else 1e-3."""
    return 1e-4 if n_steps >= 15 else 1e-3


def timesteps(kind: str, n_steps: int, noise_schedule: VPSchedule, t_start: float = 1.0, t_end: float | None = None,
              rho: float = 7.0) -> Tensor:
    """n_steps + 1 times, strictly decreasing from t_start to t_end (float64)."""
    if kind not in SPACINGS:
        raise ValueError(f"unknown spacing {kind!r}; choose one of {SPACINGS}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    t_end = default_t_end(n_steps) if t_end is None else float(t_end)
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end, got t_start={t_start}, t_end={t_end}")
    u = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    t_s = torch.tensor(float(t_start), dtype=torch.float64)
    t_e = torch.tensor(t_end, dtype=torch.float64)
    if kind == "time_uniform":
        ts = t_s + (t_e - t_s) * u
    elif kind == "time_quadratic":
        # DDIM's quadratic skip (Song et al. 2021, App. D.2): uniform in sqrt(t)
        ts = (t_s.sqrt() + (t_e.sqrt() - t_s.sqrt()) * u) ** 2
    elif kind == "logsnr_uniform":
        # DPM-Solver (Lu et al. 2022): uniform in half-logSNR λ
        lam_s, lam_e = noise_schedule.lambda_(t_s), noise_schedule.lambda_(t_e)
        ts = noise_schedule.t_of_lambda(lam_s + (lam_e - lam_s) * u)
    elif kind == "karras":
        # EDM ρ-spacing (Karras et al. 2022, eq. 5) in σ̃ = σ/α = exp(−λ)
        s_max, s_min = noise_schedule.edm_sigma(t_s), noise_schedule.edm_sigma(t_e)
        sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ts = noise_schedule.t_of_edm_sigma(sig)
    else:
        # AYS's closed-form schedule for Gaussian data of std c: arctan(σ̃/c) uniform (see ays.kl_optimal_sigmas)
        s_max, s_min = noise_schedule.edm_sigma(t_s).item(), noise_schedule.edm_sigma(t_e).item()
        sig = kl_optimal_sigmas(s_min, s_max, n_steps, KL_OPTIMAL_C)
        ts = noise_schedule.t_of_edm_sigma(sig)
    ts[0], ts[-1] = t_s, t_e          # pin the endpoints exactly (round-trips through λ lose ulps)
    validate_times(ts, noise_schedule)
    return ts


def validate_times(ts, noise_schedule: VPSchedule) -> Tensor:
    """Check ts is a 1-D, finite, strictly decreasing tensor within [schedule.t_min, 1]; returns it as float64."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"times must be a 1-D tensor with at least 2 entries, got shape {tuple(ts.shape)}")
    if not torch.isfinite(ts).all():
        raise ValueError(f"times must be finite, got {ts.tolist()}")
    if not (ts[1:] < ts[:-1]).all():
        bad = int(torch.nonzero(ts[1:] >= ts[:-1])[0])
        raise ValueError(f"times must be strictly decreasing (noisy → clean); ts[{bad}]={ts[bad].item()} "
                         f"<= ts[{bad + 1}]={ts[bad + 1].item()}")
    lo, hi = ts.min().item(), ts.max().item()
    if lo < noise_schedule.t_min or hi > 1.0:
        raise ValueError(f"times must lie in [t_min={noise_schedule.t_min}, 1], got range [{lo}, {hi}]")
    return ts
