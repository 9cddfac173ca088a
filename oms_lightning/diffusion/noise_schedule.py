"""Continuous-time variance-preserving (VP) noise schedules.

x_t = α_t x_0 + σ_t ε with α_t² + σ_t² = 1 and half-logSNR λ_t = log(α_t / σ_t), for t ∈ (0, 1].
All maps work elementwise on tensors; do the maths in float64 where accuracy matters (solvers do).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class VPSchedule:
    """VP schedule, `linear` (DDPM's β 1e-4 → 0.02 over 1000 steps in continuous form) or `cosine`.

    linear: log α_t = −β₁ t²/4 − β₀ t/2 with β₀ = beta_min, β₁ = beta_max − beta_min (Song et al. 2021).
    cosine: α_t = cos(π/2 · (t + s)/(1 + s)) / cos(π/2 · s/(1 + s)) (Nichol & Dhariwal 2021); t ≤ t_max_cosine keeps
    α_t away from 0 so λ stays finite.
    """

    KINDS = ("linear", "cosine")

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, cosine_s: float = 0.008,
                 t_min: float = 1e-4):
        if kind not in self.KINDS:
            raise ValueError(f"unknown noise schedule {kind!r}; choose one of {self.KINDS}")
        if kind == "linear" and not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.kind, self.beta_min, self.beta_max, self.cosine_s, self.t_min = kind, beta_min, beta_max, cosine_s, t_min

    # --- serialisation (plain dicts so checkpoints load with weights_only=True) ---
    def to_dict(self) -> dict:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "cosine_s": self.cosine_s, "t_min": self.t_min}

    @classmethod
    def from_dict(cls, d: dict) -> "VPSchedule":
        return cls(**d)

    def __eq__(self, other) -> bool:
        return isinstance(other, VPSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:  # equal schedules hash alike, so a schedule can key a cache (solvers.nfe_times)
        return hash(tuple(self.to_dict().values()))

    def __repr__(self) -> str:
        return f"VPSchedule({self.to_dict()})"

    # --- t → (α, σ, λ) ---
    def log_alpha(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return torch.log(torch.cos(math.pi / 2 * (t + s) / (1 + s))) - math.log(math.cos(math.pi / 2 * s / (1 + s)))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t: Tensor) -> Tensor:
        """Half-logSNR λ_t = log α_t − log σ_t."""
        log_a = self.log_alpha(t)
        return log_a - 0.5 * torch.log(-torch.expm1(2 * log_a))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of λ_t (closed form for both kinds, as in DPM-Solver's NoiseScheduleVP)."""
        lam = torch.as_tensor(lam)
        # log α from λ: α² = sigmoid(2λ) ⇒ log α = −½ softplus(−2λ)
        log_a = -0.5 * torch.nn.functional.softplus(-2.0 * lam)
        if self.kind == "linear":
            b0, b1 = self.beta_min, self.beta_max - self.beta_min
            # solve b1/4 t² + b0/2 t + log α = 0 for t ≥ 0 (numerically stable root)
            disc = b0**2 - 4.0 * b1 * log_a
            return -4.0 * log_a / (b0 + torch.sqrt(disc))
        s = self.cosine_s
        log_cos = log_a + math.log(math.cos(math.pi / 2 * s / (1 + s)))
        return 2 * (1 + s) / math.pi * torch.arccos(torch.exp(log_cos)) - s

    # --- σ-space (EDM): x̃ = x/α, σ̃ = σ_t/α_t = exp(−λ_t) ---
    def edm_sigma(self, t: Tensor) -> Tensor:
        return torch.exp(-self.lambda_(t))

    def t_of_edm_sigma(self, sigma: Tensor) -> Tensor:
        return self.t_of_lambda(-torch.log(torch.as_tensor(sigma)))
