"""Devices: resolving the one a zoo runs on (clear errors when CUDA, a CUDA index or MPS is missing), and naming
what a latency was measured on (the GPU, or the CPU with its torch thread count) and with which dtype.
"""
from __future__ import annotations

import platform

import torch

from oms_lightning.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` → the GPU when there is one, else the CPU; anything else is checked to exist (clear error if not)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device {device!r} ({e}); use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} was asked for but CUDA is not available; use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device {device!r} was asked for but MPS is not available; use device=cpu")
    return dev


def device_description(device: str | torch.device) -> str:
    """What a latency was measured on: the GPU's name, or the CPU and its torch thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        cpu = platform.processor() or platform.machine() or "cpu"
        n = torch.get_num_threads()
        return f"{cpu} cpu ({n} thread{'' if n == 1 else 's'})"
    return dev.type


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` → "float32", as stored in latency profiles and shown in a zoo's repr."""
    return str(dtype).removeprefix("torch.")
