"""Zoo-member checkpoints (`checkpoints/<data>/<member>.ckpt`) and checks on Lightning training checkpoints.

A member file holds the EMA weights of the network and everything needed to rebuild it, all as plain
containers so it loads with `torch.load(weights_only=True)`:

    {"format": MEMBER_FORMAT, "member": "small", "net": {...UNet kwargs...}, "noise": {...VPSchedule...},
     "data": {"name": "digits", "image_size": 8, "channels": 1}, "state_dict": {...}, "meta": {...}}
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_torch_save
from oms_lightning.nets import build_net

MEMBER_FORMAT = "oms-lightning/member-v1"


@dataclass
class Member:
    """A trained zoo member: its network (EMA weights, eval mode) and what it was trained on."""

    name: str
    net: nn.Module
    noise_schedule: VPSchedule
    data: dict
    meta: dict
    t_range: tuple[float, float] = (0.0, 1.0)   # times it may run at (a multi-decoder stage: its own stage only)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def save_member(path: str | Path, *, name: str, net_kwargs: dict, noise: dict, data: dict,
                state_dict: dict, meta: dict) -> Path:
    payload = {"format": MEMBER_FORMAT, "member": name, "net": dict(net_kwargs), "noise": dict(noise),
               "data": dict(data), "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "meta": dict(meta)}
    atomic_torch_save(payload, path)
    return Path(path)


def _torch_load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # torn or garbage bytes
            raise UserError(f"{what} {path} is corrupt or not a PyTorch file (it cannot be unpickled). "
                            "Delete it and train again.") from None
        # torch's own message goes on to explain how to load it unsafely; a user must not read that as advice
        raise UserError(f"{what} {path} is refused as unsafe: it holds Python objects other than tensors and plain "
                        "containers, and loading those can run arbitrary code. oms-lightning never writes such "
                        "files; use one written by train.py or delete it.") from None
    # A torn or foreign file fails in many ways inside torch's unpickler (IndexError on a truncated zip, ...).
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, IndexError,
            KeyError) as e:
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file ({type(e).__name__}: {str(e)[:200]}). "
                        "Delete it and train again.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} does not hold a checkpoint dictionary; it is not an oms-lightning file.")
    return obj


def load_member(path: str | Path, map_location: str | torch.device = "cpu") -> Member:
    path = Path(path)
    obj = _torch_load(path, "member checkpoint")
    if obj.get("format") != MEMBER_FORMAT:
        raise UserError(f"{path} is not an oms-lightning zoo member (format {obj.get('format')!r}, expected "
                        f"{MEMBER_FORMAT!r}). Members are written by `python train.py model=<name>`.")
    data = obj["data"]
    net = build_net(obj["net"], data["image_size"], data["channels"])
    try:
        net.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the stored architecture ({str(e)[:200]})") from None
    net.eval().requires_grad_(False).to(map_location)
    return Member(obj["member"], net, VPSchedule.from_dict(obj["noise"]), data, obj.get("meta", {}))


def check_training_checkpoint(path: str | Path, expected: dict) -> int:
    """Refuse a corrupt or foreign Lightning checkpoint before `Trainer.fit(ckpt_path=...)` touches it; returns
    its global step.

    `expected` holds hyper-parameters that must match (e.g. model name, data, network shape).
    """
    path = Path(path)
    obj = _torch_load(path, "training checkpoint")
    if "state_dict" not in obj or "global_step" not in obj or "hyper_parameters" not in obj:
        raise UserError(f"{path} is not a Lightning training checkpoint (no state_dict/global_step).")
    hparams = obj["hyper_parameters"]
    for key, value in expected.items():
        if hparams.get(key) != value:
            raise UserError(f"{path} belongs to another run: its {key} is {hparams.get(key)!r}, this run has "
                            f"{value!r}. Resume with the same model/data settings or start a new run.")
    return int(obj["global_step"])
