"""Seconds per generation of the evolutionary search, per space, with and without multi-decoder stage members.

    python benchmarks/evolution_speed.py                      # 3 generations x 3 budgets per space, 1 thread
    python benchmarks/evolution_speed.py --generations 10 --spaces 6

The search's own machinery on a synthetic zoo (no trained weights needed): the `kind=all` spaces, an untrained
predictor of the real architecture as the score function, and a latency profile with fixed numbers (those of the
digits zoo on 2 CPU cores), once for tiny/small/medium and once adding the routed member `multistage` and its
stage members, whose valid time ranges and per-stage costs make every proposal decode and place its NFE times.
Prints one markdown row per zoo and space.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oms_lightning.diffusion.noise_schedule import VPSchedule  # noqa: E402
from oms_lightning.zoo import MemberRanges  # noqa: E402
from oms_lightning.predictor.module import PredictorModule  # noqa: E402
from oms_lightning.search.evolution import ScoreCache, evolve_frontier  # noqa: E402
from oms_lightning.search.space import make_spaces  # noqa: E402
from oms_lightning.zoo import LatencyProfile  # noqa: E402

LATENCY = {"tiny": 0.022, "small": 0.072, "medium": 0.137}            # seconds per batch of 256, 2 CPU threads
BOUNDARIES, STAGE_LATENCY = [0.215, 0.8], [0.12, 0.072, 0.04]           # the clustered digits stages


def zoo(routed: bool) -> tuple[list[str], LatencyProfile, MemberRanges]:
    latency, extra, ranges = dict(LATENCY), {}, MemberRanges()
    if routed:
        edges = [0.0, *BOUNDARIES, 1.0]
        latency["multistage"] = LATENCY["small"]
        latency.update({f"multistage.s{k}": v for k, v in enumerate(STAGE_LATENCY)})
        extra = {"multistage": {"boundaries": BOUNDARIES, "latency": STAGE_LATENCY}}
        ranges = MemberRanges(tuple((f"multistage.s{k}", edges[k], edges[k + 1]) for k in range(3)))
    profile = LatencyProfile(latency, 256, "synthetic", "float32", "synthetic", routed=extra,
                             noise=VPSchedule().to_dict())
    return sorted(latency), profile, ranges


def main(args) -> None:
    print(f"# python benchmarks/evolution_speed.py {' '.join(sys.argv[1:])}  (torch threads: {torch.get_num_threads()})")
    print("| zoo | space | s per generation |", "|---|---|---:|", sep="\n")
    evolution = dict(population=40, children=40, generations=args.generations, starts=4, crossover_prob=0.3,
                     null_prob=0.6)
    for routed in (False, True):
        members, profile, ranges = zoo(routed)
        noise = VPSchedule()
        spaces = make_spaces("all", members, noise, 30, None, ranges)[: args.spaces]
        torch.manual_seed(0)
        predictor = PredictorModule(members, noise, max_steps=max(sp.max_steps for sp in spaces))
        for space in spaces:
            started = time.perf_counter()
            evolve_frontier(space, predictor.predict_scores, profile.cost, args.budgets, seed=0,
                            cache=ScoreCache(predictor.predict_scores), **evolution)
            per_generation = (time.perf_counter() - started) / (args.generations * len(args.budgets))
            print(f"| {'+ multistage and its stages' if routed else 'tiny, small, medium'} | "
                  f"{getattr(space, 'solver', 'slots (dpm_solver)')} | {per_generation:.3f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.411, 0.823, 1.645], help="seconds per batch")
    p.add_argument("--spaces", type=int, default=6, help="the first N spaces of kind=all")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    main(a)
