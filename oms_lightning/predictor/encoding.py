"""Schedule → tensors for the predictor (OMS-DPM, Liu et al. 2023, §4.2), padded to a fixed number of steps.

Per step k (noisy → clean, as everywhere in this project) a batch holds:

    member_ids (B, K, 3) long   0 = null slot, i + 1 = members[i] (the zoo's sorted, unique names); a step's
                                NFEs fill its first slots (order 2 → two ids then a 0)
    orders     (B, K)    long   1..3 NFEs of the step, 0 for padding
    lambdas    (B, K, 2) float  half-logSNR λ at the step's start and end, divided by LAMBDA_SCALE = 10 so that
                                the linear VP range (λ ≈ −5 at t = 1 to ≈ +6 at t = 1e-4) is roughly [−0.5, 0.6];
                                computed in float64, stored in float32; 0 for padding
    mask       (B, K)    bool   True for real steps; real steps always come first
    solver_ids (B,)      long   index of the schedule's solver in the encoder's solver vocabulary (default:
                                sorted SOLVER_REGISTRY names), so one predictor can hold several search spaces
    coefficients (B, K, F) float  a step's IIA coefficients (PAPERS.md §3), each in the column of its feature in
                                the encoder's feature vocabulary (default: every feature of IIA_FEATURE_SETS,
                                sorted); all 0 for a plain schedule and for padding

Unlike the reference code, nothing downstream may depend on K: the predictor packs the real steps (see
`network.py`), so a schedule scores the same whatever length it is padded to.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import IIA_FEATURE_SETS, SOLVER_REGISTRY
from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.slots import SLOTS_PER_STEP

LAMBDA_SCALE = 10.0
MAX_ORDER = SLOTS_PER_STEP
DEFAULT_SOLVERS: tuple[str, ...] = tuple(sorted(SOLVER_REGISTRY))
DEFAULT_FEATURES: tuple[str, ...] = tuple(sorted({f for fs in IIA_FEATURE_SETS.values() for f in fs}))


@dataclass
class EncodedSchedules:
    """A padded batch of encoded schedules (see the module docstring for each field)."""

    member_ids: Tensor
    orders: Tensor
    lambdas: Tensor
    mask: Tensor
    solver_ids: Tensor | None = None
    coefficients: Tensor | None = None

    def _map(self, fn) -> "EncodedSchedules":
        return EncodedSchedules(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                   for f in fields(self)})

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_steps(self) -> int:
        """K, the padded length."""
        return int(self.mask.shape[1])

    @property
    def lengths(self) -> Tensor:
        """Real steps per schedule, (B,) long."""
        return self.mask.sum(dim=1)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EncodedSchedules":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def __getitem__(self, idx) -> "EncodedSchedules":
        """Batch indexing (int, slice, index list / array / tensor, bool mask); an int keeps the batch dimension."""
        if isinstance(idx, (int, np.integer)):
            n = len(self)
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} schedules")
            i %= n
            idx = slice(i, i + 1)
        elif isinstance(idx, (list, np.ndarray)):
            idx = torch.as_tensor(np.asarray(idx))
        if isinstance(idx, Tensor) and idx.device != self.mask.device:
            idx = idx.to(self.mask.device)
        return self._map(lambda t: t[idx])

    def pad_to(self, num_steps: int) -> "EncodedSchedules":
        """Pad (or trim padding) to `num_steps`; trimming a real step raises UserError."""
        k = self.num_steps
        if num_steps == k:
            return self
        if num_steps < k:
            longest = int(self.lengths.max()) if len(self) else 0
            if longest > num_steps:
                raise UserError(f"cannot pad to {num_steps} steps: the batch holds a schedule with {longest} steps")
            return self._per_step(lambda t: t[:, :num_steps])
        extra = num_steps - k
        return self._per_step(lambda t: torch.cat([t, t.new_zeros((t.shape[0], extra) + tuple(t.shape[2:]))], dim=1))

    def _per_step(self, fn) -> "EncodedSchedules":
        """`fn` applied to every per-step field (dimension 1 is the step); solver_ids stays as it is."""
        return EncodedSchedules(**{f.name: (getattr(self, f.name) if f.name == "solver_ids" or getattr(self, f.name)
                                            is None else fn(getattr(self, f.name))) for f in fields(self)})

    @classmethod
    def cat(cls, batches: Sequence["EncodedSchedules"]) -> "EncodedSchedules":
        """Concatenate along the batch dimension, padding every part to the longest K."""
        if not batches:
            raise ValueError("nothing to concatenate")
        k = max(b.num_steps for b in batches)
        batches = [b.pad_to(k) for b in batches]
        parts = {}
        for f in fields(cls):
            present = [getattr(b, f.name) is not None for b in batches]
            if any(present) and not all(present):
                raise ValueError(f"cannot concatenate batches with and without {f.name}")
            parts[f.name] = torch.cat([getattr(b, f.name) for b in batches]) if all(present) else None
        return cls(**parts)


class ScheduleEncoder:
    """Encodes ModelSchedules over a zoo (`members`, sorted and unique) into `EncodedSchedules` of `max_steps`."""

    def __init__(self, members: Sequence[str], noise: VPSchedule | Mapping, max_steps: int,
                 solvers: Sequence[str] | None = None, features: Sequence[str] | None = None):
        if isinstance(members, str):
            raise UserError(f"members must be a list of member names, got the string {members!r}")
        members = list(members)
        if not members or not all(isinstance(m, str) and m for m in members):
            raise UserError(f"members must be a non-empty list of member names, got {members!r}")
        if members != sorted(set(members)):
            raise UserError(f"members must be the zoo's names sorted and without duplicates (so indices never "
                            f"silently permute), got {members}; use {sorted(set(members))}")
        if isinstance(noise, Mapping):
            noise = VPSchedule.from_dict(dict(noise))
        if not isinstance(noise, VPSchedule):
            raise UserError(f"noise must be a VPSchedule or its to_dict(), got {type(noise).__name__}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise UserError(f"max_steps must be a positive integer, got {max_steps!r}")
        solvers = list(DEFAULT_SOLVERS if solvers is None else solvers)
        if not solvers or len(set(solvers)) != len(solvers):
            raise UserError(f"solvers must be a non-empty list of unique solver names, got {solvers}")
        features = list(DEFAULT_FEATURES if features is None else features)
        if len(set(features)) != len(features):
            raise UserError(f"features must be unique IIA feature names, got {features}")
        self.members: tuple[str, ...] = tuple(members)
        self.noise = noise
        self.max_steps = int(max_steps)
        self.solvers: tuple[str, ...] = tuple(solvers)
        self._member_index = {m: i + 1 for i, m in enumerate(self.members)}
        self._solver_index = {s: i for i, s in enumerate(self.solvers)}
        self.features: tuple[str, ...] = tuple(features)
        self._feature_index = {f: i for i, f in enumerate(self.features)}

    def __repr__(self) -> str:
        return f"ScheduleEncoder(members={list(self.members)}, max_steps={self.max_steps}, noise={self.noise!r})"

    def __call__(self, schedules: Sequence[ModelSchedule] | ModelSchedule) -> EncodedSchedules:
        return self.encode(schedules)

    def encode(self, schedules: Sequence[ModelSchedule] | ModelSchedule) -> EncodedSchedules:
        """A padded batch of `max_steps`; UserError naming the schedule for unknown members / solvers or too many steps."""
        if isinstance(schedules, ModelSchedule):
            schedules = [schedules]
        schedules = list(schedules)
        b, k = len(schedules), self.max_steps
        ids = np.zeros((b, k, SLOTS_PER_STEP), dtype=np.int64)
        orders = np.zeros((b, k), dtype=np.int64)
        t = np.ones((b, k, 2), dtype=np.float64)  # padding gets t = 1 (a valid time), zeroed after λ
        solver_ids = np.zeros(b, dtype=np.int64)
        coefficients = np.zeros((b, k, len(self.features)), dtype=np.float32)
        index = self._member_index
        for i, s in enumerate(schedules):
            if not isinstance(s, ModelSchedule):
                raise UserError(f"schedule {i}: expected a ModelSchedule, got {type(s).__name__}")
            n = len(s.steps)
            if n > k:
                raise UserError(f"schedule {i} has {n} steps but the predictor holds at most max_steps={k}; "
                                f"raise max_steps (schedule: {s.compact()})")
            try:
                solver_ids[i] = self._solver_index[s.solver]
            except KeyError:
                raise UserError(f"schedule {i} uses solver {s.solver!r}, which this predictor does not know; "
                                f"known solvers: {', '.join(self.solvers)}") from None
            for j, step in enumerate(s.steps):
                row = ids[i, j]
                for q, m in enumerate(step.members):
                    try:
                        row[q] = index[m]
                    except KeyError:
                        raise UserError(f"schedule {i} step {j} uses unknown member {m!r}; the predictor's members "
                                        f"are {list(self.members)}") from None
                orders[i, j] = len(step.members)
                t[i, j, 0] = step.t_start
                t[i, j, 1] = step.t_end
            if s.correction is not None:
                coefficients[i][:n, self._columns(i, s.correction.feature_set)] = s.correction.coefficients
        lam = self.noise.lambda_(torch.from_numpy(t)) / LAMBDA_SCALE
        mask = torch.from_numpy(orders > 0)
        lam = torch.where(mask[..., None], lam, torch.zeros((), dtype=lam.dtype))
        return EncodedSchedules(torch.from_numpy(ids), torch.from_numpy(orders), lam.to(torch.float32), mask,
                                torch.from_numpy(solver_ids), torch.from_numpy(coefficients))

    def _columns(self, i: int, feature_set: str) -> list[int]:
        """The coefficient columns of a feature set's features, in the set's order."""
        try:
            return [self._feature_index[f] for f in IIA_FEATURE_SETS[feature_set]]
        except KeyError:
            raise UserError(f"schedule {i} carries IIA coefficients of feature set {feature_set!r}, whose features "
                            f"{list(IIA_FEATURE_SETS.get(feature_set, ()))} this predictor does not all know; known "
                            f"features: {', '.join(self.features)}") from None
