"""search.py end to end on a tiny fake zoo with a fixed latency profile (deterministic costs): summary contract,
budget errors, missing members, and a multirun over budgets that reuses the cached store and predictor."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, TINY, cli_env, write_member
from oms_lightning.zoo import LatencyProfile, Zoo, device_description

SUMMARY_KEYS = {"budget", "cost", "nfe", "fid", "baseline_fid", "baseline_cost_at_equal_fid", "kendall_tau",
                "n_records", "fid_mean", "fid_ci", "baseline_fid_mean", "baseline_fid_ci", "diff_ci", "verdict",
                "heldout", "eval_seeds", "n_eval", "noise_floor", "wall_seconds", "cost_model_error", "fid_select",
                "select_seed", "kendall_tau_neg_nfe", "kendall_tau_near_budget"}


@pytest.fixture
def zoo_root(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    write_member(tmp_path, "small", SMALL, seed=1)
    zoo = Zoo.load(tmp_path, "digits", ["small", "tiny"])
    one_thread = device_description("cpu").rsplit(" (", 1)[0] + " (1 thread)"  # the subprocesses run 1 thread
    LatencyProfile({"small": 0.02, "tiny": 0.01}, 256, one_thread, "float32", zoo.fingerprint()).save(
        tmp_path / "digits" / "latency.json")
    return tmp_path


def tiny_search_args(root) -> list[str]:
    return [f"paths.checkpoints={root}", "zoo.members=[tiny,small]", "zoo.train_missing=false", "logger=none",
            "search.space.size=4", "search.dataset.n_random=16", "search.dataset.anchor_nfes=[2,4]",
            "search.dataset.n_samples=32", "search.dataset.batch_size=32", "search.predictor.epochs=3",
            "search.evolution.generations=5", "search.evolution.population=8", "search.evolution.children=8",
            "search.rerank.n_samples=32", "search.rerank.top_k=2", "search.evaluation.n=32",
            "search.evaluation.seeds=[100,101]", "search.evaluation.timing_rounds=1",
            "search.refine.evaluations=45", "search.refine.rungs=[16]", "search.refine.per_round=4",
            "search.refine.segments=3", "search.refine.probes=1", "search.refine.confirm=64",
            f"hydra.run.dir={root}/run", f"hydra.sweep.dir={root}/multi"]


def search_command(root, *args) -> list[str]:
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return [sys.executable, "search.py", *flags, *tiny_search_args(root), *overrides]


def run_search(root, *args):
    return subprocess.run(search_command(root, *args), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


def write_ays(root, member="tiny", solver="dpm_solver++"):
    """An AYS steps file for `member`'s weights (an EDM schedule stands in for an optimised one)."""
    from oms_lightning.diffusion.ays import edm_sigmas, insert_log_midpoints, sigma_of_t
    from oms_lightning.diffusion.noise_schedule import VPSchedule
    from oms_lightning.diffusion.ays_steps import save_steps, steps_path

    fp = Zoo.load(root, "digits", [member]).fingerprint()
    noise = VPSchedule()
    four = edm_sigmas(sigma_of_t(noise, 1e-3).item(), sigma_of_t(noise, 1.0).item(), 4, rho=5.0)
    levels = [{"sigmas": four.tolist()}, {"sigmas": insert_log_midpoints(four).tolist()}]
    return save_steps(steps_path(root, "digits", member, fp, solver),
                      {"member": member, "fingerprint": fp, "solver": solver, "levels": levels})


def test_the_search_finds_the_ays_steps_of_its_members_weights(zoo_root, compose):
    from oms_lightning.errors import UserError
    from oms_lightning.jobs.search import load_ays

    zoo = Zoo.load(zoo_root, "digits", ["small", "tiny"])
    cfg = compose("search", tiny_search_args(zoo_root)[:-2])
    assert load_ays(cfg, zoo) == {}
    write_ays(zoo_root)
    table = load_ays(cfg, zoo)
    assert list(table) == [("tiny", "dpm_solver++")] and len(table[("tiny", "dpm_solver++")]) == 2
    cfg.ays = "off"
    assert load_ays(cfg, zoo) == {}
    cfg.ays = "always"
    with pytest.raises(UserError, match="choose auto"):
        load_ays(cfg, zoo)
    cfg.ays = "auto"
    write_ays(zoo_root).write_text("{")
    with pytest.raises(UserError, match="not JSON"):
        load_ays(cfg, zoo)


