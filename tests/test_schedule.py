"""ModelSchedule, the data type: arithmetic, construction, validation messages, IIA coefficients.

The JSON file form is tested in test_schedule_file.py, the OMS-DPM slot encoding in test_schedule_slots.py.
"""
import re

import pytest

from conftest import SCHEDULE_TIMES as TIMES
from conftest import SCHEDULE_ZOO as ZOO
from conftest import corrected_schedule
from oms_lightning.diffusion.solvers import SOLVER_REGISTRY
from oms_lightning.errors import UserError
from oms_lightning.schedule import ModelSchedule, ScheduleError, Step
from oms_lightning.schedule.file import schedule_from_dict, schedule_to_dict

LAT = {"large": 10.0, "small": 3.0, "tiny": 1.5}


# ---------------------------------------------------------------------- views and arithmetic
def test_views_and_cost(sched):
    assert sched.nfe == 6
    assert sched.orders == [2, 1, 3]
    assert sched.times == TIMES
    assert sched.members_per_nfe == ["small", "small", "large", "tiny", "large", "large"]
    assert sched.member_names == ["large", "small", "tiny"]
    assert sched.cost(LAT) == pytest.approx(3 + 3 + 10 + 1.5 + 10 + 10)
    assert [s.order for s in sched.steps] == [2, 1, 3]
    assert len(sched) == 3
    assert str(sched) == sched.compact() == \
        "dpm_solver: [small,small] [large] [tiny,large,large] | t 1.0→0.001, NFE 6"


def test_cost_unknown_member(sched):
    with pytest.raises(ScheduleError, match=r"no latency for member 'tiny' \(step 2\); known members: large, small"):
        sched.cost({"large": 1.0, "small": 2.0})


def test_single_and_orders():
    s = ModelSchedule.single("small", [1.0, 0.6, 0.3, 0.1], orders=[1, 2, 3])
    assert s.orders == [1, 2, 3] and s.nfe == 6 and s.member_names == ["small"]
    assert s.cost(LAT) == pytest.approx(18.0)
    assert ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver="ddim").orders == [1, 1]
    assert ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver="dpm_solver++").orders == [1, 1]
    assert ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver="heun").orders == [2, 2]
    assert ModelSchedule.single("tiny", [1.0, 0.5, 0.1], orders=3).orders == [3, 3]
    assert ModelSchedule.single("tiny", [1.0, 0.5, 0.1]).orders == [1, 1]
    with pytest.raises(ScheduleError, match="got 1 orders for 2 steps"):
        ModelSchedule.single("tiny", [1.0, 0.5, 0.1], orders=[2])
    with pytest.raises(ScheduleError, match="step 0 has 2 members; ddim needs exactly 1 NFE per step"):
        ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver="ddim", orders=2)
    with pytest.raises(ScheduleError, match="unknown solver 'euler'"):
        ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver="euler")


@pytest.mark.parametrize("name", sorted(SOLVER_REGISTRY))
def test_single_takes_its_default_from_the_registry(name):
    spec = SOLVER_REGISTRY[name]
    s = ModelSchedule.single("tiny", [1.0, 0.5, 0.1], solver=name)
    assert s.orders == [spec.default_nfe_per_step] * 2
    lo, hi = spec.nfe_per_step                       # validation follows nfe_per_step at both ends
    for n in (lo - 1, hi + 1):
        with pytest.raises(ScheduleError, match=f"step 0 has {n} member.*{re.escape(spec.rule)}"):
            ModelSchedule.from_times_and_members([1.0, 0.5], [["tiny"] * n], solver=name)


def test_retired_solver_spelling_is_refused():
    with pytest.raises(ScheduleError, match=r"unknown solver 'dpm_solver_pp'.*did you mean 'dpm_solver\+\+'"):
        ModelSchedule.single("tiny", [1.0, 0.5], solver="dpm_solver_pp")
    d = schedule_to_dict(ModelSchedule.single("tiny", [1.0, 0.5], solver="dpm_solver++"))
    with pytest.raises(ScheduleError, match="unknown solver 'dpm_solver_pp'"):
        schedule_from_dict({**d, "solver": "dpm_solver_pp"})


def test_compact_collapses_repeats():
    s = ModelSchedule.single("large", [1.0, 0.8, 0.6, 0.4, 0.2], orders=2)
    assert s.compact() == "dpm_solver: [large,large]×4 | t 1.0→0.2, NFE 8"


