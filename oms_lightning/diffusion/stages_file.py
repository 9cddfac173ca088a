"""Stage boundaries on disk (`checkpoints/<data>/stages.json`, written by `cluster_stages.py`) and their loader.

A multi-decoder U-Net (PAPERS.md §4) routes each timestep to one decoder by its stage, so the boundaries are part of
the model: training (`model=multistage`) reads them with `load_stages`, which refuses a file that is missing,
corrupt, of another format, holds invalid boundaries, another stage count, or was clustered under another VP noise
schedule (the optimal denoiser, hence the clustering, depends on the schedule).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.stages import StageError, validate_boundaries
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text, read_tagged_json

STAGES_FORMAT = "oms-lightning/stages-v1"
STAGES_FILE = "stages.json"
DEFAULT_CHECKPOINTS = Path("checkpoints")

# The schedule keys that change α_t and σ_t (and t_min, the grid's clean end) for each kind: a cosine schedule
# is not "another schedule" because of a beta it never uses.
SCHEDULE_KEYS = {"linear": ("kind", "beta_min", "beta_max", "t_min"), "cosine": ("kind", "cosine_s", "t_min")}


def stages_path(checkpoints: str | Path, data_name: str) -> Path:
    return Path(checkpoints) / data_name / STAGES_FILE


def cluster_command(data_name: str, stages: int | None = None, checkpoints: str | Path | None = None,
                    noise: Mapping | None = None) -> str:
    """The command that writes the stages file for this data (and these settings, when given)."""
    parts = ["python cluster_stages.py", f"data={data_name}"]
    if stages is not None:
        parts.append(f"stages={stages}")
    if checkpoints is not None and Path(checkpoints) != DEFAULT_CHECKPOINTS:
        parts.append(f"paths.checkpoints={checkpoints}")
    parts += [f"diffusion.{k}={v}" for k, v in (noise or {}).items()]
    return " ".join(parts)


def save_stages(path: str | Path, payload: dict) -> Path:
    atomic_write_text(path, json.dumps({"format": STAGES_FORMAT, **payload}, indent=2, allow_nan=False) + "\n")
    return Path(path)


def load_stages(path: str | Path, stages: int | None = None,
                noise: Mapping | VPSchedule | None = None) -> tuple[float, ...]:
    """The stage boundaries t1 < … < t_{K−1} in `path`, checked. UserError naming the fix when the file is missing,
    unreadable, of another format, holds invalid boundaries, another stage count than `stages`, or was clustered
    under another VP schedule than `noise` (a VPSchedule or its `to_dict()`). None skips that check."""
    path = Path(path)
    data_name, checkpoints = path.parent.name, path.parent.parent
    fix = f"run `{cluster_command(data_name, stages, checkpoints)}` (it rewrites the file)"
    d = read_stages_file(path, fix)
    boundaries = checked_boundaries(d, path, fix)
    if stages is not None and len(boundaries) + 1 != stages:
        raise UserError(f"{path} holds {len(boundaries) + 1} stages (boundaries {list(boundaries)}), but "
                        f"{stages} were asked for; {fix}")
    if noise is not None:
        check_same_schedule(d, noise, path, data_name, len(boundaries) + 1, checkpoints)
    return boundaries


def read_stages_file(path: Path, fix: str) -> dict:
    """The file's JSON object with the right format tag, or UserError."""
    if not path.is_file():
        raise UserError(f"no stage boundaries at {path}; {fix.replace(' (it rewrites the file)', '')} first")
    d = read_tagged_json(path, STAGES_FORMAT, "stages", fix)
    return d


def checked_boundaries(d: dict, path: Path, fix: str) -> tuple[float, ...]:
    """The file's boundaries, sorted and inside (t_min, 1) of its own schedule, and as many as its stage count."""
    raw = d.get("boundaries")
    if not isinstance(raw, list):
        raise UserError(f"{path} holds no list of stage boundaries (got {raw!r}); {fix}")
    try:
        t_min = VPSchedule.from_dict(d["noise"]).t_min if isinstance(d.get("noise"), dict) else None
        stages = d.get("stages", len(raw) + 1)
        return validate_boundaries(raw, stages, t_min)
    except (StageError, TypeError, ValueError) as e:
        raise UserError(f"{path} holds invalid stage boundaries: {e}; {fix}") from None


def check_same_schedule(d: dict, noise: Mapping | VPSchedule, path: Path, data_name: str, stages: int,
                        checkpoints: Path) -> None:
    """Refuse boundaries clustered under another VP schedule than the one the model trains with."""
    wanted = schedule_identity(noise.to_dict() if isinstance(noise, VPSchedule) else dict(noise))
    found = schedule_identity(d.get("noise"))
    if found != wanted:
        rerun = cluster_command(data_name, stages, checkpoints, wanted)
        raise UserError(f"{path} was clustered under noise schedule {found}, not the training's {wanted}: the "
                        f"optimal denoiser (and so the stages) depend on it; run `{rerun}` (the same diffusion "
                        f"settings as training)")


def schedule_identity(noise) -> dict | None:
    """The keys of a schedule dict that matter for its kind, as floats (so 20 and 20.0 are one schedule)."""
    if not isinstance(noise, Mapping) or noise.get("kind") not in SCHEDULE_KEYS:
        return None
    return {k: (noise.get(k) if k == "kind" else _as_float(noise.get(k))) for k in SCHEDULE_KEYS[noise["kind"]]}


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
