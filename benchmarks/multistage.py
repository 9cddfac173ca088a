"""Multi-decoder U-Net against the unified preset of similar per-NFE cost, on several training seeds (issue 14).

    python benchmarks/multistage.py                                  # digits, training seeds 0 1 2, NFE 10 and 20
    python benchmarks/multistage.py --checkpoints /data/ckpt --seeds 0 1 2 3 --search

1. Training (the real `train.py`, skipping members already on disk), the same steps, batch and recipe for all, per
   training seed s (seed 0 keeps the plain names, seed s > 0 appends `_seed<s>`):
     small                 the unified preset
     multistage            the multi-decoder preset, boundaries of `stages.json` (cluster_stages.py, run if missing)
     multistage_uniform    the same network with time-uniform boundaries (stages.json's alternative)
   Training wall seconds come from train.py's own closing line in `<out>/train/<name>.log`.
2. Cost: forward FLOPs per image of each network (torch's FlopCounterMode) at a time inside every stage, and their
   average under training's uniform t (each stage weighted by its share of [0, 1]).
3. Quality: DPM-Solver++ 2M, logSNR-uniform steps, at every `--nfes`, FID on the fresh evaluation seeds (same noise
   for every network). Two verdicts per pair of architectures:
     per training seed      the paired difference over evaluation seeds (does this trained net sample better?)
     across training seeds  one number per training seed (its mean over evaluation seeds), paired by seed: the
                            unit that decides "architecture A trains better than B" (Student t, seeds − 1 d.o.f.).
4. `--search`: `search.py zoo.members=[multistage,multistage.s0,multistage.s1,multistage.s2]` — the stage members and the routed member searched together
   against the routed member alone (the search's own baseline, equal cost), verdict from its summary.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_lightning.diffusion.solvers import get_solver  # noqa: E402
from oms_lightning.evaluation import Evaluation, summarise_contender  # noqa: E402
from oms_lightning.samplers import single_member_sampler  # noqa: E402
from oms_lightning.metrics import METRICS, sample_metrics_for  # noqa: E402
from oms_lightning.diffusion.stages_file import load_stages, stages_path  # noqa: E402
from oms_lightning.zoo import Zoo  # noqa: E402

SOLVER, SPACING = "dpm_solver++", "logsnr_uniform"
VARIANTS = ("small", "multistage", "multistage_uniform")
PAIRS = (("multistage", "small"), ("multistage_uniform", "small"), ("multistage", "multistage_uniform"))
TRAINED = re.compile(r"trained \S+ on \S+: (\d+) steps in (\d+) s")


def name(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}_seed{seed}"


def train_commands(args, boundaries: dict[str, list[float]]) -> dict[str, list[str]]:
    """train.py argument lists per member name (every variant × training seed)."""
    common = ["logger=none", "trainer.enable_progress_bar=false", f"paths.checkpoints={args.checkpoints}",
              f"data={args.data}", f"trainer.max_steps={args.steps}", *args.train_overrides]
    variants = {"small": ["model=small"], "multistage": ["model=multistage"],
                "multistage_uniform": ["model=multistage", f"model.boundaries=[{','.join(map(repr, boundaries['time_uniform']))}]"]}
    return {name(v, s): [*variants[v], f"model.name={name(v, s)}", f"seed={s}", *common]
            for v in args.variants for s in seeds_of(args, v)}


def seeds_of(args, variant: str) -> list[int]:
    """Training seeds of a variant: the boundary comparison may run on fewer (`--uniform-seeds`)."""
    return args.uniform_seeds if variant == "multistage_uniform" and args.uniform_seeds else args.seeds


def ensure_stages(args) -> dict[str, list[float]]:
    path = stages_path(args.checkpoints, args.data)
    if not path.is_file():
        run(args, ["cluster_stages.py", f"data={args.data}", f"paths.checkpoints={args.checkpoints}"])
    alternatives = json.loads(path.read_text())["alternatives"]       # written beside the checked boundaries
    return {"clustered": list(load_stages(path)), "time_uniform": list(alternatives["time_uniform"])}


def run(args, cmd: list[str], log: Path | None = None) -> None:
    print(f"# python {' '.join(cmd)}", flush=True)
    if log is None:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=sys.stderr)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def train_all(args, commands: dict[str, list[str]]) -> dict[str, float | None]:
    """Train what is missing; training seconds per member from its log (None when the log is not there)."""
    seconds = {}
    for member, cmd in commands.items():
        log = Path(args.out) / "train" / f"{member}.log"
        if not (Path(args.checkpoints) / args.data / f"{member}.ckpt").is_file():
            run(args, ["train.py", *cmd], log)
        found = TRAINED.search(log.read_text()) if log.is_file() else None
        seconds[member] = float(found.group(2)) if found else None
    return seconds


def stage_ranges(net: torch.nn.Module) -> list[tuple[float, float]]:
    return net.stage_ranges() if hasattr(net, "stage_ranges") else [(0.0, 1.0)]


def flops_per_image(net: torch.nn.Module, image_shape: tuple[int, int, int]) -> dict:
    """Forward FLOPs of one image at a time inside each stage (one stage for a unified net) and the average under
    uniform training t."""
    from torch.utils.flop_counter import FlopCounterMode

    ranges = stage_ranges(net)
    per_stage = []
    for lo, hi in ranges:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.zeros(1, *image_shape), torch.tensor([(lo + hi) / 2]))
        per_stage.append(counter.get_total_flops())
    average = sum(f * (hi - lo) for f, (lo, hi) in zip(per_stage, ranges))
    return {"per_stage": per_stage, "training_average": average}


def sampler_mflops(flops: dict, ranges: list[tuple[float, float]], schedule, noise) -> float:
    """Forward MFLOPs per image of a whole sampling run: each NFE costs its stage's FLOPs at the time it runs."""
    times = get_solver(schedule.solver).nfe_times(schedule.times, schedule.orders, noise)
    stage = [next(k for k, (lo, hi) in enumerate(ranges) if t <= hi or k == len(ranges) - 1) for t in times]
    return sum(flops["per_stage"][k] for k in stage) / 1e6


