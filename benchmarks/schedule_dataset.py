"""Schedule→FID dataset generation rate on a trained zoo, and where the time goes (sampling vs FID).

    python benchmarks/schedule_dataset.py                  # digits zoo in checkpoints/digits, CPU
    python benchmarks/schedule_dataset.py --n-samples 1000 --schedules 50
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_lightning.metrics import fid_evaluator_for  # noqa: E402
from oms_lightning.sampling import generate  # noqa: E402
from oms_lightning.search.space import SlotSpace, random_schedules  # noqa: E402
from oms_lightning.zoo import Zoo, device_description  # noqa: E402


def main(args) -> None:
    zoo = Zoo.load(args.checkpoints, "digits", names=args.members, device=args.device)
    evaluator = fid_evaluator_for(OmegaConf.load(ROOT / "configs" / "data" / "digits.yaml"), args.checkpoints,
                                  args.device)   # the wiring every job uses
    schedules = random_schedules(SlotSpace(zoo.names, args.max_steps, zoo.noise_schedule), args.schedules, seed=args.seed,
                                 null_prob=args.null_prob)
    sampling = fid = 0.0
    nfes = []
    for s in schedules:
        start = time.perf_counter()
        images = generate(zoo, s, args.n_samples, seed=0, batch_size=args.batch)
        middle = time.perf_counter()
        evaluator.fid(images, seed=0)
        end = time.perf_counter()
        sampling, fid = sampling + middle - start, fid + end - middle
        nfes.append(s.nfe)
    total = sampling + fid
    print(f"# python {' '.join(sys.argv)}\n# device: {device_description(zoo.device)}, torch {torch.__version__}, "
          f"zoo {list(zoo.names)}")
    print(f"{len(schedules)} random schedules (K={args.max_steps}, null_prob={args.null_prob}, mean NFE "
          f"{np.mean(nfes):.1f}), {args.n_samples} samples each: {60 * len(schedules) / total:.1f} schedules/min; "
          f"sampling {100 * sampling / total:.1f}% / FID {100 * fid / total:.1f}% of {total:.1f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--members", nargs="*", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schedules", type=int, default=20)
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--null-prob", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
