"""Search results: summary rows, the printed table, schedule.json, frontier.png, the winner's grid, W&B logging
(`oms_lightning.jobs.report` draws FID against budget over many runs). Reported FIDs are fresh-seed means with
95 % intervals (`oms_lightning.evaluation`); the selection-seed numbers that chose the winner and the baseline are
kept beside them, labelled as such.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from oms_lightning.evaluation import PRIMARY, summarise_contender  # noqa: E402
from oms_lightning.images import save_grid  # noqa: E402
from oms_lightning.io import atomic_path  # noqa: E402
from oms_lightning.sampling import generate  # noqa: E402
from oms_lightning.schedule.file import load_schedule, save_schedule  # noqa: E402
from oms_lightning.search.refine import RACE_ORDER_META  # noqa: E402
from oms_lightning.zoo import cost_model_error  # noqa: E402


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def md(text) -> str:
    """A markdown table cell: schedules contain `|`, which would split the cell."""
    return str(text).replace("|", "\\|")


def _rounded(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


# ----------------------------------------------------------------------------------------------- summary rows
def summarise(o: dict, profile, store_size: int, predictor_metrics: dict, settings: dict) -> dict:
    """One budget's summary.json row: fresh-seed means, intervals and the verdict, beside the selection numbers."""
    c = o["comparison"]["contenders"]
    win, base = c["searched"], c["baseline"]
    wall_w, wall_b = o["walls"]
    cost_w, cost_b = o["costs"]["searched"], o["costs"]["baseline"]
    predictor_metrics = o.get("predictor_metrics", predictor_metrics)   # each budget has its own predictor
    test = predictor_metrics.get("test") or {}
    return {
        "budget": ms(o["budget"]), "budget_nfe": o.get("budget_nfe"), "schedule": o["winner"].compact(), "cost": ms(cost_w), "nfe": o["winner"].nfe,
        "spacing": o["winner"].meta.get("spacing"),
        "fid": win["fid"]["mean"], "fid_mean": win["fid"]["mean"], "fid_ci": win["fid"]["ci"],
        "fid_select": o["winner_record"]["fid"],
        "baseline_schedule": o["baseline"].compact(), "baseline_sampler": dict(o["baseline"].meta),
        "baseline_cost": ms(cost_b), "baseline_fid": base["fid"]["mean"], "baseline_fid_mean": base["fid"]["mean"],
        "baseline_fid_ci": base["fid"]["ci"], "baseline_fid_select": min(r["fid"] for r in o["baseline_records"]),
        "baselines_considered": len(o["baseline_records"]),
        "diff": win["fid"]["diff"], "diff_ci": win["fid"]["diff_ci"], "verdict": win["fid"]["verdict"],
        "wins": win["fid"]["verdict"] == "better",
        "heldout": {"metric": "kid_heldout (KID against the validation split)",
                    "mean": win["kid_heldout"]["mean"], "ci": win["kid_heldout"]["ci"],
                    "baseline_mean": base["kid_heldout"]["mean"], "baseline_ci": base["kid_heldout"]["ci"],
                    "diff_ci": win["kid_heldout"]["diff_ci"], "verdict": win["kid_heldout"]["verdict"]},
        "second_metric": {"metric": "pixel_fd (Fréchet distance in pixel space)",
                          "mean": win["pixel_fd"]["mean"], "baseline_mean": base["pixel_fd"]["mean"],
                          "diff_ci": win["pixel_fd"]["diff_ci"], "verdict": win["pixel_fd"]["verdict"]},
        "copy_rate": {"searched": win["copy_rate"]["mean"], "baseline": base["copy_rate"]["mean"],
                      "real_heldout": o["comparison"]["noise_floor"].get("copy_rate")},
        "disagreements": o["comparison"]["disagreements"]["searched"],
        "comparison": o["comparison"], **settings, "noise_floor": o["comparison"]["noise_floor"],
        "baseline_cost_at_equal_fid": ms(o["equal"]["cost"]) if o["equal"] else None,
        "equal_fid_baseline": o["equal"],
        "wall_seconds": {"searched": wall_w["wall_seconds"], "baseline": wall_b["wall_seconds"]},
        "wall_spread": {"searched": wall_w["wall_spread"], "baseline": wall_b["wall_spread"]},
        "cost_model_error": {"searched": _rounded(cost_model_error(cost_w, wall_w["wall_seconds"])),
                             "baseline": _rounded(cost_model_error(cost_b, wall_b["wall_seconds"]))},
        # the same cost model re-priced by a profile measured between the timing rounds: the machine as timed
        "cost_model_error_now": {n: _rounded(cost_model_error(o["costs_now"][n], w["wall_seconds"]))
                                 for n, w in (("searched", wall_w), ("baseline", wall_b))} if "costs_now" in o else None,
        "machine_speed_change": _rounded(o.get("machine_speed_change")),
        "kendall_tau": predictor_metrics["kendall_tau"], "kendall_tau_val": predictor_metrics.get("kendall_tau_val"),
        "kendall_tau_neg_nfe": test.get("kendall_tau_neg_nfe"), "kendall_tau_neg_cost": test.get("kendall_tau_neg_cost"),
        "kendall_tau_near_budget": o["tau_near_budget"],
        "winner_steps_single_member_fid_select": o["same_steps"],
        "equal_quality": o.get("equal_quality"), "refinement": refinement_row(o.get("refinement")),
        "n_records": o.get("n_records", store_size), "extractor": o["winner_record"]["extractor"],
        "budget_note": "; ".join(dict.fromkeys(r.budget_note for r in o["results"] if r.budget_note)) or None,
        "schedules_scored": sum(r.evaluated for r in o["results"]),
        "winner_family": o["winner"].solver, "winner_is_baseline": o["winner_is_baseline"],
        "latency_ms": {k: ms(v) for k, v in profile.latency.items()}, "latency_spread": dict(profile.spread),
        "ablation": ablation_rows(o.get("ablation")),
    }