def test_equality_hash_ignore_meta(sched):
    other = sched.with_meta(fid=99.0, data="cifar10")
    assert other == sched and hash(other) == hash(sched)
    assert other.meta == {"fid": 99.0, "data": "cifar10"} and sched.meta == {"fid": 3.5}
    assert ModelSchedule.create(sched.steps, "dpm_solver") == sched
    assert ModelSchedule.create([(1.0, 0.5, ["a"])], "ddim").steps == (Step(1.0, 0.5, ("a",)),)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("steps, solver, match", [
    ([], "dpm_solver", "empty schedule"),
    ([(1.0, 0.5, ["a"])], "euler", r"unknown solver 'euler'; choose one of: ddim, ddim_eta1, dpm_solver, dpm_solver\+\+, dpm_solver\+\+3m, heun"),
    ([(1.0, 0.8, ["a"]), (0.8, 0.6, ["a"]), (0.6, 0.4, ["a"]), (0.4, 0.2, ["a"] * 4)], "dpm_solver",
     "step 3 has 4 members; dpm_solver allows 1–3 NFEs per step"),
    ([(1.0, 0.5, [])], "dpm_solver", "step 0 has 0 members; dpm_solver allows 1–3 NFEs per step"),
    ([(1.0, 0.5, ["a"]), (0.5, 0.1, ["a", "b"])], "dpm_solver++",
     r"step 1 has 2 members; dpm_solver\+\+ needs exactly 1 NFE per step"),
    ([(1.0, 0.5, ["a", "a"])], "ddim", "step 0 has 2 members; ddim needs exactly 1 NFE per step"),
    ([(1.0, 0.5, ["a"])], "heun", "step 0 has 1 member; heun needs exactly 2 NFEs per step"),
    ([(1.0, 0.5, ["a"]), (0.5, 0.6, ["a"])], "ddim",
     r"step 1: t_start 0.5 must be greater than t_end 0.6 \(steps run noisy → clean"),
    ([(1.0, 0.5, ["a"]), (0.5, 0.5, ["a"])], "ddim", "step 1: t_start 0.5 must be greater than t_end 0.5"),
    ([(1.0, 0.5, ["a"]), (0.4, 0.1, ["a"])], "ddim",
     "step 1 starts at t=0.4 but step 0 ends at t=0.5; steps must be contiguous"),
    ([(1.5, 0.5, ["a"])], "ddim", r"step 0: t_start 1.5 is outside \(0, 1\]"),
    ([(1.0, 0.5, ["a"]), (0.5, 0.0, ["a"])], "ddim", r"step 1: t_end 0.0 is outside \(0, 1\]"),
    ([(1.0, 0.5, ["a"]), (0.5, -0.1, ["a"])], "ddim", r"step 1: t_end -0.1 is outside \(0, 1\]"),
    ([(1.0, float("nan"), ["a"])], "ddim", "step 0: t_end is nan; times must be finite"),
    ([(float("inf"), 0.5, ["a"])], "ddim", "step 0: t_start is inf; times must be finite"),
    ([(1.0, 0.5, ["a", ""])], "dpm_solver", "step 0: NFE 1: member names must be non-empty strings"),
    ([(1.0, 0.5, ["a", 3])], "dpm_solver", "step 0: NFE 1: member names must be non-empty strings, got 3"),
    ([("1.0", 0.5, ["a"])], "ddim", "step 0: t_start must be a number, got '1.0'"),
    ([(True, 0.5, ["a"])], "ddim", "step 0: t_start must be a number, got True"),
])
def test_structure_errors(steps, solver, match):
    with pytest.raises(ScheduleError, match=match):
        ModelSchedule.create(steps, solver)


def test_contiguity_tolerance():
    s = ModelSchedule.create([(1.0, 0.5, ["a"]), (0.5 + 1e-13, 0.1, ["a"])], "ddim")
    assert s.nfe == 2


def test_validate_members_and_t_min(sched):
    assert sched.validate(ZOO) is sched
    with pytest.raises(ScheduleError, match=r"step 2 NFE 0 uses unknown member 'tiny'; known members: huge, large, small"):
        sched.validate(["small", "large", "huge"])
    with pytest.raises(ScheduleError, match=r"step 2: t_end 0.001 is below t_min 0.01"):
        sched.validate(ZOO, t_min=0.01)
    sched.validate(t_min=1e-3)   # inclusive lower bound


def test_schedule_error_is_user_error():
    assert issubclass(ScheduleError, UserError) and issubclass(ScheduleError, ValueError)


def test_times_members_length_mismatch():
    with pytest.raises(ScheduleError, match="got 3 times for 3 steps; need K\\+1 = 4 times"):
        ModelSchedule.from_times_and_members([1.0, 0.5, 0.1], ["a", "a", "a"])


# ----------------------------------------------------------------------------------------------- IIA coefficients
@pytest.mark.parametrize("coefficients, match", [
    (((0.1,), (0.0,)), "one row per step|3 steps"),
    (((0.1,), (float("nan"),), (0.0,)), "step 1"),
    (((0.1, 0.2), (0.0,), (0.0,)), "step 0"),
])
def test_bad_coefficients_are_refused_naming_the_step(coefficients, match):
    with pytest.raises(ScheduleError, match=match):
        corrected_schedule(coefficients)


def test_the_data_type_has_no_file_or_slot_methods(sched):
    """JSON lives in schedule_file, the slot encoding in schedule_slots: nothing can reach them through the class."""
    for name in ("to_dict", "from_dict", "to_json", "from_json", "save", "load", "to_slots", "from_slots"):
        assert not hasattr(ModelSchedule, name) and not hasattr(sched, name), name
    plain, iia = corrected_schedule()
    assert not hasattr(iia.correction, "to_dict") and not hasattr(iia.correction, "from_dict")
    with pytest.raises(ScheduleError, match="correction must be a Correction, got dict"):   # its dict form is I/O
        ModelSchedule(plain.steps, plain.solver, correction=schedule_to_dict(iia)["correction"])
