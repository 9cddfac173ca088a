"""Sampling speed on a trained zoo: images/s per solver and NFE, solver overhead and cost-model error.

    python benchmarks/sampling.py                       # the digits zoo in checkpoints/digits, CPU
    python benchmarks/sampling.py --device cuda --batch 1024

solver overhead  = sampling wall time / Σ of the member forward times that sampling made (timed around each
                   network call, so the solver's own arithmetic and the ε→x0 conversions count as overhead)
cost-model error = |Σ profiled member latencies − measured wall time| / measured wall time, for random
                   OMS-DPM schedules (the cost the search optimises against what a user waits for)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_lightning.diffusion.seeding import per_sample_noise  # noqa: E402
from oms_lightning.diffusion.solvers import get_solver  # noqa: E402
from oms_lightning.sampling import generate, solve  # noqa: E402
from oms_lightning.samplers import single_member_schedule
from oms_lightning.search.space import SlotSpace  # noqa: E402
from oms_lightning.zoo import Zoo, device_description, profile_latency  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedNet(torch.nn.Module):
    """Wraps a network and accumulates the synchronised wall time of its forward calls."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.device, self.seconds = net, device, 0.0

    def forward(self, x, t):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.net(x, t)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def timed_run(zoo: Zoo, schedule, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, Σ forward seconds) of one batch through `schedule`."""
    timed = {name: TimedNet(zoo.net(name), zoo.device) for name in zoo.names}
    denoisers = []
    for name in schedule.members_per_nfe:
        d = zoo.denoiser(name)
        denoisers.append(type(d)(timed[name], zoo.noise_schedule))
    synchronize(zoo.device)
    start = time.perf_counter()
    with torch.inference_mode():
        solve(schedule, denoisers, x, zoo.noise_schedule)
    synchronize(zoo.device)
    return time.perf_counter() - start, sum(t.seconds for t in timed.values())


def wall_time(zoo: Zoo, schedule, x: torch.Tensor, repeats: int) -> float:
    denoisers = zoo.denoisers_for(schedule)
    times = []
    for _ in range(repeats):
        synchronize(zoo.device)
        start = time.perf_counter()
        with torch.inference_mode():
            solve(schedule, denoisers, x, zoo.noise_schedule)
        synchronize(zoo.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args) -> None:
    zoo = Zoo.load(args.checkpoints, args.data, names=args.members, device=args.device)
    x = per_sample_noise(zoo.image_shape, range(args.batch), seed=0, device=zoo.device)
    print(f"# python {' '.join(sys.argv)}\n# device: {device_description(zoo.device)}, torch {torch.__version__}, "
          f"zoo {list(zoo.names)}, batch {args.batch}")
    member = args.speed_member or zoo.names[-1]

    print(f"\n## images/s per solver and NFE (member {member})\n| solver | NFE | images/s | solver overhead |\n"
          "|---|---:|---:|---:|")
    overheads = []
    for solver, order in [("ddim", 1), ("dpm_solver", 2), ("dpm_solver", 3), ("dpm_solver++", 1), ("heun", None)]:
        for nfe in args.nfes:
            per_step = get_solver(solver).uniform_nfe_per_step(order)
            if nfe % per_step:
                continue
            s = single_member_schedule(member, solver, nfe // per_step, zoo.noise_schedule, order=order)
            timed_run(zoo, s, x)  # warm-up
            runs = [timed_run(zoo, s, x) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            overhead = statistics.median(r[0] / r[1] for r in runs)
            overheads.append(overhead)
            name = f"{solver}-{order}" if solver == "dpm_solver" else solver
            print(f"| {name} | {s.nfe} | {args.batch / wall:.0f} | {overhead:.3f} |", flush=True)
    print(f"\nsolver overhead: median {statistics.median(overheads):.3f}, max {max(overheads):.3f}")

    profile = profile_latency(zoo, args.batch, warmup=3, repeats=args.profile_repeats)
    print("\n## cost model\nprofiled latency per batch (interleaved rounds; spread = (p90-p10)/median across "
          "rounds): " + ", ".join(f"{n} {1000 * v:.2f} ms (spread {100 * profile.spread.get(n, 0):.1f} %)"
                                  for n, v in profile.latency.items()))
    space = SlotSpace(zoo.names, args.max_steps, zoo.noise_schedule)
    rng = np.random.default_rng(args.seed)
    errors = []
    print("| schedule | NFE | predicted ms | measured ms | error |\n|---|---:|---:|---:|---:|")
    for _ in range(args.schedules):
        s = space.sample(rng, null_prob=args.null_prob)
        measured = wall_time(zoo, s, x, args.repeats)
        predicted = profile.cost(s)
        errors.append(abs(predicted - measured) / measured)
        print(f"| {s.compact().split(' | ')[0][:70]} | {s.nfe} | {1000 * predicted:.1f} | {1000 * measured:.1f} | "
              f"{100 * errors[-1]:.1f}% |", flush=True)
    print(f"\ncost-model error over {len(errors)} random schedules: mean {100 * np.mean(errors):.1f}%, "
          f"median {100 * np.median(errors):.1f}%, max {100 * np.max(errors):.1f}%")
    start = time.perf_counter()
    generate(zoo, single_member_schedule(member, "dpm_solver++", 10, zoo.noise_schedule), args.batch * 2,
             batch_size=args.batch)
    print(f"generate(): {2 * args.batch / (time.perf_counter() - start):.0f} images/s with DPM-Solver++ 10 NFE")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data", default="digits")
    p.add_argument("--members", nargs="*", default=None, help="default: every member in the folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--nfes", type=int, nargs="+", default=[6, 12, 24])
    p.add_argument("--speed-member", default=None, help="member for the per-solver table (default: last name)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-repeats", type=int, default=10)
    p.add_argument("--schedules", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--null-prob", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
