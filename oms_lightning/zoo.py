"""The zoo: named members loaded from `<root>/<data>/<member>.ckpt`, their measured latency, a schedule's cost.

    zoo = Zoo.load("checkpoints", "digits", ["small", "large"], device="cuda")
    profile = load_or_profile(zoo, "checkpoints/digits/latency.json", batch_size=256)
    denoisers = zoo.denoisers_for(schedule)      # one EpsDenoiser per NFE, for the solvers
    cost = profile.cost(schedule)                # seconds per batch (OMS-DPM's cost model)

Members are identified by name and always kept in sorted order (never a directory listing), so the slot
encoding of `to_slots(schedule, zoo.names)` is stable. All members must share the data set (name, image
size, channels) and the noise schedule, since one sampler mixes them within a single trajectory.

Latency profiles are a cache: a stored profile is reused only when it was measured for the same zoo
(`Zoo.fingerprint()`, which changes when any member is retrained), batch size, device and dtype, and is not
older than `max_age_hours`. An unreadable or corrupt profile file is not an error: it is logged as a warning,
measured again and overwritten, because the file holds nothing that cannot be regenerated.

Latency is measured in interleaved rounds, not member after member: on a shared machine the load drifts over
seconds, and timing one member in a quiet minute and the next in a busy one made "equal budget" comparisons
unequal (profiles drifted by −27 % / +16 % against fresh ones). After warming every member up, each round times
every member for a few passes, in an order rotated from round to round, so every member sees the same mix of
quiet and busy moments. A member's latency is the median of all its timed passes; its *spread* is
(p90 − p10) / median of its per-round medians, i.e. how far its speed moved while it was being measured.
`load_or_profile` measures again (up to `attempts` times) while a member's spread exceeds `max_spread`, keeps the
least noisy profile, and warns, rather than fails, when the machine stays too busy; a cached profile that is
too noisy is measured again instead of reused. Profile files written before spreads were recorded still load
(with no spreads, so they count as quiet).

`time_schedules` times whole schedules end to end (one batch each), interleaved (A, B, A, B, …), to check the
cost model (the sum of per-member latencies) against wall time; `cost_model_error` is its relative error.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from oms_lightning.checkpoint import MEMBER_FORMAT, Member, load_member
from oms_lightning.diffusion.denoiser import EpsDenoiser
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.stages import stage_index
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text, file_lock
from oms_lightning.member_ranges import FULL, STAGE_MARK, MemberRanges, split_member_name
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule, ScheduleError

log = logging.getLogger(__name__)

DATA_FIELDS = ("name", "image_size", "channels")
PROFILE_FORMAT = "oms-lightning/latency-profile-v1"
PROFILE_TIME = 0.5  # the (continuous) time every profiled forward pass runs at; latency does not depend on it
MAX_SPREAD = 0.25  # a member whose speed moved more than this (relative) while measured makes a profile noisy


MODEL_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def train_command(name: str, data_name: str) -> str:
    """The command that trains member `name`; a name without a preset in configs/model/ gets the way to add one,
    so the advice never fails in turn."""
    if name == "<name>" or (MODEL_PRESETS / f"{name}.yaml").is_file():
        return f"python train.py model={name} data={data_name}"
    presets = ", ".join(sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml")))
    return (f"(no preset {name!r} in configs/model/: add configs/model/{name}.yaml, or use one of {presets}, "
            f"e.g. python train.py model=small data={data_name})")


# ---------------------------------------------------------------------- device helpers
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_digest(member: Member) -> str:
    """sha256 of a member's weights (names, shapes, dtypes, bytes), data and noise schedule.

    Content-based, so a copied file keeps its digest and a retrained member (new weights) gets a new one; `meta`
    (step, val loss) is left out, since metadata alone must never invalidate the caches keyed by the zoo.
    """
    h = hashlib.sha256()
    header = {"name": member.name, "data": member.data, "noise": member.schedule.to_dict()}
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
        self.schedule: VPSchedule = first.schedule
        self.data: dict = dict(first.data)
        self.image_shape: tuple[int, int, int] = (int(self.data["channels"]), int(self.data["image_size"]),
                                                  int(self.data["image_size"]))
        self._denoisers = {n: EpsDenoiser(m.net, self.schedule) for n, m in self._members.items()}

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
        ref_noise = ref.schedule.to_dict()
        for n in names[1:]:
            m = members[n]
            for key in DATA_FIELDS:
                if m.data.get(key) != ref.data.get(key):
                    raise UserError(f"zoo member {n!r} in {folder} has data.{key}={m.data.get(key)!r} but member "
                                    f"{ref_name!r} has {ref.data.get(key)!r}; members must share one data set. "
                                    f"Retrain {n!r} with the same data settings or leave it out of the zoo")
            noise = m.schedule.to_dict()
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
                f"dtype={_dtype_name(self.dtype)})")

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
        return self.ranges().out_of_range(model_schedule, self.schedule)

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


# ---------------------------------------------------------------------- latency
_ADDED_KEYS = ("spread", "spread_limit", "routed", "noise")  # absent from older v1 files (still load)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum >= 1 else "non-negative"
        raise UserError(f"{name} must be a {kind} integer, got {value!r}")
    return value


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _checked_latency(latency: Any) -> dict[str, float]:
    if not isinstance(latency, Mapping) or not latency:
        raise ValueError("latency must be a non-empty mapping of member name → seconds")
    for k, v in latency.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"latency[{k!r}] must map a name to a number of seconds, got {v!r}")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"latency[{k!r}] must be finite and positive, got {v!r}")
    return {k: float(v) for k, v in sorted(latency.items())}


def _checked_routed(routed: Any, names: Sequence[str]) -> dict[str, dict]:
    if not isinstance(routed, Mapping):
        raise ValueError(f"routed must be a mapping, got {routed!r}")
    out = {}
    for name, entry in routed.items():
        if name not in names or not isinstance(entry, Mapping) or set(entry) != {"boundaries", "latency"}:
            raise ValueError(f"routed[{name!r}] must be a profiled member's {{'boundaries', 'latency'}}, got {entry!r}")
        boundaries, latency = list(entry["boundaries"]), list(entry["latency"])
        if len(latency) != len(boundaries) + 1 or not all(_is_number(v) and v > 0 for v in latency):
            raise ValueError(f"routed[{name!r}]: need one positive latency per stage ({len(boundaries) + 1}), "
                             f"got {latency!r}")
        out[name] = {"boundaries": [float(b) for b in boundaries], "latency": [float(v) for v in latency]}
    return out


def _checked_spread(spread: Any, names: Sequence[str]) -> dict[str, float]:
    if not isinstance(spread, Mapping):
        raise ValueError(f"spread must be a mapping of member name → relative spread, got {spread!r}")
    for k, v in spread.items():
        if k not in names:
            raise ValueError(f"spread[{k!r}] is for a member the profile has no latency for")
        if not _is_number(v) or v < 0:
            raise ValueError(f"spread[{k!r}] must be a finite non-negative number, got {v!r}")
    return {k: float(v) for k, v in sorted(spread.items())}


@dataclass(frozen=True)
class LatencyProfile:
    """Median seconds per forward pass of one batch, per member, how steady each was, and what it was measured on.

    `spread[name]` is how far the member's speed moved while it was measured (see the module docstring); it is
    empty for profiles measured before spreads were recorded. `spread_limit` is the largest spread accepted as
    quiet when the profile was measured or reused; `noisy` says whether some member exceeded it.
    """

    latency: dict[str, float]
    batch_size: int
    device_name: str
    dtype: str
    zoo_fingerprint: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    spread: dict[str, float] = field(default_factory=dict)
    spread_limit: float = MAX_SPREAD
    # a routed multi-decoder member's cost depends on t (each NFE runs its stage's decoder): member → {"boundaries":
    # [...], "latency": [seconds per stage]}, with the zoo's noise schedule to place every NFE (`cost`)
    routed: dict[str, dict] = field(default_factory=dict)
    noise: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "latency", _checked_latency(self.latency))
        object.__setattr__(self, "spread", _checked_spread(self.spread, tuple(self.latency)))
        if not _is_number(self.spread_limit) or self.spread_limit < 0:
            raise ValueError(f"spread_limit must be a finite non-negative number, got {self.spread_limit!r}")
        object.__setattr__(self, "spread_limit", float(self.spread_limit))
        object.__setattr__(self, "routed", _checked_routed(self.routed, tuple(self.latency)))
        if self.routed and not isinstance(self.noise, Mapping):
            raise ValueError("a profile with routed multi-decoder members needs the zoo's noise schedule (noise)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        for name in ("device_name", "dtype", "zoo_fingerprint", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        self.created_at()  # parses, or ValueError

    def created_at(self) -> datetime:
        dt = datetime.fromisoformat(self.created)
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)

    @property
    def worst_spread(self) -> float:
        """The largest member spread; 0 when none was recorded (an old profile counts as quiet)."""
        return max(self.spread.values(), default=0.0)

    @property
    def noisy(self) -> bool:
        return self.worst_spread > self.spread_limit

    def noisy_members(self, limit: float | None = None) -> dict[str, float]:
        """Members whose spread exceeds `limit` (default: spread_limit), noisiest first."""
        limit = self.spread_limit if limit is None else limit
        over = [(n, v) for n, v in self.spread.items() if v > limit]
        return dict(sorted(over, key=lambda item: -item[1]))

    def cost(self, model_schedule: ModelSchedule) -> float:
        """Seconds per batch of the schedule: the sum of its members' latencies over all NFEs, where an NFE of a
        routed multi-decoder member costs the latency of the stage its time falls in."""
        if not any(m in self.routed for m in model_schedule.member_names):
            return model_schedule.cost(self.latency)
        times = get_solver(model_schedule.solver).nfe_times(model_schedule.times, model_schedule.orders,
                                                            self._noise_schedule)
        total = model_schedule.cost({m: (0.0 if m in self.routed else v) for m, v in self.latency.items()})
        for m, t in zip(model_schedule.members_per_nfe, times):
            if m in self.routed:
                stage = int(stage_index(torch.tensor(t, dtype=torch.float32), self.routed[m]["boundaries"]))
                total += self.routed[m]["latency"][stage]
        return total

    @functools.cached_property
    def _noise_schedule(self) -> VPSchedule:
        return VPSchedule.from_dict(dict(self.noise))

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> "LatencyProfile":
        if not isinstance(d, Mapping) or d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a latency profile (expected format {PROFILE_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(_ADDED_KEYS) - set(d))
        if missing:
            raise ValueError(f"latency profile is missing key(s) {missing}")
        return cls(**{k: d[k] for k in names if k in d})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyProfile":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"latency profile not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path} is not a valid latency profile ({e}); delete it to measure again") from None

    def matches(self, zoo: Zoo, batch_size: int, device_name: str) -> bool:
        return (self.zoo_fingerprint == zoo.fingerprint() and self.batch_size == batch_size
                and self.device_name == device_name and self.dtype == _dtype_name(zoo.dtype)
                and set(self.latency) == set(zoo.names) and set(self.routed) == set(_routed_nets(zoo)))


def profile_latency(zoo: Zoo, batch_size: int, warmup: int = 3, repeats: int = 10,
                    device: str | torch.device | None = None, rounds: int = 5) -> LatencyProfile:
    """Median wall time of one forward pass on a (batch_size, *image_shape) batch, per member, and its spread.

    Runs under torch.inference_mode at a fixed t. Every member first gets `warmup` untimed calls; then, in each
    of `rounds` rounds, every member (in an order rotated each round) is timed for max(1, repeats // rounds)
    calls, so the total per member is rounds × that (not exactly `repeats` when it does not divide). On CUDA each
    call is bracketed by CUDA events; elsewhere it is timed with time.perf_counter around a device sync. The
    spread is taken over the per-round medians (over the passes themselves when there is a single round).
    `device` defaults to the zoo's; on another device every net is profiled on a temporary copy (all copies are
    resident at once, since rounds interleave), so the zoo itself is never moved. Global torch settings are
    untouched.
    """
    _check_count("batch_size", batch_size, 1)
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    _check_count("rounds", rounds, 1)
    dev = zoo.device if device is None else resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *zoo.image_shape, generator=gen).to(device=dev, dtype=zoo.dtype)
    t = torch.full((batch_size,), PROFILE_TIME, dtype=torch.float32, device=dev)
    nets = {name: _net_on(zoo, name, dev) for name in zoo.names}
    routed = _routed_nets(zoo)
    for name, net in routed.items():   # each stage of a routed member, timed at a time inside it
        nets.update({_stage_key(name, k): _AtTime(nets[name], (lo + hi) / 2)
                     for k, (lo, hi) in enumerate(net.stage_ranges())})
    with torch.inference_mode():
        for net in nets.values():  # all warmed up before any timing, so no member is timed cold
            for _ in range(warmup):
                net(x, t)
        per_round = _interleaved_rounds(nets, x, t, rounds, max(1, repeats // rounds), dev)
    # A forward pass never takes zero time; guard against a coarse clock so the profile stays valid.
    seconds = {n: max(statistics.median(_flat(r)), 1e-9) for n, r in per_round.items()}
    spread = {n: _round_spread(r) for n, r in per_round.items() if n in zoo.names}
    stages = {name: {"boundaries": list(net.boundaries),
                     "latency": [seconds[_stage_key(name, k)] for k in range(net.num_stages)]}
              for name, net in routed.items()}
    return LatencyProfile({n: seconds[n] for n in zoo.names}, batch_size, device_description(dev),
                          _dtype_name(zoo.dtype), zoo.fingerprint(), spread=spread, routed=stages,
                          noise=zoo.schedule.to_dict() if stages else None)


def _routed_nets(zoo: Zoo) -> dict[str, torch.nn.Module]:
    """The zoo's routed multi-decoder members (not their stage paths): their cost per NFE depends on t."""
    nets = {n: zoo.net(n) for n in zoo.names if split_member_name(n)[1] is None}
    return {n: net for n, net in nets.items() if hasattr(net, "stage_ranges")}


