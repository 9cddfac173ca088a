"""`python sample.py`: images, a grid and optionally FID from one member or a ModelSchedule JSON.

Writes into paths.out_dir: images.npz (uint8 NHWC under `images`, plus the schedule JSON), grid.png,
schedule.json and summary.json (time, cost, NFE, FID with its extractor / sample count / seed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from oms_lightning.images import save_grid, to_uint8
from oms_lightning.io import atomic_path, atomic_write_text
from oms_lightning.jobs.common import load_zoo_and_schedule
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import save_schedule, schedule_to_json
from oms_lightning.zoo import latency_path, load_or_profile, resolve_device


def sample(cfg: DictConfig) -> dict:
    device = resolve_device(str(cfg.device))
    zoo, model_schedule = load_zoo_and_schedule(cfg, device)
    out_dir = Path(cfg.paths.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    profile = load_or_profile(zoo, latency_path(cfg.paths.checkpoints, str(cfg.data.name)),
                              batch_size=int(cfg.profile_batch_size), device=device)
    n = int(cfg.fid) if cfg.fid else int(cfg.n)
    start = time.perf_counter()
    images = generate(zoo, model_schedule, n, seed=int(cfg.seed), batch_size=int(cfg.batch_size), progress=True)
    wall = time.perf_counter() - start

    fid = None
    if cfg.fid:
        from oms_lightning.metrics import sample_metrics_for

        metrics = sample_metrics_for(cfg.data, cfg.paths.checkpoints, device)
        evaluator = metrics.evaluator
        # The metrics every comparison uses, and the same metrics between two disjoint sets of real images (the
        # noise floor): one seed gives no interval — compare samplers with search.py or oms_lightning.evaluation.
        scores = metrics.score(images, int(cfg.seed))
        fid = {"value": scores["fid"], "extractor": evaluator.extractor_name, "n": n, "seed": int(cfg.seed),
               **scores, "noise_floor": metrics.noise_floor(n, int(cfg.seed))}

    summary = {"schedule": model_schedule.compact(), "nfe": model_schedule.nfe, "n": n, "seed": int(cfg.seed),
               "seconds": round(wall, 3), "images_per_second": round(n / wall, 2),
               "cost_seconds_per_batch": profile.cost(model_schedule), "profile_batch_size": profile.batch_size,
               "device": profile.device_name, "fid": fid}
    write_outputs(out_dir, images, model_schedule, summary)
    report(out_dir, summary)
    return summary


def write_outputs(out_dir: Path, images: torch.Tensor, model_schedule: ModelSchedule, summary: dict) -> None:
    with atomic_path(out_dir / "images.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=to_uint8(images).numpy(), schedule=schedule_to_json(model_schedule))
    save_grid(images[:64], out_dir / "grid.png")
    save_schedule(model_schedule, out_dir / "schedule.json")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def report(out_dir: Path, s: dict) -> None:
    f = s["fid"]
    fid = (f", FID {f['value']:.3f} ({f['extractor']}, n={f['n']}, seed {s['seed']}), held-out KID "
           f"{f['kid_heldout']:.4f}, pixel FD {f['pixel_fd']:.3f}, copy rate {f['copy_rate']:.3f}; noise floor "
           f"(two real sets of {f['noise_floor']['n_used']}): FID {f['noise_floor']['fid']:.3f}") if f else ""
    print(f"\n{s['schedule']}\n{s['n']} images in {s['seconds']:.1f} s ({s['images_per_second']:.1f} img/s){fid}\n"
          f"cost {1000 * s['cost_seconds_per_batch']:.1f} ms per batch of {s['profile_batch_size']} "
          f"(profiled on {s['device']})\n"
          f"  images: {out_dir / 'images.npz'}\n  grid:   {out_dir / 'grid.png'}\n"
          f"  schedule: {out_dir / 'schedule.json'}\n  summary:  {out_dir / 'summary.json'}")
