"""Running schedules on a zoo: single-member schedules are the plain sampler bit for bit, per-sample seeds,
and `python sample.py` end to end with its failure paths."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, SMALL, TINY, write_member
from oms_lightning.diffusion import solvers
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.seeding import per_sample_noise
from oms_lightning.errors import UserError
from oms_lightning.sampling import generate, solve
from oms_lightning.samplers import single_member_schedule
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import load_schedule, save_schedule
from oms_lightning.schedule.slots import from_slots, to_slots
from oms_lightning.zoo import Zoo


@pytest.fixture
def zoo(tmp_path):
    write_member(tmp_path, "a", TINY, seed=0)
    write_member(tmp_path, "b", SMALL, seed=1)
    return Zoo.load(tmp_path, "digits", ["a", "b"])


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpm_solver", 2), ("dpm_solver", 3), ("dpm_solver++", 1),
                                          ("dpm_solver++3m", 1), ("heun", None)])
def test_single_member_schedule_is_the_plain_sampler_bit_for_bit(zoo, solver, order):
    s = single_member_schedule("b", solver, 4, zoo.noise_schedule, order=order)
    x = per_sample_noise(zoo.image_shape, range(5), seed=3)
    ts = torch.tensor(s.times, dtype=torch.float64)
    d = zoo.denoiser("b")
    plain = {"ddim": lambda: solvers.ddim(d, x, ts, zoo.noise_schedule),
             "dpm_solver": lambda: solvers.dpm_solver(d, x, ts, [order] * 4, zoo.noise_schedule),
             "dpm_solver++": lambda: solvers.dpm_solver_pp(d, x, ts, zoo.noise_schedule, order=2),
             "dpm_solver++3m": lambda: solvers.dpm_solver_pp(d, x, ts, zoo.noise_schedule, order=3),
             "heun": lambda: solvers.heun(d, x, ts, zoo.noise_schedule)}[solver]()
    assert torch.equal(generate(zoo, s, 5, seed=3), plain.clamp(-1, 1))


def test_mixed_schedule_uses_each_member_where_asked(zoo):
    times = single_member_schedule("a", "dpm_solver", 3, zoo.noise_schedule, order=2).times
    mixed = ModelSchedule.from_times_and_members(times, [["a", "b"], ["b"], ["a", "a", "b"]])
    only_a = ModelSchedule.from_times_and_members(times, [["a", "a"], ["a"], ["a", "a", "a"]])
    assert not torch.equal(generate(zoo, mixed, 2), generate(zoo, only_a, 2))
    slots = to_slots(mixed, zoo.names)
    assert torch.equal(generate(zoo, from_slots(slots, zoo.names, times), 2), generate(zoo, mixed, 2))


def test_sample_i_does_not_depend_on_batch_size_or_offset(zoo):
    s = single_member_schedule("a", "dpm_solver++", 3, zoo.noise_schedule)
    whole = generate(zoo, s, 7, seed=1, batch_size=7)
    torch.testing.assert_close(generate(zoo, s, 7, seed=1, batch_size=3), whole, atol=1e-4, rtol=0)  # float32 reassociation only
    torch.testing.assert_close(generate(zoo, s, 3, seed=1, first_index=4), whole[4:], atol=1e-4, rtol=0)  # float32 reassociation only
    assert not torch.allclose(generate(zoo, s, 7, seed=2), whole)


def test_unknown_member_in_schedule_is_refused(zoo):
    s = single_member_schedule("zzz", "ddim", 2, zoo.noise_schedule)
    with pytest.raises(UserError, match="zzz"):
        generate(zoo, s, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"solver": "euler"}, "unknown solver"), ({"spacing": "cubic"}, "unknown spacing"), ({"steps": 0}, "steps"),
    ({"solver": "dpm_solver_pp"}, r"did you mean 'dpm_solver\+\+'"),
    ({"solver": "dpm_solver", "order": 4}, "dpm_solver allows 1–3 NFEs per step")])
def test_bad_sampler_settings(zoo, kwargs, message):
    args = {"member": "a", "solver": "ddim", "steps": 3, "noise": zoo.noise_schedule, **kwargs}
    with pytest.raises(UserError, match=message):
        single_member_schedule(**args)


@pytest.mark.parametrize("name", sorted(solvers.SOLVER_REGISTRY))
def test_single_member_schedule_takes_nfes_per_step_from_the_registry(zoo, name):
    spec = solvers.get_solver(name)
    plain = single_member_schedule("a", name, 3, zoo.noise_schedule)
    assert plain.solver == name and plain.orders == [spec.default_nfe_per_step] * 3
    # only a variable-order solver takes an `order`; the others refuse one they cannot make (issue 11)
    if spec.variable_order:
        assert single_member_schedule("a", name, 3, zoo.noise_schedule, order=3).orders == [3] * 3
    else:
        with pytest.raises(solvers.SolverError, match=re.escape(f"{name} takes")):
            single_member_schedule("a", name, 3, zoo.noise_schedule, order=spec.default_nfe_per_step + 1)


def test_solve_is_the_registry_run(zoo):
    """solve() hands the schedule's times and orders to the registry entry, NFE j to denoisers[j]."""
    times = single_member_schedule("a", "dpm_solver", 3, zoo.noise_schedule, order=2).times
    s = ModelSchedule.from_times_and_members(times, [["a", "b"], ["b"], ["a", "a", "b"]])
    ds = zoo.denoisers_for(s)
    x = per_sample_noise(zoo.image_shape, range(2), seed=0)
    with torch.inference_mode():
        want = solvers.get_solver("dpm_solver").run(ds, x, times, zoo.noise_schedule, [2, 1, 3])
        assert torch.equal(solve(s, ds, x, zoo.noise_schedule), want)