@pytest.mark.slow
def test_search_py_end_to_end_then_multirun_reuses_the_cache(zoo_root):
    write_ays(zoo_root)  # tiny's AYS steps join the time grids and the baselines
    r = run_search(zoo_root, "budget=60")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "AYS steps of this zoo's weights: tiny/dpm_solver++" in r.stdout
    run = zoo_root / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["cost"] <= 60 and summary["n_records"] > 16 and -1 <= summary["kendall_tau"] <= 1
    assert set(summary["winner_steps_single_member_fid_select"]) == {"small", "tiny"}
    check_fresh_seed_protocol(zoo_root, summary)
    for name in ("schedule.json", "frontier.png", "winner.png"):
        assert (run / name).is_file(), name
    assert "| budget ms |" in r.stdout
    # the terminal holds messages, not Hydra's timestamps or Lightning's accelerator lines; the run's log keeps both
    assert "][INFO] - " not in r.stdout and "GPU available" not in r.stdout + r.stderr
    assert "][oms_lightning." in (run / "search.log").read_text()

    store = next((zoo_root / "digits" / "search").glob("records-*.jsonl"))
    lines = store.read_text().count("\n")
    first = [int(n) for n in re.findall(r"training the predictor on (\d+) records", r.stdout)]
    r = run_search(zoo_root, "-m", "budget=50,80")
    assert r.returncode == 0, r.stderr[-4000:]
    assert store.read_text().count("\n") == lines  # the dataset: nothing regenerated
    # the predictor is retrained on the grown store: every true FID the first run measured joins its records
    grown = [int(n) for n in re.findall(r"training the predictor on (\d+) records", r.stdout)]
    assert len(first) == 1 and grown and min(grown) > first[0]
    assert "refine (best): raced" in r.stdout and "refine (cheapest)" in r.stdout
    check_no_schedule_measured_twice(zoo_root / "digits" / "search")
    costs = [json.loads(p.read_text())["cost"] for p in sorted((zoo_root / "multi").rglob("summary.json"))]
    assert len(costs) == 2 and costs[0] <= 50 and costs[1] <= 80

    r = run_search(zoo_root, "budgets=[80,50]")  # one run, one predictor, a frontier of two budgets
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads((zoo_root / "run" / "summary.json").read_text())
    assert [row["budget"] for row in rows] == [50, 80] and all(row["cost"] <= row["budget"] for row in rows)
    assert (zoo_root / "run" / "schedule_50ms.json").is_file()
    assert r.stdout.count("reusing predictor") + r.stdout.count("training the predictor") == 2  # one per budget
    check_no_schedule_measured_twice(zoo_root / "digits" / "search")
    eq = rows[0]["equal_quality"]
    assert eq["cost"] <= eq["baseline_cost"] and eq["speedup"] == pytest.approx(eq["baseline_cost"] / eq["cost"])
    assert eq["non_inferior"] == (eq["upper"] < eq["margin"]) and rows[0]["refinement"]["evaluations"] <= 45


def check_no_schedule_measured_twice(cache):
    """Every record store (dataset, selection per sample count, evaluation per seed) holds each schedule once, after
    reruns and a multirun: a true FID once measured is never measured again."""
    stores = list(cache.glob("*.jsonl"))
    assert any(p.name.startswith("rerank-") for p in stores)
    for p in stores:
        keys = [json.loads(line).get("key") for line in p.read_text().splitlines()[1:] if line.strip()]
        assert len(keys) == len(set(keys)), p.name