def refinement_row(r) -> dict | None:
    """What the refinement spent and found: true evaluations, seconds, schedules measured at the full count, and
    each round's leader."""
    if r is None:
        return None
    return {"evaluations": r.evaluations, "seconds": round(r.seconds, 1), "measured": len(r.archive),
            "best_fid_select": r.fid(r.best), "cheapest_fid_select": r.fid(r.cheapest),
            "reference_fid_select": r.fid(r.reference), "rounds": r.rounds}


def _speedup(eq: dict | None) -> str:
    if eq is None:
        return "n/a (refinement off)"
    verdict = "non-inferior" if eq["non_inferior"] else "not shown"
    return f"×{eq['speedup']:.2f} {verdict} (+{eq['upper']:.2f} < {eq['margin']:.2f}?)"


def ablation_rows(ablation: dict | None) -> dict | None:
    """search=joint: per ingredient, its schedule, cost, fresh-seed FID and interval, and its verdict against the
    baseline (and the full comparison)."""
    if ablation is None:
        return None
    c = ablation["comparison"]["contenders"]
    per_seed = {n: {m: v["per_seed"] for m, v in row.items()} for n, row in c.items()}
    joint_vs = {n: summarise_contender(per_seed["joint"], values, ablation["comparison"]["confidence"])[PRIMARY]
                for n, values in per_seed.items() if n != "joint"}
    return {"rows": {n: {"schedule": ablation["schedules"][n], "cost": ablation["costs_ms"][n],
                         "fid_mean": row["fid"]["mean"], "fid_ci": row["fid"]["ci"],
                         "diff_vs_baseline_ci": row["fid"].get("diff_ci"), "verdict": row["fid"].get("verdict")}
                     for n, row in c.items()},
            # the joint winner against each ingredient, paired on the same seeds: does adding it help?
            "joint_vs": {n: {k: r[k] for k in ("diff", "diff_ci", "verdict")} for n, r in joint_vs.items()},
            "comparison": ablation["comparison"]}


def _pm(mean: float, ci) -> str:
    return f"{mean:.2f} ± {(ci[1] - ci[0]) / 2:.2f}"


