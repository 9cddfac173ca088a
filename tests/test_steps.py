"""AYS steps files: round trip, refusal of other weights / solvers / corrupt files, spacing=ays times."""
import pytest
import torch

from oms_lightning.diffusion.ays import edm_sigmas, sigma_of_t
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.diffusion.ays_steps import ays_levels, find_steps, save_steps, spacing_times, steps_path

NOISE = VPSchedule()


def write(tmp_path, fingerprint="abc", solver="ddim"):
    lo, hi = sigma_of_t(NOISE, 1e-3).item(), sigma_of_t(NOISE, 1.0).item()
    levels = [{"sigmas": edm_sigmas(lo, hi, 10).tolist()}, {"sigmas": edm_sigmas(lo, hi, 20).tolist()}]
    return save_steps(steps_path(tmp_path, "digits", "small", fingerprint, solver),
                      {"member": "small", "fingerprint": fingerprint, "solver": solver, "levels": levels})


def test_steps_file_round_trips_into_times(tmp_path):
    write(tmp_path)
    d = ays_levels(find_steps(tmp_path, "digits", "small", "abc", "ddim"))
    ten = spacing_times("ays", 10, NOISE, ays=d)
    assert len(ten) == 11 and ten[0] == pytest.approx(1.0) and ten[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(ten, ten[1:]))
    assert len(spacing_times("ays", 7, NOISE, ays=d)) == 8  # interpolated from the finest level


def test_foreign_missing_or_corrupt_steps_files_are_refused(tmp_path):
    write(tmp_path, fingerprint="old")
    with pytest.raises(UserError, match="belong to other weights.*optimize_steps.py model=small"):
        find_steps(tmp_path, "digits", "small", "new", "ddim")
    path = write(tmp_path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        find_steps(tmp_path, "digits", "small", "abc", "ddim")
    with pytest.raises(UserError, match="unknown spacing"):
        spacing_times("nope", 4, NOISE)
    with pytest.raises(UserError, match="needs an optimised steps file"):
        spacing_times("ays", 4, NOISE)