def evaluation_for(args, zoo: Zoo) -> tuple[Evaluation, dict]:
    metrics = sample_metrics_for(OmegaConf.load(ROOT / "configs" / "data" / f"{args.data}.yaml"), args.checkpoints,
                                 zoo.device)   # the wiring every job uses
    evaluation = Evaluation(zoo, metrics, args.eval_seeds, args.n, batch_size=500,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    return evaluation, metrics.noise_floor(args.n, seed=args.eval_seeds[0])


def fmt(row: dict) -> str:
    return f"{row['diff']:+.3f} [{row['diff_ci'][0]:+.3f}, {row['diff_ci'][1]:+.3f}] **{row['verdict']}**"


def quality_tables(args, zoo: Zoo, evaluation: Evaluation) -> list[str]:
    """FID per member and NFE, then the verdicts of multistage (both boundary rules) against small."""
    out = []
    for nfe in args.nfes:
        samplers = {m: single_member_sampler(m, SOLVER, None, SPACING, nfe, zoo.noise_schedule)
                    for m in zoo.names if "." not in m}
        scores = {m: evaluation.score(s) for m, s in samplers.items()}
        cost = {v: sampler_mflops(flops_per_image(zoo.net(v), zoo.image_shape), stage_ranges(zoo.net(v)),
                                  samplers[v], zoo.noise_schedule) for v in args.variants}
        out += [f"\n#### DPM-Solver++ 2M, {SPACING}, {nfe} NFE: FID (mean over evaluation seeds "
                f"{args.eval_seeds} × {args.n}); sampling MFLOPs per image: "
                + ", ".join(f"{v} {c:.0f}" for v, c in cost.items()),
                "| training seed | " + " | ".join(args.variants) + " |", "|---:|" + "---:|" * len(args.variants)]
        out += [f"| {s} | " + " | ".join(f"{np.mean(scores[name(v, s)]['fid']):.3f}" if s in seeds_of(args, v) else "—"
                                         for v in args.variants) + " |" for s in args.seeds]
        out += ["", "| contender − reference | per training seed (paired over evaluation seeds) | "
                    "across training seeds (paired by seed) |", "|---|---|---|"]
        for a, b in PAIRS:
            if a not in args.variants or b not in args.variants:
                continue
            seeds = [s for s in seeds_of(args, a) if s in seeds_of(args, b)]
            per_seed = [fmt(summarise_contender(scores[name(a, s)], scores[name(b, s)])["fid"]) for s in seeds]
            across = (fmt(summarise_contender(*({m: [np.mean(scores[name(v, s)][m]) for s in seeds] for m in METRICS}
                                                for v in (a, b)))["fid"]) if len(seeds) > 1 else "— (one seed)")
            out.append(f"| {a} − {b} | " + "; ".join(f"seed {s}: {r}" for s, r in zip(seeds, per_seed))
                       + f" | {across} |")
        if {"small", "multistage"} <= set(args.variants):
            out += equal_cost_rows(args, zoo, evaluation, nfe, cost["multistage"], scores)
    return out


def equal_cost_rows(args, zoo: Zoo, evaluation: Evaluation, nfe: int, budget: float, scores: dict) -> list[str]:
    """multistage at `nfe` against small at the fewest NFEs whose sampling MFLOPs reach multistage's: the routed
    net spends most NFEs at low noise, in its widest decoder, so equal NFEs are not equal cost."""
    flops = flops_per_image(zoo.net("small"), zoo.image_shape)
    for more in range(nfe, 4 * nfe):
        sampler = single_member_sampler("small", SOLVER, None, SPACING, more, zoo.noise_schedule)
        mflops = sampler_mflops(flops, [(0.0, 1.0)], sampler, zoo.noise_schedule)
        if mflops >= budget:
            break
    rows = []
    for s in args.seeds:
        small = evaluation.score(single_member_sampler(name("small", s), SOLVER, None, SPACING, more, zoo.noise_schedule))
        rows.append(f"| multistage ({nfe} NFE, {budget:.0f} MFLOPs) − small at equal sampling cost ({more} NFE, "
                    f"{mflops:.0f} MFLOPs; FID {np.mean(small['fid']):.3f}) | seed {s}: "
                    f"{fmt(summarise_contender(scores[name('multistage', s)], small)['fid'])} | — |")
    return rows


def cost_table(args, zoo: Zoo, seconds: dict[str, float | None]) -> list[str]:
    rows = ["| member | parameters | forward MFLOPs per image per stage | training average | training s per seed |",
            "|---|---:|---|---:|---|"]
    for v in args.variants:
        m = zoo.member(v)
        f = flops_per_image(m.net, zoo.image_shape)
        secs = ", ".join("—" if seconds.get(name(v, s)) is None else f"{seconds[name(v, s)]:.0f}"
                         for s in seeds_of(args, v))
        rows.append(f"| {v} | {m.num_parameters:,} | {' / '.join(f'{x / 1e6:.2f}' for x in f['per_stage'])} | "
                    f"{f['training_average'] / 1e6:.2f} | {secs} |")
    return rows


def search_row(args) -> list[str]:
    out = Path(args.out) / "search"
    run(args, ["search.py", f"data={args.data}", f"paths.checkpoints={args.checkpoints}", f"paths.run_dir={out}",
               "zoo.members=[multistage,multistage.s0,multistage.s1,multistage.s2]", "logger=none", f"device={args.device}"])
    s = json.loads((out / "summary.json").read_text())
    return [f"\nSearch over multistage's stage members and the routed member (budget {s['budget']:.0f} ms): "
            f"{s['schedule']} FID {s['fid_mean']:.3f} vs the routed member alone {s['baseline_schedule']} FID "
            f"{s['baseline_fid_mean']:.3f}: difference {s['diff']:+.3f} [{s['diff_ci'][0]:+.3f}, "
            f"{s['diff_ci'][1]:+.3f}] **{s['verdict']}**"]


def main(args) -> None:
    print(f"# python benchmarks/multistage.py {' '.join(sys.argv[1:])}")
    boundaries = ensure_stages(args)
    seconds = train_all(args, train_commands(args, boundaries))
    names = sorted(seconds)
    zoo = Zoo.load(args.checkpoints, args.data, names=names, device=args.device)
    evaluation, noise_floor = evaluation_for(args, zoo)
    lines = [f"\n### Multi-decoder vs unified on {args.data}: {args.steps} training steps, training seeds {args.seeds}; "
             f"boundaries clustered {boundaries['clustered']}, time-uniform "
             f"{[round(b, 4) for b in boundaries['time_uniform']]}; noise floor FID {noise_floor['fid']:.3f}",
             *cost_table(args, zoo, seconds), *quality_tables(args, zoo, evaluation)]
    if args.search:
        lines += search_row(args)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"],
                   help="digits (embedded) or fashion_mnist (the files present; FID features of its cached classifier)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which networks to train and compare (default: all three)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--uniform-seeds", type=int, nargs="+", help="training seeds of multistage_uniform (default: --seeds)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every member")
    p.add_argument("--nfes", type=int, nargs="+", default=[10, 20])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--search", action="store_true", help="also search over the stage members (search.py)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "multistage"))
    p.add_argument("train_overrides", nargs="*", help="more train.py overrides for every member")
    main(p.parse_args())