def check_fresh_seed_protocol(root, summary):
    """The reported FID is the mean over fresh evaluation seeds, not the number that selected the winner: recompute
    the winner's per-seed FIDs from its schedule file and the interval and verdict from them."""
    import numpy as np
    from scipy import stats

    from oms_lightning.data import DigitsDataModule
    from oms_lightning.metrics import FIDEvaluator
    from oms_lightning.sampling import generate
    from oms_lightning.schedule.file import load_schedule

    assert summary["eval_seeds"] == [100, 101] and summary["select_seed"] not in summary["eval_seeds"]
    contenders = summary["comparison"]["contenders"]
    per_seed = contenders["searched"]["fid"]["per_seed"]
    winner = load_schedule(root / "run" / "schedule.json")
    zoo = Zoo.load(root, "digits", winner.member_names)
    evaluator = FIDEvaluator("digits_classifier", DigitsDataModule(batch_size=64), root / "digits")
    again = [evaluator.fid(generate(zoo, winner, 32, seed=s), s).value for s in summary["eval_seeds"]]
    assert np.allclose(per_seed, again, rtol=1e-4)
    assert summary["fid"] == pytest.approx(np.mean(again), rel=1e-4)
    diffs = np.subtract(per_seed, contenders["baseline"]["fid"]["per_seed"])
    half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / np.sqrt(2)
    assert summary["diff_ci"] == pytest.approx([diffs.mean() - half, diffs.mean() + half], rel=1e-6)
    expected = "tie" if summary["diff_ci"][0] <= 0 <= summary["diff_ci"][1] else (
        "better" if summary["diff_ci"][1] < 0 else "worse")
    assert summary["verdict"] == expected and summary["wins"] == (expected == "better")
    assert summary["baselines_considered"] >= 2 * 6 * 4 - 8  # members × samplers × spacings (a few coincide)
    assert summary["wall_seconds"]["searched"] > 0 and summary["noise_floor"]["n_used"] == 32
    # kind=all (the default) contains every single-member sampler: the search never loses to one on selection
    assert summary["fid_select"] <= summary["baseline_fid_select"] + 1e-9
    assert summary["winner_family"] in {"ddim", "dpm_solver", "dpm_solver++", "dpm_solver++3m", "heun"}


def test_budget_below_the_cheapest_schedule_names_the_minimum(zoo_root):
    r = run_search(zoo_root, "budget=5")
    assert r.returncode == 2 and "below the cheapest valid schedule" in r.stderr and "10.0" in r.stderr


@pytest.mark.parametrize("override, message", [
    ("search.evaluation.seeds=[1,100]", "overlap the seed(s) used for the re-rank"),
    ("search.evaluation.seeds=[100]", "at least 2 distinct"),
    ("search.evaluation.baseline_nfes=most", "baseline_nfes must be 'all', 'largest' or a positive integer"),
    ("search.evaluation.n=1", "search.evaluation.n=1"),
])
def test_bad_evaluation_settings_stop_before_any_work(zoo_root, override, message):
    r = run_search(zoo_root, "budget=60", override)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not list((zoo_root / "digits" / "search").glob("records-*.jsonl"))


@pytest.mark.parametrize("overrides, message", [
    (["search.dataset.devices=2", "search.dataset.strategy=ddp"], "ddp re-runs the whole search in every rank"),
    (["search.dataset.devices=0"], "search.dataset.devices=0"),
    (["+search.dataset.num_nodes=2"], "spreads over the devices of one machine"),
    (["search.dataset.spread_min=0"], "search.dataset.spread_min=0"),
])
def test_device_settings_that_cannot_spread_the_search_are_refused(zoo_root, overrides, message):
    r = run_search(zoo_root, "budget=60", *overrides)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_two_spawned_processes_share_the_dataset_and_the_refinement(zoo_root):
    r = run_search(zoo_root, "budget=60", "search.dataset.devices=2", "search.dataset.accelerator=cpu",
                   "search.dataset.spread_min=4", "search.refine.evaluations=8")
    assert r.returncode == 0, r.stderr[-4000:]
    spread = re.findall(r"new schedules spread over 2 processes \(([\w-]+)\.jsonl", r.stdout + r.stderr)
    assert sum(name.startswith("records-") for name in spread) == 1   # the dataset
    # the selection seed at its own sample count (baseline, re-rank) and at the refinement's other counts
    assert len({name for name in spread if name.startswith("rerank-")}) >= 2
    assert (r.stdout + r.stderr).count("Starting with 2 processes") == len(spread)
    summary = json.loads((zoo_root / "run" / "summary.json").read_text())
    assert summary["refinement"]["evaluations"] > 0
    check_no_schedule_measured_twice(zoo_root / "digits" / "search")
    assert not list((zoo_root / "digits" / "search").glob("*.rank*"))  # every shard merged


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


