"""Optimised timesteps on disk (`checkpoints/<data>/steps/<member>-<fingerprint>-<solver>.json`) and the one
function that turns a spacing name into times, `spacing=ays` included.

An AYS schedule belongs to one member's weights (it is optimised on that network's denoiser), so the file carries
the member's fingerprint — that of the zoo holding just that member, `Zoo.fingerprint()` — and is refused for any
other weights. It holds the σ-space schedule of every refinement level (σ = σ_t/α_t), the same levels as VP times,
the KLUB and sample quality of every sweep, the chosen sweep, and the settings.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from oms_lightning.diffusion.ays import AYSError, interpolate_log_linear, t_of_sigma, validate_sigmas
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.spacing import SPACINGS, timesteps, validate_times
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text, read_tagged_json

STEPS_FORMAT = "oms-lightning/steps-v1"
AYS = "ays"
ALL_SPACINGS = (*SPACINGS, AYS)


def steps_path(checkpoints: str | Path, data_name: str, member: str, fingerprint: str, solver: str) -> Path:
    return Path(checkpoints) / data_name / "steps" / f"{member}-{fingerprint}-{solver}.json"


def optimize_command(member: str, solver: str, data_name: str) -> str:
    return f"python optimize_steps.py model={member} solver={solver} data={data_name}"


def save_steps(path: str | Path, payload: dict) -> Path:
    atomic_write_text(path, json.dumps({"format": STEPS_FORMAT, **payload}, indent=2, allow_nan=False) + "\n")
    return Path(path)


def load_steps(path: str | Path, member: str, fingerprint: str, solver: str) -> dict:
    """The steps file at `path`, checked: its format, that it was optimised for these weights and this solver, and
    that every level is a valid schedule. UserError saying what is wrong and the command that makes a good one."""
    path = Path(path)
    fix = "run `optimize_steps.py` again for this member (it rewrites the file)"
    d = read_tagged_json(path, STEPS_FORMAT, "steps", fix)
    if d.get("member") != member or d.get("fingerprint") != fingerprint:
        raise UserError(f"{path} was optimised for member {d.get('member')!r} with weights {d.get('fingerprint')}, "
                        f"not {member!r} with weights {fingerprint}: a schedule optimised for other weights does "
                        f"not apply (the member was retrained?); {fix}")
    if d.get("solver") != solver:
        raise UserError(f"{path} was optimised for solver {d.get('solver')!r}, not {solver!r}; {fix}")
    try:
        levels = [validate_sigmas(lv["sigmas"]) for lv in d["levels"]]
    except (KeyError, TypeError, AYSError, ValueError) as e:
        raise UserError(f"{path} holds no valid schedule levels ({e}); {fix}") from None
    if not levels:
        raise UserError(f"{path} holds no schedule levels; {fix}")
    return d


def ays_levels(steps_file: dict) -> tuple[tuple[float, ...], ...]:
    """The σ schedules of a loaded steps file, one per refinement level: all that sampling needs from it."""
    return tuple(tuple(float(v) for v in lv["sigmas"]) for lv in steps_file["levels"])


# (member, solver) → that member's AYS σ levels for that solver: the AYS files a search found
AYSTable = Mapping[tuple[str, str], tuple[tuple[float, ...], ...]]
AYS_GRID = "ays:"


def ays_grid(member: str) -> str:
    """A search space's name for the time grid of `member`'s AYS schedule (usable by any member assignment)."""
    return f"{AYS_GRID}{member}"


def ays_table(checkpoints: str | Path, data_name: str, fingerprints: Mapping[str, str],
              solvers: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
    """The AYS files of these members' weights (member → its own fingerprint) for these solvers: (table, the
    (member, solver) pairs without one). A file that does not load is refused with its reason."""
    table, missing = {}, []
    for member, fp in sorted(fingerprints.items()):
        for solver in solvers:
            path = steps_path(checkpoints, data_name, member, fp, solver)
            if path.is_file():
                table[(member, solver)] = ays_levels(load_steps(path, member, fp, solver))
            else:
                missing.append((member, solver))
    return table, missing


def ays_sigmas(levels, n_steps: int) -> torch.Tensor:
    """n_steps + 1 noise levels from a steps file's σ `levels` (`ays_levels`): the optimised level with exactly
    n_steps steps, else log-linear interpolation of the finest level (AYS's rule for other step counts)."""
    levels = {len(lv) - 1: lv for lv in levels}
    if n_steps in levels:
        return torch.tensor(levels[n_steps], dtype=torch.float64)
    finest = max(levels)
    return interpolate_log_linear(torch.tensor(levels[finest], dtype=torch.float64), n_steps)


def times_from_sigmas(sigmas, noise: VPSchedule) -> list[float]:
    ts = t_of_sigma(noise, sigmas)
    ts[0] = 1.0 if abs(ts[0].item() - 1.0) < 1e-9 else ts[0].item()  # σ(1) round-trips to 1 ± ulps
    ts[-1] = max(noise.t_min, ts[-1].item())
    return validate_times(ts, noise).tolist()


def spacing_times(spacing: str, n_steps: int, noise: VPSchedule, t_end: float | None = None, *,
                  ays=None) -> list[float]:
    """n_steps + 1 times (noisy → clean) of a standard spacing or, for `ays`, of the σ levels `ays` of a steps file
    (`ays_levels`; their own ends: the optimiser kept them fixed, so `t_end` does not apply)."""
    if spacing == AYS:
        if ays is None:
            raise UserError("spacing=ays needs an optimised steps file; none was given")
        return times_from_sigmas(ays_sigmas(ays, n_steps), noise)
    if spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(ALL_SPACINGS)}")
    return timesteps(spacing, n_steps, noise, t_end=t_end).tolist()


def find_steps(checkpoints: str | Path, data_name: str, member: str, fingerprint: str, solver: str) -> dict:
    """The AYS steps file of this member's weights and solver, or a UserError naming the command that makes it."""
    get_solver(solver)
    path = steps_path(checkpoints, data_name, member, fingerprint, solver)
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob(f"{member}-*-{solver}.json")) if path.parent.is_dir() else []
        stale = f" ({', '.join(others)} belong to other weights of {member!r})" if others else ""
        raise UserError(f"no AYS steps for member {member!r} with solver {solver!r} at {path}{stale}; optimise them "
                        f"with `{optimize_command(member, solver, data_name)}`")
    return load_steps(path, member, fingerprint, solver)
