"""The zoo: named members loaded from `<root>/<data>/<member>.ckpt`, kept resident for sampling.

    zoo = Zoo.load("checkpoints", "digits", ["small", "large"], device="cuda")
    denoisers = zoo.denoisers_for(schedule)      # one EpsDenoiser per NFE, for the solvers

Members are identified by name and always kept in sorted order (never a directory listing), so the slot
encoding of `to_slots(schedule, zoo.names)` is stable. All members must share the data set (name, image
size, channels) and the noise schedule, since one sampler mixes them within a single trajectory.

A multi-decoder member file also yields one member per stage (`multistage.s1`, see `zoo.ranges`), valid only
inside its stage; `Zoo.check_time_ranges` refuses a schedule that runs one outside it. `Zoo.fingerprint()`
digests the members' weights, so the caches keyed by the zoo (latency profiles, steps files) notice a retrained
member. A missing member is reported with the command that trains it (`train_command`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from oms_lightning.diffusion.denoiser import EpsDenoiser
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule, ScheduleError
from oms_lightning.zoo.checkpoint import MEMBER_FORMAT, Member, load_member
from oms_lightning.zoo.devices import dtype_name, resolve_device
from oms_lightning.zoo.ranges import FULL, STAGE_MARK, MemberRanges, split_member_name

log = logging.getLogger(__name__)

DATA_FIELDS = ("name", "image_size", "channels")
MODEL_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def train_command(name: str, data_name: str) -> str:
    """The command that trains member `name`; a name without a preset in configs/model/ gets the way to add one,
    so the advice never fails in turn."""
    if name == "<name>" or (MODEL_PRESETS / f"{name}.yaml").is_file():
        return f"python train.py model={name} data={data_name}"
    presets = ", ".join(sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml")))
    return (f"(no preset {name!r} in configs/model/: add configs/model/{name}.yaml, or use one of {presets}, "
            f"e.g. python train.py model=small data={data_name})")


def _state_digest(member: Member) -> str:
    """sha256 of a member's weights (names, shapes, dtypes, bytes), data and noise schedule.

    Content-based, so a copied file keeps its digest and a retrained member (new weights) gets a new one; `meta`
    (step, val loss) is left out, since metadata alone must never invalidate the caches keyed by the zoo.
    """
    h = hashlib.sha256()
    header = {"name": member.name, "data": member.data, "noise": member.noise_schedule.to_dict()}
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, tensor in member.net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def stage_member(parent: Member, stage: int) -> Member:
    """Stage `stage` of a multi-decoder member as a member of its own, valid only inside its stage."""
    from oms_lightning.nets import StagePath

    if not hasattr(parent.net, "stage_path"):
        raise UserError(f"{parent.name!r} is not a multi-decoder network: it has no stage {stage} (member names "
                        f"ending in {STAGE_MARK}<k> are the stage paths of a multistage member)")
    if not 0 <= stage < parent.net.num_stages:
        raise UserError(f"{parent.name!r} has stages 0..{parent.net.num_stages - 1}, not {stage}")
    path = StagePath(parent.net, stage)
    return dataclasses.replace(parent, name=f"{parent.name}{STAGE_MARK}{stage}", net=path, t_range=path.t_range)


def _member_names_in(path: Path) -> list[str] | None:
    """The zoo members a file holds, from one memory-mapped peek (no weights read): its stem, plus one stage member
    per decoder of a multi-decoder net; None for a readable PyTorch file that is not a zoo member (e.g. a Lightning
    checkpoint). An unreadable file counts as a member, so that `load_member` reports it as corrupt."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything unreadable goes on to load_member's clear error
        return [path.stem]
    if not isinstance(obj, dict) or obj.get("format") != MEMBER_FORMAT:
        return None
    net = obj.get("net", {})
    stages = len(net.get("decoder_channels", ())) if net.get("network") == "multidecoder" else 0
    return [path.stem] + [f"{path.stem}{STAGE_MARK}{k}" for k in range(stages)]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"invalid zoo member name {name!r}: a name is a plain file stem such as 'small'")
    return name


