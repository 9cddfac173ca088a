"""`python cluster_stages.py data=D stages=K`: stage boundaries for a multi-decoder U-Net (PAPERS.md §4).

training images of D → `diffusion.stages.cluster_stages` (the paper's timestep clustering with the exact optimal
denoiser of the training set, under the same VP schedule as training) → `checkpoints/<D>/stages.json`, read by
`model=multistage` training through `oms_lightning.diffusion.stages_file.load_stages` → `stages.png` in the run
folder (and a copy next to stages.json): both similarity curves, α, the boundaries and the paper's two baselines.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.stages import CLUSTER_STAGE_COUNTS, StageClustering, cluster_stages
from oms_lightning.diffusion.stages_file import load_stages, save_stages, stages_path
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_path
from oms_lightning.progress import job_log
from oms_lightning.zoo import resolve_device


log = job_log("cluster_stages")


# ----------------------------------------------------------------------------------------------- settings
def check_settings(cfg: DictConfig) -> dict:
    """The run's settings as plain data, each wrong one refused with its own line before any work."""
    if cfg.stages not in CLUSTER_STAGE_COUNTS or isinstance(cfg.stages, bool):
        raise UserError(f"stages must be 2 or 3 (the paper's clustering rule defines boundaries for these), got "
                        f"{cfg.stages!r}")
    if not _is_number(cfg.alpha) or not 0 < cfg.alpha < 1:
        raise UserError(f"alpha (the average similarity each end stage keeps to its end) must lie in (0, 1), got "
                        f"{cfg.alpha!r}")
    for key, least in (("n_images", 2), ("n_times", 3), ("chunk_size", 1), ("seed", 0)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key} must be an integer >= {least}, got {value!r}")
    if cfg.eta is not None and (not _is_number(cfg.eta) or not cfg.eta > 0):
        raise UserError(f"eta (the pixel agreement tolerance, in data units) must be a positive number or null "
                        f"for the paper's 2/255 of the pixel range, got {cfg.eta!r}")
    if cfg.data.get("image_size") is None:
        raise UserError(f"stage clustering compares denoised images pixel by pixel; data={cfg.data.name} has no "
                        f"images (choose image data, e.g. data=digits)")
    return {"stages": int(cfg.stages), "alpha": float(cfg.alpha), "eta": None if cfg.eta is None else float(cfg.eta),
            "n_images": int(cfg.n_images), "n_times": int(cfg.n_times), "seed": int(cfg.seed),
            "chunk_size": int(cfg.chunk_size)}


def noise_schedule_from(cfg: DictConfig) -> VPSchedule:
    """The VP schedule from `diffusion:`, the same keys as train.yaml's (training refuses stages from another)."""
    try:
        return VPSchedule.from_dict(OmegaConf.to_container(cfg.diffusion, resolve=True))
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid diffusion settings: {e}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------- the job
def cluster_stages_job(cfg: DictConfig) -> dict:
    settings = check_settings(cfg)
    noise_schedule = noise_schedule_from(cfg)
    device = resolve_device(str(cfg.device))
    data_name = str(cfg.data.name)
    path = stages_path(cfg.paths.checkpoints, data_name)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = instantiate(cfg.data.module).real_images("train").to(device)
    log(f"{data_name}: {settings['stages']} stages from {min(settings['n_images'], len(data))} of {len(data)} "
        f"training images, {settings['n_times']} times, {noise_schedule}, on {device}")
    started = time.perf_counter()
    result = cluster_stages(data, noise_schedule, stages=settings["stages"], alpha=settings["alpha"],
                            eta=settings["eta"], n_images=settings["n_images"], n_times=settings["n_times"], seed=settings["seed"],
                            chunk_size=settings["chunk_size"])
    seconds = time.perf_counter() - started

    payload = stages_payload(result, data_name, noise_schedule, len(data), seconds)
    note_replaced(path, payload["boundaries"])
    save_stages(path, payload)
    plot_path = run_dir / "stages.png"
    plot(payload, plot_path)
    copy_file(plot_path, path.with_suffix(".png"))
    report(payload, path, plot_path)
    return {**payload, "stages_file": str(path), "plot": str(plot_path)}


def stages_payload(result: StageClustering, data_name: str, noise_schedule: VPSchedule, train_images: int,
                   seconds: float) -> dict:
    """stages.json's content (without the format tag, which `save_stages` adds)."""
    settings = {k: v for k, v in result.settings.items() if k not in ("schedule", "stages")}  # both at top level
    return {"data": data_name, "stages": result.settings["stages"], "boundaries": list(result.boundaries),
            "noise": noise_schedule.to_dict(),
            "settings": {**settings, "train_images": train_images},
            "alternatives": {k: list(v) for k, v in result.baselines.items()},
            "curves": {"times": result.times.tolist(), "to_clean": result.to_clean.tolist(),
                       "to_noisy": result.to_noisy.tolist()},
            "cluster_seconds": round(seconds, 2)}


def note_replaced(path: Path, boundaries: list[float]) -> None:
    """Say so when a previous stages.json with other boundaries is replaced: members trained on it keep theirs."""
    if not path.is_file():
        return
    try:
        old = list(load_stages(path))
    except UserError:
        log(f"replacing the unreadable {path}")
        return
    if old != boundaries:
        log(f"replacing {path} (boundaries were {fmt(old)}); members already trained keep the boundaries they "
            f"were trained with")


def copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def report(payload: dict, path: Path, plot_path: Path) -> None:
    s = payload["settings"]
    rule = f"alpha {s['alpha']}" if s["rule"] == "alpha" else "curve crossing"
    print(f"\n{payload['data']}: {payload['stages']} stages by timestep clustering ({rule}, eta {s['eta']:.4g}, "
          f"{s['n_images']} images, {s['n_times']} times, {payload['cluster_seconds']:.1f} s)")
    print(f"  boundaries:      {fmt(payload['boundaries'])}")
    for name, values in payload["alternatives"].items():
        print(f"  {name + ':':<16} {fmt(values)}")
    print(f"\n  stages file: {path}\n  plot:        {plot_path} (copy: {path.with_suffix('.png')})")


# ----------------------------------------------------------------------------------------------- plot
def plot(payload: dict, out: Path) -> None:
    """Similarity to the clean-end and noisy-end denoisers against t, α (3 stages), the boundaries (solid) and the
    time-uniform and logSNR-uniform alternatives (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, s = payload["curves"], payload["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curves["times"], curves["to_clean"], color="tab:blue", label="similarity to D*(·, t_min)")
    ax.plot(curves["times"], curves["to_noisy"], color="tab:red", label="similarity to D*(·, 1)")
    if s["rule"] == "alpha":
        ax.axhline(s["alpha"], color="grey", lw=0.8, ls=":", label=f"α = {s['alpha']}")
    for i, b in enumerate(payload["boundaries"]):
        ax.axvline(b, color="black", lw=1.5, label="clustered boundaries" if i == 0 else None)
    for (name, values), color in zip(payload["alternatives"].items(), ("tab:green", "tab:purple")):
        for i, b in enumerate(values):
            ax.axvline(b, color=color, lw=1, ls="--", label=name.replace("_", "-") if i == 0 else None)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("t")
    ax.set_ylabel(f"fraction of pixels within η = {s['eta']:.3g}")
    ax.set_title(f"{payload['data']}: {payload['stages']} stages, boundaries {fmt(payload['boundaries'])}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