# ---------------------------------------------------------------------- sample.py
def run_sample(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "sample.py", f"paths.checkpoints={tmp_path}",
                           f"paths.out_dir={tmp_path / 'out'}", "batch_size=8", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_output_of_a_run_goes_to_hydras_run_folder(tmp_path):
    """One convention for every job (issue 24): `hydra.run.dir=...` moves all of a run's files, Hydra's own included."""
    write_member(tmp_path, "tiny", TINY)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "sample.py", f"paths.checkpoints={tmp_path}",
                        f"hydra.run.dir={tmp_path / 'run'}", "batch_size=8", "model=tiny", "steps=2", "n=4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"summary.json", "grid.png", "images.npz", ".hydra"} <= {p.name for p in (tmp_path / "run").iterdir()}
    for job, key in (("optimize_steps", "run_dir"), ("fit_coefficients", "run_dir"), ("cluster_stages", "run_dir"),
                     ("search", "run_dir"), ("sample", "out_dir")):
        cfg = OmegaConf.load(ROOT / "configs" / f"{job}.yaml")
        assert OmegaConf.to_container(cfg.paths)[key] == "${hydra:runtime.output_dir}", job


def test_sample_py_model_and_schedule_json(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    write_member(tmp_path, "small", SMALL, seed=1)
    r = run_sample(tmp_path, "model=small", "steps=3", "solver=dpm_solver++", "n=10")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    images = np.load(out / "images.npz")["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert (out / "grid.png").is_file() and "cost" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe"] == 3 and summary["n"] == 10 and summary["cost_seconds_per_batch"] > 0

    mixed = ModelSchedule.from_times_and_members(load_schedule(out / "schedule.json").times,
                                                 [["tiny"], ["small", "tiny"], ["small"]])
    save_schedule(mixed, tmp_path / "mixed.json")
    r = run_sample(tmp_path, f"schedule={tmp_path / 'mixed.json'}", "n=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["nfe"] == 4

    r = run_sample(tmp_path, f"schedule={tmp_path / 'mixed.json'}", "fid=40")  # every comparison metric + floor
    assert r.returncode == 0, r.stderr[-3000:]
    fid = json.loads((out / "summary.json").read_text())["fid"]
    assert fid["value"] == fid["fid"] > 0 and fid["n"] == 40 and {"kid_heldout", "pixel_fd", "copy_rate"} <= set(fid)
    assert fid["noise_floor"]["n_used"] == 40 and "noise floor" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["model=tiny", "schedule=x.json"], "exactly one of"),
    (["model=small"], "python train.py model=small data=digits"),  # preset exists, member not trained
    (["schedule=missing.json"], "missing.json"),
    (["model=tiny", "device=cuda"], "CUDA"),
    (["model=tiny", "solver=dpm_solver++", "order=7"], "dpm_solver++ takes 1 NFE(s) per step and no order"),
    (["model=tiny", "solver=dpm_solver", "order=7"], "dpm_solver allows 1–3"),
])
def test_sample_py_bad_input_is_one_clear_line(tmp_path, args, message):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_member(tmp_path, "tiny", TINY)
    r = run_sample(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.lstrip().startswith("error:") and message in r.stderr
    assert not (tmp_path / "out" / "images.npz").exists()


def test_a_schedule_naming_a_member_without_preset_advises_a_command_that_works(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    times = single_member_schedule("tiny", "ddim", 2, VPSchedule()).times
    save_schedule(ModelSchedule.single("custom", times, solver="ddim"), tmp_path / "s.json")
    r = run_sample(tmp_path, f"schedule={tmp_path / 's.json'}")
    assert r.returncode == 2 and "no preset 'custom' in configs/model/" in r.stderr
    assert "python train.py model=custom" not in r.stderr  # that command would fail in turn


def test_sample_py_unknown_preset_lists_the_known_ones(tmp_path):
    r = run_sample(tmp_path, "model=huge")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unknown model 'huge'; choose one of: large, medium, multistage, small, tiny (configs/model/)"]


# ----------------------------------------------------------------------------------------------- IIA coefficients
def test_iia_coefficients_ride_in_the_schedule_and_are_refused_for_other_weights(zoo, tmp_path):
    plain = ModelSchedule.from_times_and_members([1.0, 0.5, 0.2, 1e-3], ["a", "b", "a"], solver="dpm_solver++")
    zero = plain.with_correction("eps", [[0.0], [0.0], [0.0]], zoo.fingerprint(["a", "b"]))
    assert torch.equal(generate(zoo, zero, 4, seed=1), generate(zoo, plain, 4, seed=1))   # bit for bit
    fitted = plain.with_correction("eps", [[0.1], [-0.05], [0.02]], zoo.fingerprint(["a", "b"]))
    assert not torch.equal(generate(zoo, fitted, 4, seed=1), generate(zoo, plain, 4, seed=1))
    write_member(tmp_path / "other", "a", TINY, seed=5)   # a retrained member: other weights
    write_member(tmp_path / "other", "b", SMALL, seed=1)
    retrained = Zoo.load(tmp_path / "other", "digits", ["a", "b"])
    with pytest.raises(UserError, match="fitted on other weights.*fit_coefficients.py"):
        generate(retrained, fitted, 2)