def print_table(rows: list[dict]) -> None:
    head = ("budget ms", "searched schedule", "cost ms", "FID", "best single sampler", "cost ms", "FID",
            "difference [95 % CI]", "verdict", "speed-up at equal quality (upper bound < margin?)",
            "single cost @ equal FID", "wall ms searched / single")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for s in rows:
        eq = s["baseline_cost_at_equal_fid"]
        lo, hi = s["diff_ci"]
        print(f"| {s['budget']:.0f} | {md(_with_spacing(s['schedule'], s.get('spacing')))} | {s['cost']:.0f} | "
              f"{_pm(s['fid_mean'], s['fid_ci'])} | "
              f"{md(_with_spacing(s['baseline_schedule'], s['baseline_sampler'].get('spacing')))} | "
              f"{s['baseline_cost']:.0f} | "
              f"{_pm(s['baseline_fid_mean'], s['baseline_fid_ci'])} | {s['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
              f"**{s['verdict']}**{' (the baseline itself)' if s.get('winner_is_baseline') else ''} | "
              f"{_speedup(s.get('equal_quality'))} | "
              f"{'not reached' if eq is None else f'{eq:.0f}'} | "
              f"{1000 * s['wall_seconds']['searched']:.0f} / {1000 * s['wall_seconds']['baseline']:.0f} |")


def _with_spacing(compact: str, spacing: str | None) -> str:
    """'dpm_solver++: [tiny]×11 | t 1.0→0.001, NFE 11' → 'dpm_solver++ (karras): [tiny]×11, NFE 11'."""
    head, _, rest = compact.partition(": ")
    steps, _, times = rest.partition(" | ")
    nfe = times.rsplit(", ", 1)[-1]
    return f"{head}{f' ({spacing})' if spacing else ''}: {steps}, {nfe}"


def print_details(rows: list[dict]) -> None:
    for s in rows:
        nf = s["noise_floor"]
        print(f"\nbudget {s['budget']:.0f} ms — fresh seeds {s['eval_seeds']} × {s['n_eval']} samples "
              f"(selection seed {s['select_seed']} × {s['n_select']}: searched {s['fid_select']:.2f}, "
              f"baseline {s['baseline_fid_select']:.2f} among {s['baselines_considered']} single-member samplers)")
        print(f"  noise floor ({nf.get('n_used')} real images scored as samples are; SampleMetrics.noise_floor "
              f"says which): FID {nf.get('fid', float('nan')):.2f}, "
              f"KID {nf.get('kid_heldout', float('nan')):.4f}, pixel FD {nf.get('pixel_fd', float('nan')):.3f}")
        h, p = s["heldout"], s["second_metric"]
        print(f"  held-out KID: searched {h['mean']:.4f}, baseline {h['baseline_mean']:.4f} → {h['verdict']}; "
              f"pixel FD: {p['mean']:.3f} vs {p['baseline_mean']:.3f} → {p['verdict']}; copy rate "
              f"{s['copy_rate']['searched']:.3f} / {s['copy_rate']['baseline']:.3f} "
              f"(real held-out {s['copy_rate']['real_heldout']:.3f})")
        eq, rf = s.get("equal_quality"), s.get("refinement")
        if rf:
            print(f"  refinement: {rf['evaluations']} true evaluations raced in {rf['seconds']:.0f} s, {rf['measured']} "
                  f"schedules measured at {s['n_select']} samples; selection FID best {rf['best_fid_select']:.2f}, "
                  f"baseline {rf['reference_fid_select']:.2f}")
        if eq:
            print(f"  equal quality: {eq['schedule']} costs {eq['cost']:.0f} ms against {eq['baseline_cost']:.0f} "
                  f"(×{eq['speedup']:.2f}); FID {_pm(eq['fid_mean'], eq['fid_ci'])}, difference {eq['diff']:+.2f}, "
                  f"one-sided {100 * eq['confidence']:.0f} % upper bound {eq['upper']:+.2f} vs margin "
                  f"{eq['margin']:.2f} ({100 * eq['margin_fraction']:.0f} % of the baseline's FID) → "
                  f"{'non-inferior' if eq['non_inferior'] else 'non-inferiority not shown'}"
                  f"{' (the baseline itself: nothing cheaper reached its quality)' if eq['is_baseline'] else ''}")
        found = " — the search chose the baseline itself" if s["winner_is_baseline"] else ""
        print(f"  winner's solver family: {s['winner_family']}{found}")
        for flag in s["disagreements"]:
            print(f"  ! metrics disagree: {flag}")
        w, e = s["wall_seconds"], s["cost_model_error"]
        print(f"  wall time per batch: searched {1000 * w['searched']:.0f} ms (cost model {s['cost']:.0f}, "
              f"error {100 * e['searched']:+.0f} %), baseline {1000 * w['baseline']:.0f} ms (cost model "
              f"{s['baseline_cost']:.0f}, error {100 * e['baseline']:+.0f} %)")
        now, moved = s.get("cost_model_error_now"), s.get("machine_speed_change")
        if now is not None and moved is not None:
            print(f"  the machine ran {100 * abs(moved):.0f} % {'slower' if moved > 0 else 'faster'} at timing than "
                  f"when profiled; re-priced on a profile taken between the timing rounds the cost model's error is "
                  f"{100 * now['searched']:+.0f} % (searched) and {100 * now['baseline']:+.0f} % (baseline)")
        near = s["kendall_tau_near_budget"] or {}
        print(f"  predictor Kendall tau on its test split {s['kendall_tau']:.3f} (ranking by NFE alone "
              f"{_fmt(s['kendall_tau_neg_nfe'])}; within ±10 % of this budget {_fmt(near.get('kendall_tau'))} "
              f"on {near.get('n', 0)} schedules)")
        if s["budget_note"]:
            print(f"  note: {s['budget_note']}")
        if s.get("ablation"):
            print_ablation(s["ablation"])


