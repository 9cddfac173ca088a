"""Align Your Steps on a trained member: optimisation time and AYS against every standard spacing, per solver.

    python benchmarks/ays.py                                   # member small of checkpoints/digits, cpu_fast preset
    python benchmarks/ays.py --solvers ddim dpm_solver++ ddim_eta1 --steps 10 20 40 --preset paper --device cuda

For each solver it runs the real command, `python optimize_steps.py model=<member> solver=<solver> ...` (which
reuses a finished steps file of the same weights and settings), with its comparison at every `--steps` count:
AYS against time-uniform, time-quadratic, logSNR-uniform, EDM/karras and KL-optimal spacings, same member, solver,
NFE and ends, paired on fresh seeds (95 % t-intervals over seeds, verdicts from oms_lightning.evaluation). Prints
one markdown table per solver and the time of each optimisation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_solver(args, solver: str) -> dict:
    out = Path(args.out) / solver
    cmd = [sys.executable, "optimize_steps.py", f"model={args.member}", f"solver={solver}",
           f"steps={args.steps[0]}", f"data={args.data}", f"optimize_steps={args.preset}",
           f"paths.checkpoints={args.checkpoints}", f"paths.run_dir={out}", f"device={args.device}", "logger=none",
           f"optimize_steps.evaluation.steps=[{','.join(map(str, args.steps))}]",
           f"optimize_steps.evaluation.seeds=[{','.join(map(str, args.seeds))}]",
           f"optimize_steps.evaluation.n={args.n}", *args.overrides]
    print(f"# {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)
    return json.loads((out / "summary.json").read_text())


def table(summary: dict) -> str:
    rows = [f"\n### {summary['solver']}, member {summary['member']}: optimisation "
            f"{summary['optimize_seconds']} s; FID over seeds {summary['seeds']} × {summary['n']} "
            f"(noise floor {summary['noise_floor']['fid']:.3f})",
            "| NFE | AYS FID | vs spacing | its FID | AYS − spacing [95 % CI] | verdict |",
            "|---:|---:|---|---:|---|---|"]
    for comp in summary["comparisons"]:
        for sp, row in comp["vs"].items():
            a, b = row["ays"]["fid"], row[sp]["fid"]
            rows.append(f"| {comp['nfe']} | {a['mean']:.3f} | {sp} | {b['mean']:.3f} | {a['diff']:+.3f} "
                        f"[{a['diff_ci'][0]:+.3f}, {a['diff_ci'][1]:+.3f}] | **{a['verdict']}** |")
    for lv in summary["chosen"]:
        std = ", ".join(f"{k} {v:.4g}" for k, v in lv["klub_standard_spacings"].items())
        rows.append(f"\nKLUB at {lv['steps']} steps: AYS {lv['klub']:.4g} (sweep {lv['chosen_sweep']}); {std}")
    return "\n".join(rows)


def main(args) -> None:
    print(f"# python benchmarks/ays.py {' '.join(sys.argv[1:])}")
    for solver in args.solvers:
        print(table(run_solver(args, solver)), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data", default="digits")
    p.add_argument("--member", default="small")
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpm_solver++", "ddim_eta1"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40], help="the first is the optimised level")
    p.add_argument("--preset", default="cpu_fast")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--n", type=int, default=1000, help="samples per seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "ays"))
    p.add_argument("overrides", nargs="*", help="more optimize_steps.py overrides")
    main(p.parse_args())