# ---------------------------------------------------------------------- the zoo
class Zoo:
    """Named, trained members sharing one data set and noise schedule; nets are eval, frozen and resident."""

    def __init__(self, members: Mapping[str, Member], data_name: str, root: Path, device: torch.device,
                 dtype: torch.dtype, digests: Mapping[str, str]):
        self.names: tuple[str, ...] = tuple(sorted(members))
        self._members = {n: members[n] for n in self.names}
        self._digests = dict(digests)
        self.data_name, self.root, self.device, self.dtype = data_name, root, device, dtype
        first = self._members[self.names[0]]
        self.noise_schedule: VPSchedule = first.noise_schedule
        self.data: dict = dict(first.data)
        self.image_shape: tuple[int, int, int] = (int(self.data["channels"]), int(self.data["image_size"]),
                                                  int(self.data["image_size"]))
        self._denoisers = {n: EpsDenoiser(m.net, self.noise_schedule) for n, m in self._members.items()}

    @classmethod
    def load(cls, root: str | os.PathLike, data_name: str, names: Sequence[str] | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "Zoo":
        """Load `<root>/<data_name>/<name>.ckpt` for every name (None: every member file there)."""
        folder = Path(root) / data_name
        dev = resolve_device(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UserError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if names is None:
            found = sorted(p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else []
            names = []
            for p in found:
                held = _member_names_in(p)
                if held is not None:
                    names += held
                else:
                    log.warning("skipping %s: not a zoo member file", p)
            if not names:
                raise UserError(f"no zoo members in {folder}: train at least one with "
                                f"`{train_command('<name>', data_name)}` (e.g. model=small), or pass "
                                f"paths.checkpoints=<folder> if they live elsewhere")
        else:
            if isinstance(names, str):
                names = [names]
            names = [_check_name(n) for n in names]
            if not names:
                raise UserError("the zoo needs at least one member name, got an empty list")
        names = sorted(set(names))
        missing = [n for n in names if not (folder / f"{split_member_name(n)[0]}.ckpt").is_file()]
        if missing:
            cmds = "\n".join(f"  {train_command(n, data_name)}" for n in missing)
            raise UserError(f"zoo member(s) {', '.join(missing)} not found in {folder} "
                            f"(expected {', '.join(f'{n}.ckpt' for n in missing)}). Train them first:\n{cmds}")

        members: dict[str, Member] = {}
        digests: dict[str, str] = {}
        files: dict[str, tuple[Member, str]] = {}     # one load per file: stage members share its modules
        for n in names:
            base, stage = split_member_name(n)
            if base not in files:
                path = folder / f"{base}.ckpt"
                m = load_member(path)
                if m.name != base:
                    raise UserError(f"{path} holds member {m.name!r}, not {base!r}; rename the file to "
                                    f"{m.name}.ckpt or retrain with `{train_command(base, data_name)}`")
                digest = _state_digest(m)  # hashed on the CPU, before the move
                m.net.to(device=dev, dtype=dtype).eval().requires_grad_(False)
                files[base] = (m, digest)
            parent, digest = files[base]
            members[n] = parent if stage is None else stage_member(parent, stage)
            digests[n] = digest if stage is None else f"{digest}:stage{stage}"
        cls._check_compatible(members, folder)
        return cls(members, data_name, Path(root), dev, dtype, digests)

    @staticmethod
    def _check_compatible(members: Mapping[str, Member], folder: Path) -> None:
        names = sorted(members)
        ref_name = names[0]
        ref = members[ref_name]
        ref_noise = ref.noise_schedule.to_dict()
        for n in names[1:]:
            m = members[n]
            for key in DATA_FIELDS:
                if m.data.get(key) != ref.data.get(key):
                    raise UserError(f"zoo member {n!r} in {folder} has data.{key}={m.data.get(key)!r} but member "
                                    f"{ref_name!r} has {ref.data.get(key)!r}; members must share one data set. "
                                    f"Retrain {n!r} with the same data settings or leave it out of the zoo")
            noise = m.noise_schedule.to_dict()
            if noise != ref_noise:
                for key in sorted(set(noise) | set(ref_noise)):
                    if noise.get(key) != ref_noise.get(key):
                        break
                raise UserError(f"zoo member {n!r} in {folder} has noise.{key}={noise.get(key)!r} but member "
                                f"{ref_name!r} has {ref_noise.get(key)!r}; members must share one noise "
                                f"schedule. Retrain {n!r} with the same noise settings or leave it out of the zoo")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self):
        return iter(self.names)

    def __repr__(self) -> str:
        return (f"Zoo({self.data_name!r}, members={list(self.names)}, device={str(self.device)!r}, "
                f"dtype={dtype_name(self.dtype)})")

    def _unknown(self, name: str) -> UserError:
        return UserError(f"unknown zoo member {name!r}; this zoo ({self.data_name}) has: {', '.join(self.names)}")

    def member(self, name: str) -> Member:
        if name not in self._members:
            raise self._unknown(name)
        return self._members[name]

    def net(self, name: str) -> torch.nn.Module:
        return self.member(name).net

    def denoiser(self, name: str) -> EpsDenoiser:
        """The member's data-prediction denoiser (the same object on every call)."""
        if name not in self._denoisers:
            raise self._unknown(name)
        return self._denoisers[name]

    def routed_denoisers_for(self, model_schedule: ModelSchedule) -> list[EpsDenoiser]:
        """One denoiser per NFE, a multi-decoder stage member replaced by its routed member (the same weights inside
        the stage, the right decoder outside it): for references that evaluate between the NFE times (IIA's fine
        sub-steps). The routed members must be in the zoo."""
        return [self.denoiser(split_member_name(m)[0]) for m in model_schedule.members_per_nfe]

    def denoisers_for(self, model_schedule: ModelSchedule) -> list[EpsDenoiser]:
        """One denoiser per NFE of the schedule, in NFE order; ScheduleError if it names an unknown member or runs
        a member outside its valid time range."""
        model_schedule.validate(self.names)
        self.check_time_ranges(model_schedule)
        return [self._denoisers[m] for m in model_schedule.members_per_nfe]

    def time_range(self, name: str) -> tuple[float, float]:
        return self.member(name).t_range

    def ranges(self) -> MemberRanges:
        """The valid time ranges of the members restricted to part of the time axis (multi-decoder stages)."""
        return MemberRanges(tuple((n, *m.t_range) for n, m in self._members.items() if m.t_range != FULL))

    def out_of_range(self, model_schedule: ModelSchedule) -> list[tuple[int, int, str, float]]:
        """(step, NFE of the step, member, t) of every NFE whose member may not run at its time."""
        return self.ranges().out_of_range(model_schedule, self.noise_schedule)

    def check_time_ranges(self, model_schedule: ModelSchedule) -> None:
        bad = self.out_of_range(model_schedule)
        if bad:
            k, j, m, t = bad[0]
            lo, hi = self.time_range(m)
            raise ScheduleError(f"step {k} NFE {j} runs member {m!r} at t={t:.6g}, outside its valid range "
                                f"{'[' if lo == 0 else '('}{lo:g}, {hi:g}] (a multi-decoder stage is trained on its "
                                f"own stage only); use the routed member {split_member_name(m)[0]!r} or another "
                                f"stage there" + (f" ({len(bad)} NFEs are out of range)" if len(bad) > 1 else ""))

    def fingerprint(self, names: Sequence[str] | None = None) -> str:
        """Short hex sha256 over the member names and their weight digests; changes when a member is retrained.
        With `names`, that of the zoo holding just those members (what an AYS steps file of one member carries)."""
        names = self.names if names is None else sorted(names)
        for n in names:
            self.member(n)
        h = hashlib.sha256()
        for n in names:
            h.update(f"{n}={self._digests[n]};".encode())
        return h.hexdigest()[:16]


def routed_nets(zoo: Zoo) -> dict[str, torch.nn.Module]:
    """The zoo's routed multi-decoder members (not their stage paths): their cost per NFE depends on t."""
    nets = {n: zoo.net(n) for n in zoo.names if split_member_name(n)[1] is None}
    return {n: net for n, net in nets.items() if hasattr(net, "stage_ranges")}
