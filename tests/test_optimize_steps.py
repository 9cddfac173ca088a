"""optimize_steps.py: the AYS command end to end on tiny settings, its resume, and its refusals."""
import json

import pytest

from conftest import TINY, run_cli, write_member
from oms_lightning.errors import UserError
from oms_lightning.evaluation import VERDICTS
from oms_lightning.schedule.file import load_schedule
from oms_lightning.diffusion.ays_steps import STEPS_FORMAT

TINY_ARGS = ["model=tiny", "solver=ddim", "steps=3", "logger=none", "optimize_steps.n_mc=32",
             "optimize_steps.n_candidates=5",
             "optimize_steps.max_sweeps=2", "optimize_steps.refinements=1", "optimize_steps.batch_size=256",
             "optimize_steps.quality.n=32", "optimize_steps.evaluation.n=32", "optimize_steps.evaluation.seeds=[100,101]",
             "optimize_steps.evaluation.steps=[3]"]


@pytest.fixture
def root(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    return tmp_path


def overrides(root, *extra):
    return [f"paths.checkpoints={root}", f"paths.run_dir={root}/run", *TINY_ARGS, *extra]


def steps_files(root):
    return sorted((root / "digits" / "steps").glob("*.json"))


@pytest.mark.slow
def test_optimize_steps_end_to_end_then_sample_with_spacing_ays(root):
    r = run_cli("optimize_steps.py", *overrides(root))
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = steps_files(root)
    assert path.name.startswith("tiny-") and path.name.endswith("-ddim.json")
    d = json.loads(path.read_text())
    assert d["format"] == STEPS_FORMAT and d["member"] == "tiny" and d["solver"] == "ddim"
    assert [lv["steps"] for lv in d["levels"]] == [3, 6]
    for lv in d["levels"]:
        chosen = next(sw for sw in lv["sweeps"] if sw["sweep"] == lv["chosen_sweep"])
        assert chosen["sigmas"] == lv["sigmas"] and len(lv["times"]) == lv["steps"] + 1
        assert set(lv["klub_standard_spacings"]) >= {"karras", "logsnr_uniform", "kl_optimal"}
        # the search starts from the best standard spacing and keeps the best sweep by quality: never worse
        # in KLUB than its start, so at most the best standard spacing's KLUB at level 0
    level0 = d["levels"][0]
    assert min(sw["klub"] for sw in level0["sweeps"]) <= min(level0["klub_standard_spacings"].values()) * (1 + 1e-9)
    summary = json.loads((root / "run" / "summary.json").read_text())
    (comp,) = summary["comparisons"]
    assert comp["nfe"] == 3 and set(comp["vs"]) == set(level0["klub_standard_spacings"])
    assert all(row["ays"]["fid"]["verdict"] in VERDICTS for row in comp["vs"].values())
    assert (root / "run" / "plot.png").stat().st_size > 0
    assert not list((root / "digits" / "steps").glob("*.partial.json"))

    again = run_cli("optimize_steps.py", *overrides(root, f"paths.run_dir={root}/run2",
                                                    "optimize_steps.evaluation.steps=[]"))
    assert again.returncode == 0 and "reusing it" in again.stdout, again.stderr[-2000:]
    assert json.loads(path.read_text()) == d

    s = run_cli("sample.py", f"paths.checkpoints={root}", "model=tiny", "solver=ddim", "spacing=ays", "steps=6",
                "n=4", f"paths.out_dir={root}/sample")
    assert s.returncode == 0, s.stderr[-2000:]
    times = load_schedule(root / "sample" / "schedule.json").times
    assert times == pytest.approx(d["levels"][1]["times"], rel=1e-6)
    other = run_cli("sample.py", f"paths.checkpoints={root}", "model=tiny", "solver=heun", "spacing=ays",
                    f"paths.out_dir={root}/sample2")
    assert other.returncode == 2 and "optimize_steps.py model=tiny solver=heun" in other.stderr


def run_job(compose, root, *extra):
    from oms_lightning.jobs.optimize_steps import optimize_steps

    return optimize_steps(compose("optimize_steps", overrides(root, *extra)))


@pytest.mark.slow
def test_an_interrupted_optimisation_resumes_where_it_stopped(compose, root, monkeypatch):
    """Killed after its 3rd sweep, the rerun continues from the saved state and ends where an uninterrupted run
    ends (same schedule, same per-sweep records)."""
    from oms_lightning.diffusion import ays

    real = ays.optimize
    calls = {"n": 0}

    def dying(*args, on_sweep=None, **kw):
        def counting(snapshot):
            on_sweep(snapshot)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(*args, on_sweep=counting, **kw)

    monkeypatch.setattr(ays, "optimize", dying)
    no_comparison = "optimize_steps.evaluation.steps=[]"
    with pytest.raises(KeyboardInterrupt):
        run_job(compose, root, no_comparison)
    (partial,) = (root / "digits" / "steps").glob("*.partial.json")
    assert len(json.loads(partial.read_text())["state"]["levels"][0]["sweeps"]) == 3
    monkeypatch.setattr(ays, "optimize", real)
    resumed = run_job(compose, root, no_comparison)
    (path,) = steps_files(root)
    resumed_file = json.loads(path.read_text())
    assert not partial.exists()

    fresh = run_job(compose, root, no_comparison, "fresh=true", f"paths.run_dir={root}/run_fresh")
    assert json.loads(path.read_text())["levels"] == resumed_file["levels"]
    assert fresh["chosen"] == resumed["chosen"]


def test_a_resume_under_other_settings_is_refused(compose, root):
    from oms_lightning.jobs.optimize_steps import partial_path, resume_state

    partial = root / "x.partial.json"
    partial.write_text(json.dumps({"settings": {"n_mc": 32, "steps": 3}, "state": {
        "config": {}, "levels": [], "widths": [], "done": False}}))
    with pytest.raises(UserError, match="other settings.*n_mc: 32 there, 64 now.*fresh=true"):
        resume_state(partial, {"n_mc": 64, "steps": 3}, fresh=False)
    assert resume_state(partial, {"n_mc": 64, "steps": 3}, fresh=True) is None
    partial.write_text("{torn")
    with pytest.raises(UserError, match="unreadable.*fresh=true"):
        resume_state(partial, {"n_mc": 32, "steps": 3}, fresh=False)
    assert partial_path(root / "a-b-ddim.json").name == "a-b-ddim.partial.json"


@pytest.mark.parametrize("extra, message", [
    (["steps=1"], "steps must be an integer >= 2"),
    (["solver=euler"], "unknown solver 'euler'"),
    (["c=0"], "c \\(the data's scale\\) must be a positive number"),
    (["optimize_steps.init=linear"], "optimize_steps.init must be best"),
    (["optimize_steps.evaluation.seeds=[7,8]"], "overlap the seed\\(s\\) used for the quality early stop"),
    (["model=small"], "zoo member\\(s\\) small not found"),
])
def test_bad_settings_are_refused_before_any_work(compose, root, extra, message):
    with pytest.raises(UserError, match=message):
        run_job(compose, root, *extra)
    assert not (root / "digits" / "steps").exists()


def test_no_member_is_one_clear_error(compose, root):
    from oms_lightning.jobs.optimize_steps import optimize_steps

    with pytest.raises(UserError, match="model=<member>"):
        optimize_steps(compose("optimize_steps", [f"paths.checkpoints={root}", "logger=none"]))


def test_a_corrupt_or_differently_made_steps_file_is_optimised_again(root):
    from oms_lightning.jobs.optimize_steps import finished_file
    from oms_lightning.diffusion.ays_steps import save_steps

    path = root / "tiny-fp-ddim.json"
    settings = {"solver": "ddim", "steps": 3, "n_mc": 32}
    path.write_text("{")
    assert finished_file(path, "tiny", "fp", settings, fresh=False) is None
    good = {"member": "tiny", "fingerprint": "fp", "solver": "ddim", "settings": settings,
            "levels": [{"sigmas": [80.0, 1.0, 0.01]}]}
    save_steps(path, good)
    assert finished_file(path, "tiny", "fp", settings, fresh=False)["levels"] == good["levels"]
    assert finished_file(path, "tiny", "fp", settings, fresh=True) is None
    assert finished_file(path, "tiny", "fp", {**settings, "n_mc": 64}, fresh=False) is None
