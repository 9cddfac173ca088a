"""The exhaustive mixed scan: the honest upper bound of what simple member mixing buys on a zoo, and the search's
yardstick (issue 22).

    python benchmarks/scan_mixed.py --checkpoints /work/bench/checkpoints --budgets 3xmedium 6xmedium 12xmedium

1. Runs the real search (`python search.py budgets=[...]`, the default preset; `--search-dir` reuses a finished
   one) and reads its summary: the searched schedule, the baseline, the equal-quality schedule.
2. Per budget, on the search's own cache (so every selection-seed FID is shared, never re-measured):
   * the strongest single-member sampler, as the search chose it (same pool, same seed);
   * the solver/spacing pairs ranked on *mixed* schedules too: every pair of the baseline pool gets `--probe`
     two-segment probes (the cheapest member first, the baseline's after) at the first rung; the best `--pairs`
     by probe and the best single's pair go on;
   * every two-segment schedule (first k NFEs one member, the most NFEs that still fit of another, both orders)
     and every three-segment schedule on a grid of quarters of the budget, on those pairs;
   * all of them scored by true FID on the selection seed — raced (successive halving at the search's rungs,
     keep 1/3: a dropped schedule was at least 3× outranked at 256 samples) — the survivors at the full count;
3. The search's schedule, the scan's best and the baseline on the fresh seeds: paired intervals and verdicts.

Prints one markdown row per budget with the command that produced it: searched vs scan's best on the selection
seed (same samples), fresh-seed FIDs with intervals, verdicts, the equal-quality speed-up with its non-inferiority
bound, and the true evaluations and seconds of the search's refinement and of the scan.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_search(args) -> tuple[Path, list[dict]]:
    out = Path(args.search_dir or Path(args.out) / "search")
    if not args.search_dir:
        cmd = [sys.executable, "search.py", f"budgets=[{','.join(args.budgets)}]", f"paths.checkpoints={args.checkpoints}",
               f"paths.run_dir={out}", "logger=none", *args.overrides]
        print(f"# {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)
    summary = json.loads((out / "summary.json").read_text())
    return out, summary if isinstance(summary, list) else [summary]


def compose(args):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="search", overrides=[f"paths.checkpoints={args.checkpoints}", "logger=none",
                                                              "paths.run_dir=unused", *args.overrides])


def rank_pairs(singles, selection, latency, budget, noise, probe: int, pairs: int, rung: int):
    """Solver/spacing pairs of the baseline pool ranked on mixed schedules (`segments.rank_samplers` over `probe`
    probes in OMS-DPM's pattern); the best `pairs` by probe, plus the pair of the best single."""
    from oms_lightning.search.segments import Sampler, probe_runs, rank_samplers, segment_schedules

    samplers = list(dict.fromkeys(s for s in map(Sampler.of, singles) if s is not None and s.spacing != "ays"))
    probes = probe_runs(latency, budget, singles[0].meta["member"], probe)
    ranked = rank_samplers(samplers, probes, noise, selection.fid_at, rung)
    return (list(dict.fromkeys([s for s, _ in ranked[:pairs]] + samplers[:1])),
            len(segment_schedules(probes, samplers, noise)))


def scan_budget(cfg, zoo, profile, m, budget, ays, args):
    from oms_lightning.schedule import schedule_key
    from oms_lightning.search.dataset import in_range
    from oms_lightning.search.selection import choose_baseline
    from oms_lightning.search.refine import race
    from oms_lightning.search.segments import segment_schedules, three_segment_runs, two_segment_runs

    started = time.perf_counter()
    rungs = [*(int(n) for n in cfg.search.refine.rungs if int(n) < m.selection.n), m.selection.n]
    baseline, _, singles = choose_baseline(cfg, zoo, profile, budget, m.selection, ays)
    latency = {n: profile.latency[n] for n in zoo.names}
    pairs, probed = rank_pairs(singles, m.selection, latency, budget, zoo.noise_schedule, args.probe, args.pairs, rungs[0])
    runs = two_segment_runs(latency, budget) + three_segment_runs(latency, budget, grid=args.grid)
    schedules = in_range(zoo, segment_schedules(runs, pairs, zoo.noise_schedule))
    print(f"# budget {1000 * budget:.0f} ms: {len(schedules)} segment schedules on {[p.label for p in pairs]}",
          file=sys.stderr, flush=True)
    ranked = race(schedules, m.selection.fid_at, rungs, keep=1 / 3, rank=lambda s, f, n: (f,))
    best, best_fid = ranked[0]
    if m.selection.fid_at([baseline], rungs[-1])[0] < best_fid:   # mixing found nothing better than one member
        best, best_fid = baseline, m.selection.fid_at([baseline], rungs[-1])[0]
    evaluations = len(schedules) + probed
    return {"best": best, "best_fid_select": best_fid, "baseline": baseline, "schedules": len(schedules),
            "evaluations": evaluations, "seconds": time.perf_counter() - started,
            "pairs": [p.label for p in pairs], "best_is_baseline": schedule_key(best) == schedule_key(baseline)}


def row(summary: dict, scan: dict, comparison: dict) -> str:
    from oms_lightning.evaluation import summarise_contender

    c = comparison["contenders"]
    per_seed = {n: {k: v["per_seed"] for k, v in r.items()} for n, r in c.items()}
    vs_scan = summarise_contender(per_seed["searched"], per_seed["scan_best"])["fid"]
    eq = summary.get("equal_quality") or {}

    def fid(name):
        f = c[name]["fid"]
        return f"{f['mean']:.2f} [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]"

    def verdict(name):
        f = c[name]["fid"]
        return f"{f['diff']:+.2f} [{f['diff_ci'][0]:+.2f}, {f['diff_ci'][1]:+.2f}] **{f['verdict']}**"

    rf = summary.get("refinement") or {}
    speed = (f"×{eq['speedup']:.2f}: {eq['diff']:+.2f}, upper {eq['upper']:+.2f} vs margin {eq['margin']:.2f} → "
             f"**{'non-inferior' if eq['non_inferior'] else 'not shown'}** (`{eq['schedule']}`)" if eq else "—")
    return (f"| {summary['budget']:.0f} ({summary['budget_nfe']['spec']}) | `{summary['schedule']}` {summary['cost']:.0f} ms "
            f"| `{scan['best'].compact()}` {1000 * scan['cost']:.0f} ms | `{summary['baseline_schedule']}` "
            f"{summary['baseline_cost']:.0f} ms | {summary['fid_select']:.2f} / {scan['best_fid_select']:.2f} | "
            f"{fid('searched')} | {fid('scan_best')} | {fid('baseline')} | {verdict('searched')} | "
            f"{verdict('scan_best')} | {vs_scan['diff']:+.2f} [{vs_scan['diff_ci'][0]:+.2f}, {vs_scan['diff_ci'][1]:+.2f}] "
            f"**{vs_scan['verdict']}** | {speed} | {rf.get('evaluations', 0)} in {rf.get('seconds', 0):.0f} s | "
            f"{scan['evaluations']} in {scan['seconds']:.0f} s |")


def main(args) -> None:
    print(f"# python benchmarks/scan_mixed.py {' '.join(sys.argv[1:])}", flush=True)
    started = time.perf_counter()
    search_dir, summaries = run_search(args)
    search_seconds = time.perf_counter() - started
    from oms_lightning.evaluation import check_fresh_seeds, compare
    from oms_lightning.schedule.file import load_schedule
    from oms_lightning.jobs.search import load_ays, zoo_and_profile
    from oms_lightning.search.outcome import measures
    from oms_lightning.zoo import resolve_device

    cfg = compose(args)
    device = resolve_device(str(cfg.device))
    zoo, profile = zoo_and_profile(cfg, device)
    seeds = check_fresh_seeds(cfg.search.evaluation.seeds, {})
    m = measures(cfg, zoo, profile, device, seeds)
    ays = load_ays(cfg, zoo)
    lines = [f"\nsearch: {search_seconds:.0f} s for {len(summaries)} budget(s) ({search_dir}); fresh seeds {seeds} × "
             f"{cfg.search.evaluation.n}; selection seed {cfg.search.rerank.seed} × {m.selection.n}; noise floor FID "
             f"{m.noise_floor['fid']:.2f}",
             "| budget ms | searched | scan's best | baseline | selection FID searched / scan | FID searched | "
             "FID scan | FID baseline | searched − baseline | scan − baseline | searched − scan | "
             "equal quality: speed-up, Δ, one-sided 95 % bound vs margin | search refinement: evaluations, s | "
             "scan: evaluations, s |", "|" + "---|" * 14]
    from oms_lightning.search.settings import resolve_budget

    asked = sorted(((resolve_budget(b, profile.latency), b) for b in args.budgets))   # the search's order: ascending
    by_spec = {s.get("budget_nfe", {}).get("spec"): s for s in summaries}
    # a budget named like the search's (`12xmedium`) takes that budget's row, so a scan may cover some of them only
    pairs = ([(budget, by_spec[spec]) for budget, spec in asked] if all(spec in by_spec for _, spec in asked)
             else list(zip([budget for budget, _ in asked], summaries)))
    for budget, summary in pairs:
        name = "schedule.json" if len(summaries) == 1 else f"schedule_{summary['budget']:.0f}ms.json"
        searched = load_schedule(search_dir / name)
        scan = scan_budget(cfg, zoo, profile, m, budget, ays, args)
        scan["cost"] = profile.cost(scan["best"])
        contenders = {"searched": searched, "scan_best": scan["best"], "baseline": scan["baseline"]}
        comparison = compare(m.evaluation, contenders, reference="baseline", noise_floor=m.noise_floor)
        lines.append(row(summary, scan, comparison))
        print(lines[-1], flush=True)
        print(f"#   scan pairs {scan['pairs']}, {scan['schedules']} segment schedules", flush=True)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--budgets", nargs="+", default=["3xmedium", "6xmedium", "12xmedium"],
                   help="ms per profiled batch or NFEs of a member (6xmedium)")
    p.add_argument("--search-dir", default=None, help="a finished search's run folder (skips running it)")
    p.add_argument("--probe", type=int, default=3, help="two-segment probes per solver/spacing pair")
    p.add_argument("--pairs", type=int, default=2, help="solver/spacing pairs scanned (best by probe; + best single's)")
    p.add_argument("--grid", type=int, default=4, help="three-segment runs on fractions 1/grid of the budget")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "scan_mixed"))
    p.add_argument("overrides", nargs="*", help="more search.py overrides (the scan composes the same config)")
    main(p.parse_args())
