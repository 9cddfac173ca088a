"""search.py end to end on a tiny fake zoo with a fixed latency profile (deterministic costs): summary contract,
budget errors, missing members, and a multirun over budgets that reuses the cached store and predictor."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, TINY, write_member
from oms_lightning.zoo import LatencyProfile, Zoo, device_description

SUMMARY_KEYS = {"budget", "cost", "nfe", "fid", "baseline_fid", "baseline_cost_at_equal_fid", "kendall_tau",
                "n_records"}


@pytest.fixture
def zoo_root(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    write_member(tmp_path, "small", SMALL, seed=1)
    zoo = Zoo.load(tmp_path, "digits", ["small", "tiny"])
    one_thread = device_description("cpu").rsplit(" (", 1)[0] + " (1 thread)"  # the subprocesses run 1 thread
    LatencyProfile({"small": 0.02, "tiny": 0.01}, 256, one_thread, "float32", zoo.fingerprint()).save(
        tmp_path / "digits" / "search" / "latency.json")
    return tmp_path


def run_search(root, *args):
    tiny = [f"paths.checkpoints={root}", "zoo.members=[tiny,small]", "zoo.train_missing=false", "logger=none",
            "search.space.size=4", "search.dataset.n_random=16", "search.dataset.anchor_nfes=[2,4]",
            "search.dataset.n_samples=32", "search.dataset.batch_size=32", "search.predictor.epochs=3",
            "search.evolution.generations=5", "search.evolution.population=8", "search.evolution.children=8",
            "search.rerank.n_samples=32", "search.rerank.top_k=2", "search.rerank.baseline_nfes=[2,4]",
            f"hydra.run.dir={root}/run", f"hydra.sweep.dir={root}/multi"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "search.py", *flags, *tiny, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_search_py_end_to_end_then_multirun_reuses_the_cache(zoo_root):
    r = run_search(zoo_root, "budget=60")
    assert r.returncode == 0, r.stderr[-4000:]
    run = zoo_root / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["cost"] <= 60 and summary["n_records"] > 16 and -1 <= summary["kendall_tau"] <= 1
    assert set(summary["winner_steps_single_member_fid"]) == {"small", "tiny"}
    for name in ("schedule.json", "frontier.png", "winner.png"):
        assert (run / name).is_file(), name
    assert "| budget ms |" in r.stdout

    store = next((zoo_root / "digits" / "search").glob("records-*.jsonl"))
    lines = store.read_text().count("\n")
    r = run_search(zoo_root, "-m", "budget=50,80")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("reusing predictor") == 2 and "training the predictor" not in r.stdout
    assert store.read_text().count("\n") == lines  # nothing regenerated
    costs = [json.loads(p.read_text())["cost"] for p in sorted((zoo_root / "multi").rglob("summary.json"))]
    assert len(costs) == 2 and costs[0] <= 50 and costs[1] <= 80

    r = run_search(zoo_root, "budgets=[80,50]")  # one run, one predictor, a frontier of two budgets
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads((zoo_root / "run" / "summary.json").read_text())
    assert [row["budget"] for row in rows] == [50, 80] and all(row["cost"] <= row["budget"] for row in rows)
    assert (zoo_root / "run" / "schedule_50ms.json").is_file() and "reusing predictor" in r.stdout


def test_budget_below_the_cheapest_schedule_names_the_minimum(zoo_root):
    r = run_search(zoo_root, "budget=5")
    assert r.returncode == 2 and "below the cheapest valid schedule" in r.stderr and "10.0" in r.stderr


def test_missing_member_lists_the_train_commands(zoo_root):
    r = run_search(zoo_root, "zoo.members=[tiny,small,medium]")
    assert r.returncode == 2 and "python train.py model=medium data=digits" in r.stderr


@pytest.mark.slow
def test_missing_members_are_trained_first_with_train_py_code(tmp_path):
    r = run_search(tmp_path, "zoo.members=[tiny]", "zoo.train_missing=true", "search.zoo_train_steps=3",
                   "search.rerank.top_k=1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "training missing zoo member 'tiny'" in r.stdout and (tmp_path / "digits" / "tiny.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["n_records"] > 0
