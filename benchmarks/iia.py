"""IIA on a trained member: FID of the IIA-corrected sampler against the plain one, per solver and NFE.

    python benchmarks/iia.py                                   # member small of checkpoints/digits, cpu_fast preset
    python benchmarks/iia.py --solvers ddim heun --nfes 6 10 --preset paper --device cuda

For every solver and NFE it runs the real command, `python fit_coefficients.py model=<member> solver=<solver>
steps=<NFE / NFEs per step> ...`, whose summary holds the paired comparison on fresh seeds (95 % t-intervals over
seeds, verdicts from oms_lightning.evaluation), the held-out error of both samplers against a fine ODE solution,
the fit's seconds and the corrected sampler's wall-time overhead. Heun makes 2 NFEs per step: an odd NFE takes the
even one below. Prints one markdown table (the paper expects gains below 25 NFE that vanish with more).

    python benchmarks/iia.py --overhead-of outputs/benchmarks/iia/* --rounds 20

times the fitted schedules of finished runs again (plain against corrected, interleaved rounds; run it on an
idle machine: the fit runs time them beside whatever else is running).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_lightning.diffusion.solvers import get_solver  # noqa: E402 - after the path set-up


def steps_for(solver: str, nfe: int) -> int:
    """Steps of a solver with a fixed NFE count per step at (at most) `nfe` NFEs."""
    return nfe // get_solver(solver).default_nfe_per_step


def run_one(args, solver: str, nfe: int) -> dict:
    steps = steps_for(solver, nfe)
    out = Path(args.out) / f"{solver}-{steps}steps"
    cmd = [sys.executable, "fit_coefficients.py", f"model={args.member}", f"solver={solver}", f"steps={steps}",
           f"data={args.data}", f"fit_coefficients={args.preset}", f"paths.checkpoints={args.checkpoints}",
           f"paths.run_dir={out}", f"device={args.device}", "logger=none",
           f"fit_coefficients.evaluation.seeds=[{','.join(map(str, args.seeds))}]",
           f"fit_coefficients.evaluation.n={args.n}", *args.overrides]
    print(f"# {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)
    return json.loads((out / "summary.json").read_text())


def _interval(row: dict) -> str:
    return f"{row['mean']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"


def table_row(summary: dict) -> str:
    h, c = summary["held_out_error"], summary["comparison"]
    if c is None:   # evaluation n=0: no FID comparison
        fid = "— | — | — | —"
    else:
        a, b = c["contenders"]["iia"]["fid"], c["contenders"]["plain"]["fid"]
        fid = (f"{_interval(b)} | {_interval(a)} | {a['diff']:+.3f} [{a['diff_ci'][0]:+.3f}, "
               f"{a['diff_ci'][1]:+.3f}] | **{a['verdict']}**")
    return (f"| {summary['solver']} | {summary['nfe']} | {fid} | {h['plain']:.4g} → {h['iia']:.4g} | "
            f"{summary['fit_seconds']:.1f} | ×{summary['overhead']['ratio']:.3f} |")


def overhead_rows(args) -> list[str]:
    """Wall-time ratio corrected / plain of each run folder's schedule.json, on this machine now."""
    from omegaconf import OmegaConf

    from oms_lightning.jobs.fit_coefficients import overhead
    from oms_lightning.schedule.file import load_schedule
    from oms_lightning.zoo import Zoo
    timing = OmegaConf.create({"batch_size": args.batch_size, "rounds": args.rounds})
    rows = ["| run | NFE | plain s | IIA s | ratio | spread |", "|---|---:|---:|---:|---:|---:|"]
    for run_dir in map(Path, args.overhead_of):
        corrected = load_schedule(run_dir / "schedule.json")
        zoo = Zoo.load(args.checkpoints, args.data, names=corrected.member_names, device=args.device)
        o = overhead(zoo, corrected.plain(), corrected, timing)
        rows.append(f"| {run_dir.name} | {corrected.nfe} | {o['plain_seconds']:.4f} | {o['iia_seconds']:.4f} | "
                    f"×{o['ratio']:.3f} | {o['spread']:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(args) -> None:
    print(f"# python benchmarks/iia.py {' '.join(sys.argv[1:])}")
    if args.overhead_of:
        print(f"\n### IIA wall-time overhead, batch {args.batch_size}, median of {args.rounds} interleaved rounds")
        print("\n".join(overhead_rows(args)), flush=True)
        return
    rows = ["| solver | NFE | plain FID [95 % CI] | IIA FID [95 % CI] | IIA − plain [95 % CI] | verdict | "
            "held-out ODE error plain → IIA | fit s | overhead |",
            "|---|---:|---:|---:|---|---|---|---:|---:|"]
    noise_floor = None
    for solver in args.solvers:
        for nfe in args.nfes:
            summary = run_one(args, solver, nfe)
            rows.append(table_row(summary))
            if summary["comparison"]:
                noise_floor = summary["comparison"]["noise_floor"]["fid"]
    print(f"\n### IIA on {args.member} ({args.data}, preset {args.preset}): FID over seeds {args.seeds} × {args.n}"
          + (f" (noise floor {noise_floor:.3f})" if noise_floor is not None else ""))
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data", default="digits")
    p.add_argument("--member", default="small")
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpm_solver++", "heun"])
    p.add_argument("--nfes", type=int, nargs="+", default=[6, 8, 10, 25])
    p.add_argument("--preset", default="cpu_fast")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--n", type=int, default=1000, help="samples per seed (0: no FID comparison)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "iia"))
    p.add_argument("--overhead-of", nargs="+", metavar="RUN_DIR", help="only time these finished runs again")
    p.add_argument("--batch-size", type=int, default=256, help="with --overhead-of")
    p.add_argument("--rounds", type=int, default=20, help="with --overhead-of")
    p.add_argument("overrides", nargs="*", help="more fit_coefficients.py overrides")
    main(p.parse_args())