def _stage_key(name: str, stage: int) -> str:
    return f"{name}\0stage{stage}"   # never a member name (names are file stems)


class _AtTime(torch.nn.Module):
    """A routed net run at a fixed time, so the whole batch goes to one stage's decoder."""

    def __init__(self, net: torch.nn.Module, t: float):
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, torch.full_like(t, self.t))


def _net_on(zoo: Zoo, name: str, dev: torch.device) -> torch.nn.Module:
    net = zoo.net(name)
    if getattr(net, "allow_outside_range", True) is False:
        net = copy.copy(net)                 # a stage path, profiled at PROFILE_TIME whatever its range: its cost
        net.allow_outside_range = True       # does not depend on t (the copy shares the modules)
    return net if dev == zoo.device else copy.deepcopy(net).to(dev)


def _rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The names rotated by the round index: over the rounds every member takes every position in turn, so none
    is always timed right after the same neighbour (whose caches and clocks it would inherit)."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def _interleaved_rounds(nets: Mapping[str, torch.nn.Module], x, t, rounds: int, passes: int,
                        dev: torch.device) -> dict[str, list[list[float]]]:
    """Per member, per round, the seconds of each timed pass."""
    times: dict[str, list[list[float]]] = {n: [] for n in nets}
    for r in range(rounds):
        for name in _rotated(tuple(nets), r):
            times[name].append(_timed_passes(nets[name], x, t, passes, dev))
    return times