def print_ablation(ablation: dict) -> None:
    """search=joint: each ingredient's fresh-seed FID, its verdict against the baseline and the joint winner's
    verdict against it."""
    print("  ablation (fresh seeds; verdicts: contender vs baseline, joint vs contender):")
    for name, r in ablation["rows"].items():
        j = ablation["joint_vs"].get(name)
        vs_joint = "" if j is None else (f"; joint − it {j['diff']:+.2f} [{j['diff_ci'][0]:+.2f}, "
                                         f"{j['diff_ci'][1]:+.2f}] → {j['verdict']}")
        print(f"    {name:<22} {r['cost']:7.0f} ms  FID {_pm(r['fid_mean'], r['fid_ci'])}  "
              f"{r['verdict'] or 'reference'}{vs_joint}  {r['schedule']}")


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


# ----------------------------------------------------------------------------------------------- files
def frontier_plot(path: Path, outcomes: list[dict], title: str) -> Path:
    """Every single-member sampler considered (selection seed: dots per member, and per member the best FID reachable
    at cost ≤ c as a step line); the searched schedule and the chosen baseline with their fresh-seed means and
    95 % intervals."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    records = {r["key"]: r for o in outcomes for r in o["baseline_records"]}.values()
    for member in sorted({r["schedule"]["steps"][0]["members"][0] for r in records}):
        pts = sorted((r["cost"], r["fid"]) for r in records if r["schedule"]["steps"][0]["members"][0] == member)
        envelope, best = [], float("inf")
        for c, f in pts:
            best = min(best, f)
            envelope.append((1000 * c, best))
        line, = ax.step(*zip(*envelope), where="post", alpha=0.7, label=f"{member} alone: best sampler, selection seed")
        ax.scatter([1000 * c for c, _ in pts], [f for _, f in pts], s=6, alpha=0.35, color=line.get_color())
    for i, o in enumerate(outcomes):
        c = o["comparison"]["contenders"]
        for name, style in (("searched", "r*"), ("baseline", "ks")):
            fid = c[name]["fid"]
            x = 1000 * o["costs"][name]
            ax.errorbar([x], [fid["mean"]], yerr=[[fid["mean"] - fid["ci"][0]], [fid["ci"][1] - fid["mean"]]],
                        fmt=style, ms=10 if name == "searched" else 6, capsize=4, zorder=5,
                        label=(f"{name} (fresh seeds, 95 % CI)" if i == 0 else None))
        eq = o.get("equal_quality")
        if eq and not eq["is_baseline"]:
            ax.errorbar([eq["cost"]], [eq["fid_mean"]], yerr=[[eq["fid_mean"] - eq["fid_ci"][0]],
                                                               [eq["fid_ci"][1] - eq["fid_mean"]]],
                        fmt="bD", ms=7, capsize=4, zorder=5,
                        label="cheapest at the baseline's quality (fresh seeds)" if i == 0 else None)
        ax.axvline(1000 * o["budget"], linestyle=":", color="red")
    ax.set(xlabel="cost (ms per batch, profiled)", ylabel="FID", yscale="log", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def save_winner(o: dict, row: dict, zoo, path: Path) -> Path:
    """The schedule file a user ships: the schedule, how it was found (`move`, `grid`), what it scored and on what."""
    kept = {k: v for k, v in o["winner"].meta.items() if k not in RACE_ORDER_META}
    winner = dataclasses.replace(o["winner"], meta={
        **kept, "cost_ms": row["cost"], "fid_mean": row["fid_mean"], "fid_ci": row["fid_ci"],
        "eval_seeds": row["eval_seeds"], "n_eval": row["n_eval"], "verdict": row["verdict"],
        "budget_ms": row["budget"], "data": zoo.data_name, "zoo": zoo.fingerprint()})
    return save_schedule(winner, path)


def report_outcomes(outcomes: list[dict], zoo, profile, run_dir: Path, store_size: int, logger,
                    predictor_metrics: dict, settings: dict) -> list[dict]:
    """Write schedule.json (schedule_<budget>ms.json for several budgets), frontier.png and winner.png (the first
    budget's samples), log them to W&B, and return one summary row per budget."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarise(o, profile, store_size, predictor_metrics, settings) for o in outcomes]
    names = ["schedule.json"] if len(outcomes) == 1 else [f"schedule_{ms(o['budget']):.0f}ms.json" for o in outcomes]
    schedule_path = [save_winner(o, row, zoo, run_dir / name) for o, row, name in zip(outcomes, rows, names)][0]
    plot = frontier_plot(run_dir / "frontier.png", outcomes, f"{zoo.data_name}: searched vs single-member samplers")
    grid = save_grid(generate(zoo, load_schedule(schedule_path), 64, seed=settings["eval_seeds"][0]),
                     run_dir / "winner.png")
    if logger:
        _log_wandb(logger, outcomes, rows, schedule_path, plot, grid)
    return rows


def _log_wandb(logger, outcomes, rows, schedule_path: Path, plot: Path, grid: Path) -> None:
    import wandb

    population = [[o["budget"] * 1000, c.schedule.compact(), c.cost * 1000, c.schedule.nfe, c.score]
                  for o in outcomes for r in o["results"] for c in r.population]
    logger.log_table("search/population", columns=["budget_ms", "schedule", "cost_ms", "nfe", "predicted_score"],
                     data=population)
    points = [[o["budget"] * 1000, r["schedule"]["steps"][0]["members"][0] + " alone", r["key"], r["cost"] * 1000,
               r["fid"], "selection seed"] for o in outcomes for r in o["baseline_records"]]
    for o, row in zip(outcomes, rows):
        for name, schedule, cost, fid in (("searched", row["schedule"], row["cost"], row["fid_mean"]),
                                          ("baseline", row["baseline_schedule"], row["baseline_cost"],
                                           row["baseline_fid_mean"])) + (
                (("equal_quality", row["equal_quality"]["schedule"], row["equal_quality"]["cost"],
                  row["equal_quality"]["fid_mean"]),) if row.get("equal_quality") else ()):
            points.append([o["budget"] * 1000, name, schedule, cost, fid, "fresh seeds (mean)"])
    logger.log_table("search/frontier_points", columns=["budget_ms", "what", "schedule", "cost_ms", "fid", "fid_on"],
                     data=points)
    logger.log_image("search/frontier", images=[str(plot)])
    logger.log_image("search/winner_samples", images=[str(grid)])
    artifact = wandb.Artifact("schedule", type="model-schedule",
                              metadata={k: v for k, v in rows[0].items() if k != "comparison"})
    artifact.add_file(str(schedule_path))
    logger.experiment.log_artifact(artifact)
