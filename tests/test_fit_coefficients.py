"""fit_coefficients.py: the IIA command end to end on tiny settings, on a mixed-member schedule, and its refusals."""
import json

import pytest
import torch

from conftest import SMALL, TINY, run_cli, write_member
from oms_lightning.errors import UserError
from oms_lightning.evaluation import VERDICTS
from oms_lightning.schedule import ModelSchedule, ScheduleError, schedule_key
from oms_lightning.schedule.file import load_schedule, save_schedule

TINY_ARGS = ["steps=3", "sub_steps=2", "fine_steps=10", "logger=none", "fit_coefficients.calibration.n=32",
             "fit_coefficients.calibration.held_out=16", "fit_coefficients.evaluation.n=16",
             "fit_coefficients.evaluation.seeds=[100,101]", "fit_coefficients.timing.batch_size=8",
             "fit_coefficients.timing.rounds=1"]
NO_FID = "fit_coefficients.evaluation.n=0"


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny nets: see conftest.one_thread


@pytest.fixture
def root(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    return tmp_path


def overrides(root, *extra):
    return [f"paths.checkpoints={root}", f"paths.run_dir={root}/run", *TINY_ARGS, *extra]


def run_job(compose, root, *extra):
    from oms_lightning.jobs.fit_coefficients import fit_coefficients

    return fit_coefficients(compose("fit_coefficients", overrides(root, *extra)))


@pytest.mark.slow
def test_fit_end_to_end_then_sample_with_the_coefficients(root):
    r = run_cli("fit_coefficients.py", "model=tiny", *overrides(root))
    assert r.returncode == 0, r.stderr[-3000:]
    run = root / "run"
    assert {"schedule.json", "fit.json", "summary.json", "grid.png", "grid_plain.png"} <= {p.name for p in
                                                                                            run.iterdir()}
    schedule = load_schedule(run / "schedule.json")
    assert schedule.solver == "dpm_solver++" and schedule.correction.feature_set == "full"
    assert len(schedule.correction.coefficients) == 3
    assert all(len(row) == 3 for row in schedule.correction.coefficients)   # eps, eps_diff, x0_diff
    assert schedule.correction.plain_key == schedule_key(schedule.plain())
    assert schedule.meta["plain"] == {"spacing": "logsnr_uniform"} and schedule.meta["iia"]["sub_steps"] == 2

    fit = json.loads((run / "fit.json").read_text())
    assert [s["coefficients"] for s in fit["steps"]] == [list(r) for r in schedule.correction.coefficients]
    for step in fit["steps"]:
        assert {"condition", "ridge", "fit_before", "fit_after", "held_before", "held_after"} <= set(step)
        assert step["fit_after"] <= step["fit_before"] * (1 + 1e-9)   # least squares never adds to the residual
    assert fit["held_out_error"]["plain"] > 0 and fit["held_out_error"]["fine_steps"] == 10
    summary = json.loads((run / "summary.json").read_text())
    assert summary["comparison"]["contenders"]["iia"]["fid"]["verdict"] in VERDICTS
    assert summary["comparison"]["seeds"] == [100, 101] and summary["overhead"]["ratio"] > 0

    s = run_cli("sample.py", f"paths.checkpoints={root}", f"schedule={run / 'schedule.json'}", "n=4",
                f"paths.out_dir={root}/sample")
    assert s.returncode == 0, s.stderr[-2000:]
    assert load_schedule(root / "sample" / "schedule.json") == schedule   # the coefficients went through

    from oms_lightning.sampling import generate
    from oms_lightning.zoo import Zoo

    write_member(root, "tiny", TINY, seed=1)                                   # retrained: other weights
    with pytest.raises(UserError, match="other weights of tiny.*refit them with fit_coefficients.py"):
        generate(Zoo.load(root, "digits", ["tiny"]), schedule, 4)

    both = run_cli("fit_coefficients.py", "model=tiny", f"schedule={run / 'schedule.json'}", *overrides(root))
    assert both.returncode == 2 and both.stderr.strip().splitlines() == [
        "error: give exactly one of model=<member> (one member for every step) or schedule=PATH.json"]


def test_a_mixed_member_schedule_file_fits_and_refits(compose, root):
    from oms_lightning.diffusion.noise_schedule import VPSchedule
    from oms_lightning.diffusion.spacing import timesteps
    from oms_lightning.zoo import Zoo

    write_member(root, "small", SMALL, seed=2)
    times = timesteps("logsnr_uniform", 3, VPSchedule(), t_end=1e-3).tolist()
    mixed = ModelSchedule.from_times_and_members(times, ["small", "tiny", "small"], solver="ddim")
    save_schedule(mixed, root / "mixed.json")
    summary = run_job(compose, root, f"schedule={root / 'mixed.json'}", "feature_set=eps", NO_FID)
    fitted = load_schedule(root / "run" / "schedule.json")
    assert fitted.plain() == mixed and len(fitted.correction.coefficients) == 3
    assert fitted.correction.weights == Zoo.load(root, "digits", ["small", "tiny"]).fingerprint(["small", "tiny"])
    assert summary["comparison"] is None and summary["members"] == ["small", "tiny"]

    # a schedule that already carries coefficients is refitted from its plain schedule: the same noise and
    # weights give the same coefficients; the W&B path runs too (disabled in tests)
    again = run_job(compose, root, f"schedule={root / 'run' / 'schedule.json'}", "feature_set=eps", NO_FID,
                    f"paths.run_dir={root}/run2", "logger=wandb", f"logger.save_dir={root}/wandb")
    assert load_schedule(root / "run2" / "schedule.json") == fitted
    assert again["held_out_error"] == summary["held_out_error"]


def test_heun_with_a_reference_member(compose, root):
    write_member(root, "small", SMALL, seed=2)
    summary = run_job(compose, root, "model=tiny", "solver=heun", "steps=2", "reference_member=small", NO_FID)
    fit = json.loads((root / "run" / "fit.json").read_text())
    assert summary["feature_set"] == "edm" and fit["features"] == ["euler", "corrector", "x0_diff"]
    assert fit["reference_member"] == "small" and fit["reference_weights"]
    assert summary["members"] == ["tiny"]                     # the reference is no member of the schedule


@pytest.mark.parametrize("extra, error, message", [
    (["model=tiny", "schedule=x.json"], UserError, "give exactly one of model=<member>.*or schedule=PATH.json"),
    ([], UserError, "give exactly one of model=<member>"),
    (["model=tiny", "feature_set=edm"], UserError, "dpm_solver\\+\\+ has no IIA feature set 'edm'; it supports: "
                                                   "full, eps, eps_diff, x0_diff"),
    (["model=tiny", "solver=dpm_solver"], UserError, "dpm_solver has no IIA feature sets.*solvers with IIA "
                                                     "features: ddim, dpm_solver\\+\\+"),
    (["model=tiny", "solver=euler"], UserError, "unknown solver 'euler'"),
    (["model=tiny", "steps=0"], UserError, "steps must be an integer >= 1"),
    (["model=tiny", "sub_steps=0"], UserError, "sub_steps must be an integer >= 1"),
    (["model=tiny", "fit_coefficients.calibration.held_out=1"], UserError, "held_out must be an integer >= 2"),
    (["model=tiny", "fit_coefficients.evaluation.n=1"], UserError, "evaluation.n must be 0"),
    (["model=tiny", "fit_coefficients.evaluation.seeds=[1000,101]"], UserError,
     "overlap the seed\\(s\\) used for the calibration noise"),
    (["model=tiny", "reference_member=huge"], UserError, "zoo member\\(s\\) huge not found"),
])
def test_bad_settings_are_one_clear_error_before_any_work(compose, root, extra, error, message):
    with pytest.raises(error, match=message):
        run_job(compose, root, *extra)
    assert not (root / "run").exists()


def test_bad_schedule_files_are_one_clear_error(compose, root):
    corrupt = root / "corrupt.json"
    corrupt.write_text('{"format": "oms-lightning/model-schedule-v1", "solver": ')
    with pytest.raises(ScheduleError, match="corrupt.json: invalid JSON"):
        run_job(compose, root, f"schedule={corrupt}")
    singlestep = ModelSchedule.single("tiny", [1.0, 0.5, 0.001], solver="dpm_solver", orders=2)
    save_schedule(singlestep, root / "singlestep.json")
    with pytest.raises(UserError, match="dpm_solver has no IIA feature sets.*solvers with IIA features"):
        run_job(compose, root, f"schedule={root / 'singlestep.json'}")
    assert not (root / "run").exists()
