"""The schedule predictor network (OMS-DPM, Liu et al. 2023, §4.2; ≈ 0.27M parameters with the defaults).

Per step: the 3 NFE-slot member embeddings (null = index 0, a learned vector) concatenated → MLP → 64; an order
embedding (16, plus a solver embedding of the same size and a linear map of the step's IIA coefficients, without
bias so a plain schedule's features are the coefficient-free ones, added to it); Fourier features of (λ_start, λ_end) → MLP
→ 64. The 144-d step features go through a 1-layer LSTM over the *real* steps only, from the clean end to the
noisy end (packed sequences: padding never enters the recurrence), then a masked mean of the L2-normalised
per-step outputs, then a head MLP → one score. Lower score = better (trained to be ordered like FID).

Fixing the reference code: its LSTM ran over, and averaged, the padding, so a prediction depended on the padded
length. Here a schedule scores the same padded to any length, alone or batched with longer schedules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .encoding import MAX_ORDER, EncodedSchedules

SLOTS = 3


class FourierFeatures(nn.Module):
    """sin/cos of each input scalar at fixed geometric frequencies π·2^0 … π·2^6 (inputs are λ/10, |x| ≲ 0.6)."""

    def __init__(self, n_inputs: int, dim: int):
        super().__init__()
        if dim % (2 * n_inputs):
            raise ValueError(f"dim {dim} must be a multiple of 2 × {n_inputs} inputs")
        n_freq = dim // (2 * n_inputs)
        self.register_buffer("freqs", math.pi * torch.logspace(0, 6, n_freq, base=2.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (..., n_inputs) → (..., dim)
        angles = x[..., None] * self.freqs  # (..., n_inputs, n_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def _mlp(*dims: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SchedulePredictor(nn.Module):
    """Scores encoded schedules: forward(EncodedSchedules) → (B,) float, lower = better."""

    def __init__(self, n_members: int, max_order: int = MAX_ORDER, member_dim: int = 32, order_dim: int = 16,
                 time_dim: int = 64, hidden: int = 128, head_hidden: int = 200, num_solvers: int = 5,
                 slot_dim: int = 64, num_features: int = 0):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.n_members, self.max_order, self.num_solvers = n_members, max_order, num_solvers
        self.member_emb = nn.Embedding(n_members + 1, member_dim)       # 0 = null slot (learned)
        self.slot_mlp = _mlp(SLOTS * member_dim, slot_dim, slot_dim)
        self.order_emb = nn.Embedding(max_order + 1, order_dim)          # 0 = padding (never used)
        self.solver_emb = nn.Embedding(num_solvers, order_dim) if num_solvers > 0 else None
        self.time_features = FourierFeatures(2, time_dim)
        self.time_mlp = _mlp(time_dim, time_dim, time_dim)
        self.lstm = nn.LSTM(slot_dim + order_dim + time_dim, hidden, num_layers=1, batch_first=True)
        self.head = _mlp(hidden, head_hidden, head_hidden, head_hidden, 1)
        # created last, so the other modules draw the same initial weights as before coefficients were encoded: on
        # plain schedules (all coefficients 0, no bias) the predictor and its training are unchanged
        self.coefficient_proj = nn.Linear(num_features, order_dim, bias=False) if num_features > 0 else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def step_features(self, batch: EncodedSchedules) -> Tensor:
        """(B, K, 144) per-step inputs of the LSTM (padding rows are computed but never used)."""
        b, k = batch.mask.shape
        slots = self.slot_mlp(self.member_emb(batch.member_ids).reshape(b, k, -1))
        kind = self.order_emb(batch.orders)
        if self.solver_emb is not None and batch.solver_ids is not None:
            kind = kind + self.solver_emb(batch.solver_ids)[:, None, :]
        if self.coefficient_proj is not None and batch.coefficients is not None:
            kind = kind + self.coefficient_proj(batch.coefficients)
        times = self.time_mlp(self.time_features(batch.lambdas))
        return torch.cat([slots, kind, times], dim=-1)

    def forward(self, batch: EncodedSchedules) -> Tensor:
        mask = batch.mask
        b, k = mask.shape
        lengths = mask.sum(dim=1)
        if b == 0:
            return mask.new_zeros(0, dtype=torch.float32)
        if int(lengths.min()) < 1:
            raise ValueError("every encoded schedule needs at least one real step")
        x = self.step_features(batch)
        # Reverse the real steps of each row (clean end first); padding stays where it is.
        pos = torch.arange(k, device=mask.device)[None, :]
        rev = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
        x = x.gather(1, rev[..., None].expand(-1, -1, x.shape[-1]))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=k)  # padding rows are exactly 0
        out = F.normalize(out, dim=-1) * mask[..., None].to(out.dtype)      # real steps first after reversal
        pooled = out.sum(dim=1) / lengths[:, None].to(out.dtype)             # masked mean over real steps
        return self.head(pooled).squeeze(-1)
