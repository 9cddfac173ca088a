"""cluster_stages.py: stage boundaries written end to end on tiny settings, the stages file's loader and its refusals,
and the thin entry's exit codes."""
import json

import pytest
import torch

from conftest import run_cli
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.diffusion.stages_file import STAGES_FORMAT, load_stages, save_stages, stages_path

TINY_ARGS = ["n_images=16", "n_times=21", "device=cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread avoids OpenMP spin-waits. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def overrides(root, *extra):
    return [f"paths.checkpoints={root}", f"paths.run_dir={root}/run", *TINY_ARGS, *extra]


def run_job(compose, root, *extra):
    from oms_lightning.jobs.cluster_stages import cluster_stages_job

    return cluster_stages_job(compose("cluster_stages", overrides(root, *extra)))


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("stages", [3, 2])
def test_cluster_stages_writes_a_stages_file_that_loads_and_a_plot(compose, tmp_path, stages):
    result = run_job(compose, tmp_path, f"stages={stages}")
    path = stages_path(tmp_path, "digits")
    d = json.loads(path.read_text())
    assert d["format"] == STAGES_FORMAT and d["data"] == "digits" and d["stages"] == stages
    b = d["boundaries"]
    assert len(b) == stages - 1 and all(0 < x < 1 for x in b) and b == sorted(b)
    assert d["noise"] == VPSchedule().to_dict()
    assert set(d["alternatives"]) == {"time_uniform", "logsnr_uniform"}
    assert all(len(v) == stages - 1 for v in d["alternatives"].values())
    assert len(d["curves"]["times"]) == len(d["curves"]["to_clean"]) == len(d["curves"]["to_noisy"]) == 21
    assert d["settings"]["n_images"] == 16 and d["settings"]["rule"] == ("alpha" if stages == 3 else "crossing")
    assert (tmp_path / "run" / "stages.png").stat().st_size > 0 and path.with_suffix(".png").is_file()
    assert result["boundaries"] == b
    assert load_stages(path, stages=stages, noise=VPSchedule()) == tuple(b)
    assert load_stages(path, noise={**VPSchedule().to_dict(), "beta_max": 20}) == tuple(b)   # 20 is 20.0


# ----------------------------------------------------------------------------------------------- the loader
def write_stages(root, **changes):
    payload = {"data": "digits", "stages": 3, "boundaries": [0.2, 0.6], "noise": VPSchedule().to_dict(),
               "settings": {}, "alternatives": {}, "curves": {}}
    return save_stages(stages_path(root, "digits"), {**payload, **changes})


def test_load_stages_round_trips_and_ignores_unused_schedule_keys(tmp_path):
    path = write_stages(tmp_path)
    assert load_stages(path) == (0.2, 0.6)
    assert load_stages(path, stages=3, noise=VPSchedule().to_dict()) == (0.2, 0.6)
    cosine = VPSchedule(kind="cosine").to_dict()
    path = write_stages(tmp_path, noise=cosine)
    assert load_stages(path, noise={**cosine, "beta_max": 5.0}) == (0.2, 0.6)   # a cosine schedule uses no beta


@pytest.mark.parametrize("changes, expected", [
    ({"boundaries": [0.6, 0.2]}, "strictly increasing"),
    ({"boundaries": [0.2, 1.0]}, "strictly inside"),
    ({"boundaries": [0.2, 0.6, 0.8]}, "3 stages need 2 interior boundaries"),
    ({"boundaries": "0.2, 0.6"}, "no list of stage boundaries"),
    ({"format": "oms-lightning/steps-v1"}, "not an oms-lightning stages file"),
])
def test_load_stages_refuses_a_bad_file_naming_the_command(tmp_path, changes, expected):
    path = write_stages(tmp_path, **changes)
    with pytest.raises(UserError, match=expected) as e:
        load_stages(path)
    assert f"python cluster_stages.py data=digits paths.checkpoints={tmp_path}" in str(e.value)


def test_load_stages_refuses_another_stage_count(tmp_path):
    path = write_stages(tmp_path)
    with pytest.raises(UserError, match=r"holds 3 stages .* but 2 were asked for") as e:
        load_stages(path, stages=2)
    assert "python cluster_stages.py data=digits stages=2" in str(e.value)


def test_load_stages_refuses_another_noise_schedule_naming_the_settings(tmp_path):
    path = write_stages(tmp_path)
    with pytest.raises(UserError, match="clustered under noise schedule") as e:
        load_stages(path, stages=3, noise=VPSchedule(beta_max=10.0))
    assert "diffusion.beta_max=10.0" in str(e.value) and "stages=3" in str(e.value)


def test_load_stages_refuses_corrupt_and_missing_files(tmp_path):
    path = stages_path(tmp_path, "digits")
    with pytest.raises(UserError, match=r"no stage boundaries at .*stages\.json; run `python cluster_stages.py "
                                        r"data=digits stages=3 paths.checkpoints=.*` first"):
        load_stages(path, stages=3)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "oms-lightning/stages-v1", "bound')
    with pytest.raises(UserError, match="unreadable or not JSON"):
        load_stages(path)


def test_the_missing_file_message_leaves_out_default_checkpoints():
    from pathlib import Path

    with pytest.raises(UserError) as e:
        load_stages(Path("checkpoints") / "no_such_data" / "stages.json")
    assert "run `python cluster_stages.py data=no_such_data` first" in str(e.value)


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("setting, expected", [
    ("stages=4", "stages must be 2 or 3"),
    ("alpha=1.0", r"alpha .* must lie in \(0, 1\)"),
    ("alpha=0", r"alpha .* must lie in \(0, 1\)"),
    ("n_images=1", "n_images must be an integer >= 2"),
    ("n_times=2", "n_times must be an integer >= 3"),
    ("eta=-0.1", "eta .* must be a positive number"),
    ("data=toy2d", "has no images"),
    ("diffusion.beta_max=0.01", "invalid diffusion settings"),
])
def test_bad_settings_are_refused_before_any_work(compose, tmp_path, setting, expected):
    with pytest.raises(UserError, match=expected):
        run_job(compose, tmp_path, setting)
    assert not stages_path(tmp_path, "digits").exists()


# ----------------------------------------------------------------------------------------------- the entry
@pytest.mark.slow
def test_the_command_runs_and_refuses_bad_stages_in_one_line(tmp_path):
    ok = run_cli("cluster_stages.py", *overrides(tmp_path))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "boundaries:" in ok.stdout and stages_path(tmp_path, "digits").is_file()
    bad = run_cli("cluster_stages.py", *overrides(tmp_path, "stages=5"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: stages must be 2 or 3 (the paper's clustering rule defines "
                                               "boundaries for these), got 5"]