@pytest.mark.slow
def test_joint_search_writes_the_ablation_of_its_ingredients(zoo_root):
    """search=joint: AYS grids, time genes and IIA coefficients on the re-ranked candidates; summary.json compares
    members only, + times, the joint winner and the best single member with AYS + IIA on the evaluation seeds."""
    from oms_lightning.evaluation import VERDICTS

    write_ays(zoo_root)
    r = run_search(zoo_root, "search=joint", "budget=60", "search.iia_calibration.n=16",
                   "search.iia_calibration.held_out=8", "search.iia_calibration.sub_steps=2",
                   "search.dataset.iia_anchors=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fitting IIA coefficients for 2 anchors" in r.stdout
    assert "ablation: the same evolution with time fixed" in r.stdout and "ablation (fresh seeds" in r.stdout
    summary = json.loads((zoo_root / "run" / "summary.json").read_text())
    rows = summary["ablation"]["rows"]
    assert set(rows) == {"members_only", "members_and_times", "joint", "single_member_ays_iia", "baseline"}
    assert rows["joint"]["schedule"] == summary["schedule"] and rows["baseline"]["verdict"] is None
    # the single-member contender has every tool: the baseline's pool (AYS times included) and IIA on its top k,
    # so it is the baseline itself or an IIA-corrected single-member sampler
    single = rows["single_member_ays_iia"]["schedule"]
    assert single == rows["baseline"]["schedule"] or " + IIA " in single
    assert all(rows[n]["verdict"] in VERDICTS for n in rows if n != "baseline")
    joint_vs = summary["ablation"]["joint_vs"]
    assert set(joint_vs) == set(rows) - {"joint"} and all(j["verdict"] in VERDICTS for j in joint_vs.values())
    assert joint_vs["baseline"]["diff"] == pytest.approx(summary["diff"])
    # the predictor's dataset holds the AYS anchors and the corrected ones beside their plain versions
    records = [json.loads(line) for p in (zoo_root / "digits" / "search").glob("records-*.jsonl")
               for line in p.read_text().splitlines()[1:]]                      # line 1: the store's header
    corrected = [r["schedule"] for r in records if "correction" in r["schedule"]]
    plain_keys = {r["key"] for r in records if "correction" not in r["schedule"]}
    assert len(corrected) == 2 and all(c["correction"]["plain_key"] in plain_keys for c in corrected)
    assert any(r["schedule"]["meta"].get("spacing") == "ays" for r in records)
    assert all(row["cost"] <= 60 * (1 + 1e-9) for row in rows.values())
    check_fresh_seed_protocol(zoo_root, summary)


def test_iia_fits_are_kept_in_the_search_cache(zoo_root, compose, monkeypatch):
    """A rerun (or a resumed search) reuses every fit of the same weights and calibration settings."""
    from oms_lightning import sampling
    from oms_lightning.samplers import single_member_sampler
    from oms_lightning.schedule import schedule_key
    from oms_lightning.search.dataset import with_iia

    cfg = compose("search", tiny_search_args(zoo_root)[:-2] + [
        "search.iia_calibration.n=8", "search.iia_calibration.held_out=4", "search.iia_calibration.sub_steps=2"])
    zoo = Zoo.load(zoo_root, "digits", ["small", "tiny"])
    plain = [single_member_sampler("tiny", "dpm_solver++", None, "logsnr_uniform", 3, zoo.noise_schedule),
             single_member_sampler("small", "ddim", None, "time_uniform", 2, zoo.noise_schedule)]
    fits = []
    real = sampling.fit_schedule
    monkeypatch.setattr(sampling, "fit_schedule", lambda *a, **k: fits.append(a[1]) or real(*a, **k))
    first = with_iia(cfg, zoo, plain)
    assert len(fits) == 2 and [f.plain() for f in first] == plain and all(f.correction for f in first)
    again = with_iia(cfg, zoo, plain + first)            # from the cache; corrected schedules are not refitted
    assert len(fits) == 2 and [schedule_key(f) for f in again] == [schedule_key(f) for f in first]
    assert [f.correction.coefficients for f in again] == [f.correction.coefficients for f in first]
    cfg.search.iia_calibration.seed = 1001                # other calibration noise: another store, fitted afresh
    with_iia(cfg, zoo, plain[:1])
    assert len(fits) == 3 and len(list((zoo_root / "digits" / "search").glob("iia-*.jsonl"))) == 2


def test_bad_iia_setting_and_calibration_seed_overlap_are_refused(zoo_root):
    r = run_search(zoo_root, "search.iia=always")
    assert r.returncode == 2 and "search.iia='always'" in r.stderr
    r = run_search(zoo_root, "search=joint", "search.iia_calibration.seed=100")
    assert r.returncode == 2 and "the IIA calibration" in r.stderr
    r = run_search(zoo_root, "search.dataset.iia_anchors=-1")
    assert r.returncode == 2 and "search.dataset.iia_anchors=-1" in r.stderr


@pytest.mark.parametrize("spec,seconds", [("900", 0.9), (450, 0.45), ("6xmedium", 6 * 0.128), ("2.5xtiny", 2.5 * 0.022),
                                          ("3 x small", 3 * 0.061), ("4×medium", 4 * 0.128)])
def test_budgets_in_milliseconds_or_in_nfes_of_a_member(spec, seconds):
    from oms_lightning.search.settings import budget_in_nfes, resolve_budget

    latency = {"medium": 0.128, "small": 0.061, "tiny": 0.022}
    assert resolve_budget(spec, latency) == pytest.approx(seconds)
    both = budget_in_nfes(resolve_budget(spec, latency), latency)
    assert both["member"] == "medium" and both["nfe"] == pytest.approx(seconds / 0.128, abs=1e-3)


@pytest.mark.parametrize("spec,message", [("6xhuge", "not a zoo member; use NFEs of one of medium, small, tiny"),
                                          ("six", "neither milliseconds per batch"), ("x6", "neither"),
                                          ("0.5xtiny", "below the cheapest valid schedule"),
                                          ("nan", "below the cheapest")])
def test_bad_budget_spellings_are_one_clear_error(spec, message):
    from oms_lightning.errors import UserError
    from oms_lightning.search.settings import resolve_budget

    with pytest.raises(UserError, match=message):
        resolve_budget(spec, {"medium": 0.128, "small": 0.061, "tiny": 0.022})


def test_a_budget_in_nfes_runs_from_the_command_line(zoo_root):
    r = run_search(zoo_root, "budget=3xsmall", "search.refine.evaluations=0")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((zoo_root / "run" / "summary.json").read_text())
    assert summary["budget"] == pytest.approx(60.0) and summary["budget_nfe"] == {"member": "small", "nfe": 3.0,
                                                                                    "spec": "3xsmall"}
    assert summary["equal_quality"] is None and summary["refinement"] is None
    r = run_search(zoo_root, "budget=3xlarge")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "'large' is not a zoo member" in r.stderr



def test_the_shipped_schedule_keeps_how_it_was_found_not_the_races_order(tmp_path):
    from types import SimpleNamespace

    from oms_lightning.schedule import ModelSchedule
    from oms_lightning.schedule.file import load_schedule
    from oms_lightning.search.report import save_winner

    found = ModelSchedule.from_times_and_members([1.0, 0.5, 0.001], ["tiny", "small"], solver="ddim",
                                                 meta={"move": "run 0-0 → tiny", "coarse": True, "grid": "karras"})
    row = {"cost": 30.0, "fid_mean": 2.0, "fid_ci": [1.5, 2.5], "eval_seeds": [100, 101], "n_eval": 32,
           "verdict": "tie", "budget": 60.0}
    zoo = SimpleNamespace(data_name="digits", fingerprint=lambda: "f00")
    meta = load_schedule(save_winner({"winner": found}, row, zoo, tmp_path / "schedule.json")).meta
    assert "coarse" not in meta and meta["move"] == "run 0-0 → tiny" and meta["grid"] == "karras"
    assert meta["verdict"] == "tie" and meta["zoo"] == "f00" and found.meta["coarse"] is True   # the original kept