def _timed_passes(net, x, t, passes: int, dev: torch.device) -> list[float]:
    """Seconds of each of `passes` forward calls (the caller holds inference mode)."""
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.synchronize(dev)
            events = []
            for _ in range(passes):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                net(x, t)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(dev)
            return [s.elapsed_time(e) / 1000.0 for s, e in events]
    times = []
    for _ in range(passes):
        times.append(_wall_seconds(lambda: net(x, t), dev))
    return times


def _synchronize(dev: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers exactly the calls in between (CPU: no-op)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type != "cpu":
        sync = getattr(getattr(torch, dev.type, None), "synchronize", None)
        if sync:
            sync()


def _wall_seconds(fn, dev: torch.device) -> float:
    _synchronize(dev)
    t0 = time.perf_counter()
    fn()
    _synchronize(dev)
    return time.perf_counter() - t0


def _flat(per_round: Sequence[Sequence[float]]) -> list[float]:
    return [s for r in per_round for s in r]


def _round_spread(per_round: Sequence[Sequence[float]]) -> float:
    """(p90 − p10) / median of the per-round medians: how far the speed drifted during the measurement, which
    is what made member-after-member profiles unreliable. One round has no drift to see, so its passes are used."""
    values = [statistics.median(r) for r in per_round] if len(per_round) > 1 else _flat(per_round)
    if len(values) < 2:
        return 0.0
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return (deciles[-1] - deciles[0]) / max(statistics.median(values), 1e-9)


def latency_path(checkpoints: str | os.PathLike, data_name: str) -> Path:
    """The one latency cache of a zoo, shared by sample.py and search.py so both price schedules alike."""
    return Path(checkpoints) / data_name / "latency.json"


def load_or_profile(zoo: Zoo, path: str | os.PathLike, batch_size: int, device: str | torch.device | None = None,
                    max_age_hours: float = 24 * 7, max_spread: float = MAX_SPREAD, attempts: int = 3,
                    **kw) -> LatencyProfile:
    """The stored profile at `path` if it fits this zoo, batch size, device and dtype, is fresh and quiet, else a
    new one.

    The file is a cache: a missing, corrupt or foreign file is measured again (corrupt ones with a logged
    warning) and overwritten atomically; a failure to write it is logged and the new profile still returned.
    A profile (stored or new) is quiet when no member's spread exceeds `max_spread` (a large value turns the
    check off). A new profile that is not is measured again, up to `attempts` times in all, and the least noisy
    one kept; if even that is noisy, a warning names the members and the profile is used anyway (marked
    `noisy`), since a busy laptop must still work. `kw` goes to `profile_latency` (warmup, repeats, rounds).
    """
    if not _is_number(max_spread) or max_spread < 0:
        raise UserError(f"max_spread must be a finite non-negative number, got {max_spread!r}")
    _check_count("attempts", attempts, 1)
    path = Path(path)
    dev = zoo.device if device is None else resolve_device(device)
    # one measurement at a time: two processes timing at once would each see a busy machine
    with file_lock(path.with_name(path.name + ".lock"),
                   waiting=lambda holder: log.info("waiting for %s to finish profiling the zoo", holder)):
        return _stored_or_new_profile(zoo, path, batch_size, dev, max_age_hours, max_spread, attempts, kw)


def _stored_or_new_profile(zoo: Zoo, path: Path, batch_size: int, dev: torch.device, max_age_hours: float,
                           max_spread: float, attempts: int, kw: Mapping[str, Any]) -> LatencyProfile:
    stored = _reusable_profile(zoo, path, batch_size, dev, max_age_hours, max_spread)
    if stored is not None:
        return dataclasses.replace(stored, spread_limit=max_spread)
    profile = _least_noisy_profile(zoo, batch_size, dev, max_spread, attempts, kw)
    if profile.noisy:
        _warn_noisy(profile, attempts)
    try:
        profile.save(path)
    except OSError as e:
        log.warning("could not write latency profile cache %s (%s); continuing without it", path, e)
    return profile


def _reusable_profile(zoo: Zoo, path: Path, batch_size: int, dev: torch.device, max_age_hours: float,
                      max_spread: float) -> LatencyProfile | None:
    """The profile stored at `path` when it may be reused as is, else None (with the reason logged)."""
    if not path.exists():
        return None
    try:
        stored = LatencyProfile.load(path)
    except UserError as e:
        log.warning("latency profile cache %s is unreadable (%s); measuring again", path, e)
        return None
    age_h = (datetime.now(timezone.utc) - stored.created_at()).total_seconds() / 3600.0
    if not (stored.matches(zoo, batch_size, device_description(dev)) and 0 <= age_h <= max_age_hours):
        log.info("latency profile %s does not fit this zoo/batch size/device/dtype or is stale; measuring again",
                 path)
        return None
    if stored.worst_spread > max_spread:
        # It was kept on a busy machine; this may be a quieter moment, and a noisy profile skews every budget.
        log.info("latency profile %s is noisy (spread %.0f%% > %.0f%%); measuring again", path,
                 100 * stored.worst_spread, 100 * max_spread)
        return None
    log.info("reusing latency profile %s (%.1f h old)", path, age_h)
    return stored


def _least_noisy_profile(zoo: Zoo, batch_size: int, dev: torch.device, max_spread: float, attempts: int,
                         kw: Mapping[str, Any]) -> LatencyProfile:
    best = None
    for attempt in range(1, attempts + 1):
        profile = profile_latency(zoo, batch_size, device=dev, **kw)
        if best is None or profile.worst_spread < best.worst_spread:
            best = profile
        if best.worst_spread <= max_spread:
            break
        if attempt < attempts:
            log.info("latency profile attempt %d/%d is noisy (spread %.0f%% > %.0f%%); measuring again", attempt,
                     attempts, 100 * profile.worst_spread, 100 * max_spread)
    return dataclasses.replace(best, spread_limit=max_spread)


def _warn_noisy(profile: LatencyProfile, attempts: int) -> None:
    members = ", ".join(f"{n!r} by {100 * v:.0f}%" for n, v in profile.noisy_members().items())
    log.warning("latency profile is noisy after %d attempt(s): the speed of member %s varied between measuring "
                "rounds (max_spread allows %.0f%%). The machine is busy (other processes compete for it), so costs "
                "and budgets from this profile are approximate; it is used anyway. Close other work for a reliable "
                "profile (a noisy cached profile is measured again next time).", attempts, members,
                100 * profile.spread_limit)


# ---------------------------------------------------------------------- wall time of whole schedules
def time_schedules(zoo: Zoo, schedules: Sequence[ModelSchedule], batch_size: int, rounds: int = 3,
                   seed: int = 0, profile_rounds: bool = False) -> list[dict] | tuple[list[dict], dict[str, float]]:
    """Wall seconds to generate one batch of `batch_size` images with each schedule, timed in interleaved rounds.

    Each schedule first runs once untimed (warm-up; it also validates them all before any timing); then every
    round runs the schedules in order (A, B, …, A, B, …), so a busy spell slows them alike rather than whichever
    ran during it. Returns, per schedule in order, {"wall_seconds": median, "wall_spread": (max − min) / median,
    "runs": rounds}. Device work is synchronised around each run, so queued kernels are not missed.

    With `profile_rounds`, every round first re-measures each member's latency (one short interleaved profile
    round), and the median of those is returned too, (rows, latency): the cost model re-priced on the machine as
    the timing found it, so cost and wall time are compared on the same machine state.
    """
    _check_count("batch_size", batch_size, 1)
    _check_count("rounds", rounds, 1)
    schedules = list(schedules)

    def run(schedule: ModelSchedule) -> None:
        generate(zoo, schedule, batch_size, seed=seed, batch_size=batch_size)

    for s in schedules:
        run(s)
    walls: list[list[float]] = [[] for _ in schedules]
    latencies: list[dict[str, float]] = []
    for r in range(rounds):
        if profile_rounds:
            latencies.append(profile_latency(zoo, batch_size, warmup=1 if r == 0 else 0, repeats=2, rounds=1).latency)
        for i, s in enumerate(schedules):
            walls[i].append(_wall_seconds(lambda: run(s), zoo.device))
    rows = [_wall_summary(w) for w in walls]
    if not profile_rounds:
        return rows
    return rows, {n: statistics.median(lat[n] for lat in latencies) for n in latencies[0]}


def machine_speed_change(before: Mapping[str, float], now: Mapping[str, float]) -> float:
    """How much slower (> 0) or faster (< 0) the machine ran members now than when they were profiled: the median
    over members of latency_now / latency_profiled − 1."""
    return statistics.median(now[n] / before[n] for n in now if n in before and before[n] > 0) - 1.0


def _wall_summary(walls: Sequence[float]) -> dict:
    median = max(statistics.median(walls), 1e-9)  # a coarse clock must not yield a zero time
    return {"wall_seconds": median, "wall_spread": (max(walls) - min(walls)) / median, "runs": len(walls)}


def cost_model_error(cost_seconds: float, wall_seconds: float) -> float:
    """Relative error of the cost model against measured wall time: (cost − wall) / wall (negative: cost is low)."""
    if not _is_number(cost_seconds) or not _is_number(wall_seconds) or wall_seconds <= 0:
        raise ValueError(f"need a finite cost and a finite positive wall time, got {cost_seconds!r}, "
                         f"{wall_seconds!r}")
    return (cost_seconds - wall_seconds) / wall_seconds
