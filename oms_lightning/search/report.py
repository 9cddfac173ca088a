"""Search results: the printed table, schedule.json, frontier.png, the winner's grid, W&B logging — and the
report command that draws FID against budget over many runs:

    python -m oms_lightning.search.report outputs/search multirun/search outputs/wandb   [--out frontier.png]

It reads every summary.json below the given folders (local runs, and offline W&B runs, whose files/ folder holds
the same summary.json).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from oms_lightning.images import save_grid  # noqa: E402
from oms_lightning.io import atomic_path, atomic_write_text  # noqa: E402
from oms_lightning.sampling import generate  # noqa: E402
from oms_lightning.schedule import ModelSchedule  # noqa: E402


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def members_of(record: dict) -> set[str]:
    return {m for step in record["schedule"]["steps"] for m in step["members"]}


def best_within(records: list[dict], budget: float) -> dict | None:
    fitting = [r for r in records if r["cost"] <= budget * (1 + 1e-9)]
    return min(fitting, key=lambda r: r["fid"]) if fitting else None


def cheapest_reaching(records: list[dict], fid: float) -> dict | None:
    reaching = [r for r in records if r["fid"] <= fid]
    return min(reaching, key=lambda r: r["cost"]) if reaching else None


def summarise(outcome, baselines: list[dict], store_size: int, seed: int) -> dict:
    w = outcome.winner
    base = best_within(baselines, outcome.budget)
    equal = cheapest_reaching(baselines, w["fid"])
    return {"budget": ms(outcome.budget), "schedule": ModelSchedule.from_dict(w["schedule"]).compact(),
            "cost": ms(w["cost"]), "nfe": w["nfe"], "fid": w["fid"],
            "baseline_fid": base["fid"] if base else None,
            "baseline_schedule": ModelSchedule.from_dict(base["schedule"]).compact() if base else None,
            "baseline_cost": ms(base["cost"]) if base else None,
            "baseline_cost_at_equal_fid": ms(equal["cost"]) if equal else None,
            "wins": base is None or w["fid"] < base["fid"],
            "kendall_tau": None, "n_records": store_size, "fid_samples": w["n"], "fid_seed": seed,
            "extractor": w["extractor"], "budget_note": outcome.result.budget_note,
            "schedules_scored": outcome.result.evaluated}


def frontier_plot(path: Path, baselines: list[dict], outcomes, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for member in sorted({m for r in baselines for m in members_of(r)}):
        pts = sorted((r["cost"], r["fid"]) for r in baselines if members_of(r) == {member})
        envelope, best = [], math.inf
        for c, f in pts:  # best FID reachable at cost ≤ c
            best = min(best, f)
            envelope.append((1000 * c, best))
        ax.step(*zip(*envelope), where="post", label=f"{member} alone (best order)")
    for o in outcomes:
        ax.scatter([1000 * r["cost"] for r in o.reranked], [r["fid"] for r in o.reranked], marker="x", color="grey")
        ax.scatter([1000 * o.winner["cost"]], [o.winner["fid"]], marker="*", s=200, color="red", zorder=5)
        ax.axvline(1000 * o.budget, linestyle=":", color="red")
    ax.scatter([], [], marker="*", color="red", label="searched schedule (budget dotted)")
    ax.set(xlabel="cost (ms per batch, profiled)", ylabel="FID", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def print_table(rows: list[dict]) -> None:
    head = ("budget ms", "schedule", "cost ms", "NFE", "FID", "best single FID", "single cost @ equal FID")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for s in rows:
        eq = s["baseline_cost_at_equal_fid"]
        base = "—" if s["baseline_fid"] is None else f"{s['baseline_fid']:.2f} ({s['baseline_schedule']})"
        print(f"| {s['budget']:.0f} | {s['schedule']} | {s['cost']:.0f} | {s['nfe']} | {s['fid']:.2f} | {base} | "
              f"{'not reached' if eq is None else f'{eq:.0f}'} |")


def save_winner(outcome, zoo, path: Path) -> Path:
    w = outcome.winner
    return ModelSchedule.from_dict(w["schedule"]).with_meta(
        cost_ms=ms(w["cost"]), fid=w["fid"], fid_samples=w["n"], budget_ms=ms(outcome.budget), data=zoo.data_name,
        zoo=zoo.fingerprint()).save(path)


def report_outcomes(outcomes, baselines: list[dict], zoo, run_dir: Path, store_size: int, logger, seed: int) -> list[dict]:
    """Write schedule.json (schedule_<budget>ms.json for several budgets), frontier.png and winner.png (the
    first budget's samples), log them to W&B, and return one summary per budget."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarise(o, baselines, store_size, seed) for o in outcomes]
    names = ["schedule.json"] if len(outcomes) == 1 else [f"schedule_{ms(o.budget):.0f}ms.json" for o in outcomes]
    schedule_path = [save_winner(o, zoo, run_dir / name) for o, name in zip(outcomes, names)][0]
    plot = frontier_plot(run_dir / "frontier.png", baselines, outcomes, f"{zoo.data_name}: searched vs single members")
    grid = save_grid(generate(zoo, ModelSchedule.load(schedule_path), 64, seed=seed), run_dir / "winner.png")
    if logger:
        _log_wandb(logger, outcomes, rows, schedule_path, plot, grid)
    return rows


def _log_wandb(logger, outcomes, rows, schedule_path: Path, plot: Path, grid: Path) -> None:
    import wandb

    population = [[o.budget * 1000, c.schedule.compact(), c.cost * 1000, c.schedule.nfe, c.score]
                  for o in outcomes for c in o.result.population]
    logger.log_table("search/population", columns=["budget_ms", "schedule", "cost_ms", "nfe", "predicted_score"],
                     data=population)
    logger.log_image("search/frontier", images=[str(plot)])
    logger.log_image("search/winner_samples", images=[str(grid)])
    artifact = wandb.Artifact("schedule", type="model-schedule", metadata=rows[0])
    artifact.add_file(str(schedule_path))
    logger.experiment.log_artifact(artifact)


# ----------------------------------------------------------------------------------------------- report command
def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for f in sorted(Path(folder).rglob("summary.json")):
            data = json.loads(f.read_text())
            for row in data if isinstance(data, list) else [data]:
                if "budget" in row and "fid" in row:
                    rows.append({**row, "source": str(f)})
    return rows


def budget_plot(rows: list[dict], out: Path) -> Path:
    rows = sorted({r["budget"]: r for r in rows}.values(), key=lambda r: r["budget"])  # one run per budget
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["budget"] for r in rows], [r["fid"] for r in rows], "o-", color="red", label="searched schedule")
    ax.plot([r["budget"] for r in rows if r["baseline_fid"] is not None],
            [r["baseline_fid"] for r in rows if r["baseline_fid"] is not None], "s--", label="best single member")
    ax.set(xlabel="budget (ms per batch)", ylabel="FID", yscale="log", title="FID vs budget")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="FID-vs-budget frontier from search runs (local and offline W&B)")
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("outputs/search/frontier.png"))
    args = p.parse_args(argv)
    rows = collect(args.folders)
    if not rows:
        raise SystemExit(f"error: no summary.json under {', '.join(map(str, args.folders))}; run search.py first")
    print_table(sorted(rows, key=lambda r: r["budget"]))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print(f"\nfrontier: {budget_plot(rows, args.out)}\ntable:    {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
