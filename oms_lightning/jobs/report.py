"""The report command: FID against budget over many search runs.

    python -m oms_lightning.jobs.report outputs/search multirun/search outputs/wandb   [--out frontier.png]

It reads every summary.json below the given folders (local runs, and offline W&B runs, whose files/ folder holds
the same summary.json) and prints one row per run and budget, the table the search prints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from oms_lightning.io import atomic_path, atomic_write_text  # noqa: E402
from oms_lightning.search.report import print_table  # noqa: E402


def collect(folders: list[Path]) -> list[dict]:
    """Every budget row of every summary.json below the folders, one row per run and budget: a run's W&B offline
    copy (`files/summary.json`) holds the same row as its run folder, so rows are keyed by their content and the
    first copy found is kept (its other places listed under `copies`)."""
    rows: dict[str, dict] = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("summary.json")):
            data = json.loads(f.read_text())
            for row in data if isinstance(data, list) else [data]:
                if "budget" in row and "fid_ci" in row:
                    key = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()
                    rows.setdefault(key, {**row, "source": str(f), "copies": []})["copies"].append(str(f))
    return [{**r, "copies": r["copies"][1:]} for r in rows.values()]


def budget_plot(rows: list[dict], out: Path) -> Path:
    rows = sorted({r["budget"]: r for r in rows}.values(), key=lambda r: r["budget"])  # one run per budget
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, ci, fmt, label in (("fid_mean", "fid_ci", "o-", "searched schedule"),
                                ("baseline_fid_mean", "baseline_fid_ci", "s--", "best single-member sampler")):
        xs = [r["budget"] for r in rows]
        ys = [r[key] for r in rows]
        err = [[y - r[ci][0] for y, r in zip(ys, rows)], [r[ci][1] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, fmt=fmt, capsize=4, label=f"{label} (fresh seeds, 95 % CI)")
    for r in rows:
        ax.annotate(r["verdict"], (r["budget"], r["fid_mean"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
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
        raise SystemExit(f"error: no summary.json with fresh-seed results under {', '.join(map(str, args.folders))}; "
                         f"run search.py first")
    print_table(sorted(rows, key=lambda r: r["budget"]))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print(f"\nfrontier: {budget_plot(rows, args.out)}\ntable:    {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
