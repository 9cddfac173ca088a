"""Per-sample noise: sample i's noise depends only on (seed, i), not on batch size, batch order or device.

Each sample gets its own torch.Generator seeded from numpy's SeedSequence((seed, i)); noise is drawn on CPU in
float32 and then cast/moved, so CPU and GPU runs start from bit-identical noise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """63-bit seed for sample `index` under run seed `seed` (SeedSequence hashes the pair)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return int(np.random.SeedSequence((int(seed), int(index))).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, index))


def _indices(indices) -> list[int]:
    return [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]


def per_sample_noise(shape_per_sample: Sequence[int], indices, seed: int, dtype=torch.float32,
                     device="cpu") -> Tensor:
    """Noise of shape (len(indices), *shape_per_sample); row k is N(0, I) drawn from sample indices[k]'s stream."""
    shape = tuple(int(s) for s in shape_per_sample)
    rows = [torch.randn(shape, generator=_generator(seed, i), dtype=torch.float32) for i in _indices(indices)]
    out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


class SampleNoise:
    """Fresh per-sample noise for stochastic samplers; every call advances each sample's own generator.

    The streams are seeded differently from `per_sample_noise` (index offset in the SeedSequence) so the sampler
    noise is independent of the initial x_T drawn with the same seed.
    """

    def __init__(self, indices, seed: int):
        self.indices = _indices(indices)
        self.seed = int(seed)
        self._gens = [torch.Generator(device="cpu").manual_seed(
            int(np.random.SeedSequence((self.seed, i, 1)).generate_state(1, dtype=np.uint64)[0] >> 1))
            for i in self.indices]

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self._gens):
            raise ValueError(f"batch has {x.shape[0]} samples but SampleNoise holds {len(self._gens)} indices")
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32) for g in self._gens]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)

    __call__ = randn_like
