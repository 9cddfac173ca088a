"""Measuring latency: the per-member profiler, its cache file (`load_or_profile`), and wall-clock timing of whole
schedules to check the cost model.

    profile = load_or_profile(zoo, latency_path("checkpoints", "digits"), batch_size=256)

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
too noisy is measured again instead of reused.

`time_schedules` times whole schedules end to end (one batch each), interleaved (A, B, A, B, …), to check the
cost model (the sum of per-member latencies) against wall time; `cost_model_error` is its relative error.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from oms_lightning.errors import UserError
from oms_lightning.io import file_lock
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule
from oms_lightning.zoo.devices import device_description, dtype_name, resolve_device
from oms_lightning.zoo.latency import MAX_SPREAD, LatencyProfile, is_finite_number
from oms_lightning.zoo.members import Zoo, routed_nets

log = logging.getLogger(__name__)

PROFILE_TIME = 0.5  # the (continuous) time every profiled forward pass runs at; latency does not depend on it


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum >= 1 else "non-negative"
        raise UserError(f"{name} must be a {kind} integer, got {value!r}")
    return value


# ---------------------------------------------------------------------- per-member latency
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
    routed = routed_nets(zoo)
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
                          dtype_name(zoo.dtype), zoo.fingerprint(), spread=spread, routed=stages,
                          noise=zoo.noise_schedule.to_dict() if stages else None)


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


# ---------------------------------------------------------------------- the cache file
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
    if not is_finite_number(max_spread) or max_spread < 0:
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
    if not is_finite_number(cost_seconds) or not is_finite_number(wall_seconds) or wall_seconds <= 0:
        raise ValueError(f"need a finite cost and a finite positive wall time, got {cost_seconds!r}, "
                         f"{wall_seconds!r}")
    return (cost_seconds - wall_seconds) / wall_seconds
