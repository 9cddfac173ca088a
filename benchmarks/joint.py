"""The joint search (members × timesteps × IIA coefficients) against its ingredients, at several budgets (issue 15).

    python benchmarks/joint.py                                        # digits, budgets 300 600 1200 ms
    python benchmarks/joint.py --members tiny small medium large --budgets 300 600 1200 --checkpoints /c

Runs the real command, `python search.py search=joint budgets=[...] zoo.members=[...]` (one predictor, one search
per budget; members missing from the zoo are trained by search.py), whose summary.json holds the ablation per
budget, every contender chosen on the selection seed and scored on the same fresh seeds:

    members_only            OMS-DPM's search (every solver family, time fixed on the logSNR-uniform grid)
    members_and_times       + time genes and the members' AYS grids
    joint                   + IIA coefficients fitted for the re-ranked candidates (the search's winner)
    single_member_ays_iia   the best single-member sampler with every tool: the top k of the baseline pool (AYS
                            times included) and their IIA-corrected versions, best on the selection seed
    baseline                the strongest single-member sampler within the budget (every solver, spacing, NFE)

Prints per budget the fresh-seed FID of each, its verdict against the baseline, and the joint winner's paired
verdict against each ingredient (95 % t-intervals over seeds), plus the search's wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_search(args) -> list[dict]:
    out = Path(args.out)
    cmd = [sys.executable, "search.py", "search=joint", f"budgets=[{','.join(map(str, args.budgets))}]",
           f"zoo.members=[{','.join(args.members)}]", f"data={args.data}", f"paths.checkpoints={args.checkpoints}",
           f"paths.run_dir={out}", f"device={args.device}", "logger=none",
           f"search.evaluation.seeds=[{','.join(map(str, args.seeds))}]", f"search.evaluation.n={args.n}",
           *args.overrides]
    print(f"# {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)
    summary = json.loads((out / "summary.json").read_text())
    return summary if isinstance(summary, list) else [summary]


def _ci(lo_hi) -> str:
    return f"[{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]"


def budget_table(s: dict) -> list[str]:
    a = s["ablation"]
    rows = [f"\n#### Budget {s['budget']:.0f} ms (noise floor FID {s['noise_floor']['fid']:.2f}, seeds "
            f"{s['eval_seeds']} × {s['n_eval']})",
            "| contender | schedule | cost ms | FID [95 % CI] | − baseline [95 % CI] | verdict | joint − it [95 % CI] | "
            "joint's verdict |", "|---|---|---:|---|---|---|---|---|"]
    for name, r in a["rows"].items():
        vs_base = ("—", "(reference)") if r["verdict"] is None else (_ci(r["diff_vs_baseline_ci"]), f"**{r['verdict']}**")
        j = a["joint_vs"].get(name)
        vs_joint = ("—", "—") if j is None else (f"{j['diff']:+.2f} {_ci(j['diff_ci'])}", f"**{j['verdict']}**")
        rows.append(f"| {name} | `{r['schedule']}` | {r['cost']:.0f} | {r['fid_mean']:.2f} "
                    f"[{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}] | {vs_base[0]} | {vs_base[1]} | {vs_joint[0]} | "
                    f"{vs_joint[1]} |")
    return rows


def main(args) -> None:
    print(f"# python benchmarks/joint.py {' '.join(sys.argv[1:])}")
    summaries = run_search(args)
    lines = [f"\n### Joint search on {args.data}, zoo {args.members}: search wall time "
             f"{summaries[0]['wall_seconds_total']:.0f} s for {len(summaries)} budget(s)"]
    for s in summaries:
        lines += budget_table(s)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data", default="digits")
    p.add_argument("--members", nargs="+", help="zoo members (a multi-decoder net's stage members by name)",
                   default=["tiny", "small", "medium", "large", "multistage", "multistage.s0", "multistage.s1",
                            "multistage.s2"])
    p.add_argument("--budgets", nargs="+", default=["300", "600", "1200"],
                   help="ms per profiled batch, or NFEs of a member (6xmedium)")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "joint"))
    p.add_argument("overrides", nargs="*", help="more search.py overrides")
    main(p.parse_args())
