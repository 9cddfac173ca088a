"""ModelSchedule: arithmetic, validation messages, JSON files, OMS-DPM slot encoding."""
import json
import math
import os
import random
import re

import pytest

from oms_lightning.diffusion.solvers import SOLVER_REGISTRY
from oms_lightning.errors import UserError
from oms_lightning.schedule import FORMAT, ModelSchedule, ScheduleError, Step

ZOO = ["large", "small", "tiny"]          # sorted, as a zoo lists its members
LAT = {"large": 10.0, "small": 3.0, "tiny": 1.5}
TIMES = [1.0, 0.5, 0.2, 0.001]


@pytest.fixture
def sched():
    return ModelSchedule.from_times_and_members(
        TIMES, [["small", "small"], ["large"], ["tiny", "large", "large"]], meta={"fid": 3.5})


def random_schedule(rng: random.Random) -> ModelSchedule:
    k = rng.randint(1, 8)
    ts = sorted((rng.uniform(1e-3, 1.0) for _ in range(k - 1)), reverse=True)
    times = [1.0] + ts + [1e-3]
    solver = rng.choice(["dpm_solver", "dpm_solver++", "ddim", "heun"])
    n = {"dpm_solver": None, "dpm_solver++": 1, "ddim": 1, "heun": 2}[solver]
    members = [[rng.choice(ZOO) for _ in range(n or rng.randint(1, 3))] for _ in range(k)]
    return ModelSchedule.from_times_and_members(times, members, solver)


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
    d = ModelSchedule.single("tiny", [1.0, 0.5], solver="dpm_solver++").to_dict()
    with pytest.raises(ScheduleError, match="unknown solver 'dpm_solver_pp'"):
        ModelSchedule.from_dict({**d, "solver": "dpm_solver_pp"})


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


# ---------------------------------------------------------------------- JSON
def test_json_round_trip(sched, tmp_path):
    d = sched.to_dict()
    assert d["format"] == FORMAT and d["solver"] == "dpm_solver"
    assert d["steps"][2] == {"t_start": 0.2, "t_end": 0.001, "members": ["tiny", "large", "large"]}
    assert d["meta"] == {"fid": 3.5}
    back = ModelSchedule.from_dict(json.loads(json.dumps(d)))
    assert back == sched and back.meta == sched.meta
    assert ModelSchedule.from_json(sched.to_json()) == sched
    path = sched.save(tmp_path / "sub" / "schedule.json")
    loaded = ModelSchedule.load(path)
    assert loaded == sched and loaded.meta == {"fid": 3.5}
    assert [p.name for p in path.parent.iterdir()] == ["schedule.json"]   # no temp files left behind


def test_json_round_trip_random(tmp_path):
    rng = random.Random(0)
    for i in range(30):
        s = random_schedule(rng).with_meta(cost=rng.random(), zoo=ZOO)
        loaded = ModelSchedule.load(s.save(tmp_path / f"{i}.json"))
        assert loaded == s and loaded.meta == s.meta and loaded.times == s.times


def write(tmp_path, content):
    p = tmp_path / "s.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def good_dict():
    return {"format": FORMAT, "solver": "ddim", "steps": [{"t_start": 1, "t_end": 0.5, "members": ["a"]}], "meta": {}}


def test_load_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(ScheduleError, match=f"schedule file not found: {p}"):
        ModelSchedule.load(p)


def test_load_directory(tmp_path):
    with pytest.raises(ScheduleError, match="is a directory"):
        ModelSchedule.load(tmp_path)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: "{not json", r"invalid JSON \(.* at line 1 column 2\)"),
    (lambda d: '{"format": "oms-lightning/model-sch', r"invalid JSON"),
    (lambda d: [1, 2], "a model schedule must be a JSON object, got list"),
    (lambda d: {k: v for k, v in d.items() if k != "format"}, "not an oms-lightning model schedule \\(no 'format' key"),
    (lambda d: {**d, "format": "k-diffusion/sigmas"}, "unsupported format 'k-diffusion/sigmas'; expected 'oms-lightning/model-schedule-v1'"),
    (lambda d: {k: v for k, v in d.items() if k != "steps"}, "missing key 'steps'"),
    (lambda d: {k: v for k, v in d.items() if k != "solver"}, "missing key 'solver'"),
    (lambda d: {**d, "extra": 1}, r"unexpected key\(s\) \['extra'\]"),
    (lambda d: {**d, "solver": 3}, "'solver' must be a string, got 3"),
    (lambda d: {**d, "solver": "euler"}, "unknown solver 'euler'"),
    (lambda d: {**d, "steps": {"a": 1}}, "'steps' must be a list, got dict"),
    (lambda d: {**d, "steps": []}, "empty schedule"),
    (lambda d: {**d, "meta": [1]}, "'meta' must be an object, got list"),
    (lambda d: {**d, "steps": [5]}, r"steps\[0\] must be an object"),
    (lambda d: {**d, "steps": [{"t_start": 1, "members": ["a"]}]}, r"steps\[0\] is missing key\(s\) \['t_end'\]"),
    (lambda d: {**d, "steps": [{"t_start": 1, "t_end": 0.5, "members": ["a"], "order": 1}]},
     r"steps\[0\] has unexpected key\(s\) \['order'\]"),
    (lambda d: {**d, "steps": [{"t_start": "1", "t_end": 0.5, "members": ["a"]}]}, r"steps\[0\].t_start must be a number, got '1'"),
    (lambda d: {**d, "steps": [{"t_start": 1, "t_end": None, "members": ["a"]}]}, r"steps\[0\].t_end must be a number, got None"),
    (lambda d: {**d, "steps": [{"t_start": 1, "t_end": 0.5, "members": "a"}]}, r"steps\[0\].members must be a list of member names"),
    (lambda d: {**d, "steps": [{"t_start": 1, "t_end": 0.5, "members": [1]}]}, r"steps\[0\].members must be a list of member names"),
    (lambda d: {**d, "steps": [{"t_start": 0.5, "t_end": 1, "members": ["a"]}]}, "step 0: t_start 0.5 must be greater than t_end 1.0"),
])
def test_load_corrupt(tmp_path, mutate, match):
    path = write(tmp_path, mutate(good_dict()))
    with pytest.raises(ScheduleError, match=match) as e:
        ModelSchedule.load(path)
    assert str(e.value).startswith(f"{path}: ")


def test_load_good_dict_accepts_int_times(tmp_path):
    s = ModelSchedule.load(write(tmp_path, good_dict()))
    assert s.times == [1.0, 0.5] and isinstance(s.times[0], float) and s.solver == "ddim"


def test_from_dict_meta_optional():
    d = good_dict()
    del d["meta"]
    assert ModelSchedule.from_dict(d).meta == {}


@pytest.mark.parametrize("bad_meta, match", [
    ({"obj": object()}, "not JSON-serialisable"),
    ({"fid": float("nan")}, "not JSON-serialisable"),
])
def test_atomic_save_on_serialisation_failure(sched, tmp_path, bad_meta, match):
    target = tmp_path / "schedule.json"
    with pytest.raises(ScheduleError, match=match):
        sched.with_meta(**bad_meta).save(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    sched.save(target)
    before = target.read_text()
    with pytest.raises(ScheduleError, match=match):
        sched.with_meta(**bad_meta).save(target)
    assert target.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["schedule.json"]


# ---------------------------------------------------------------------- OMS-DPM slots
def test_to_slots_hand(sched):
    assert sched.to_slots(ZOO) == [[2, 2, 0], [1, 0, 0], [3, 1, 1]]
    with pytest.raises(ScheduleError, match=r"step 0 uses member 'small', which is not in members \['large', 'tiny'\]"):
        sched.to_slots(["large", "tiny"])


@pytest.mark.parametrize("members", [["small", "large", "tiny"], ["large", "large", "tiny"], [], ["a", ""]])
def test_slot_members_must_be_sorted_unique(sched, members):
    with pytest.raises(ScheduleError, match="members must be"):
        sched.to_slots(members)
    with pytest.raises(ScheduleError, match="members must be"):
        ModelSchedule.from_slots([[1, 0, 0]], members, [1.0, 0.5])


def test_slots_round_trip_random():
    rng = random.Random(1234)
    for _ in range(200):
        s = random_schedule(rng)
        slots = s.to_slots(ZOO)
        assert len(slots) == len(s.steps) and all(len(r) == 3 for r in slots)
        assert sum(v != 0 for r in slots for v in r) == s.nfe
        assert ModelSchedule.from_slots(slots, ZOO, s.times, s.solver) == s


def test_from_slots_nulls_hand():
    grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05]
    slots = [[0, 0, 0],        # null: merged into the next non-empty step
             [0, 2, 0],        # -> (small,) over 1.0 → 0.6
             [3, 0, 1],        # -> (tiny, large) over 0.6 → 0.4
             [0, 0, 0],        # null
             [1, 1, 1],        # -> (large, large, large) over 0.4 → 0.1
             [0, 0, 0]]        # trailing null: the last step is extended to 0.05
    s = ModelSchedule.from_slots(slots, ZOO, grid)
    assert s.times == [1.0, 0.6, 0.4, 0.05]
    assert [st.members for st in s.steps] == [("small",), ("tiny", "large"), ("large", "large", "large")]
    assert s.nfe == 6 and s.orders == [1, 2, 3]
    assert s.to_slots(ZOO) == [[2, 0, 0], [3, 1, 0], [1, 1, 1]]


def test_from_slots_random_nulls():
    rng = random.Random(7)
    for _ in range(200):
        k = rng.randint(1, 10)
        slots = [[rng.randint(1, 3) if rng.random() > 0.6 else 0 for _ in range(3)] for _ in range(k)]
        if not any(any(r) for r in slots):
            slots[rng.randrange(k)][rng.randrange(3)] = rng.randint(1, 3)
        grid = [1.0] + sorted((rng.uniform(1e-3, 1.0) for _ in range(k - 1)), reverse=True) + [1e-3]
        s = ModelSchedule.from_slots(slots, ZOO, grid)
        non_null = [r for r in slots if any(r)]
        assert s.members_per_nfe == [ZOO[v - 1] for r in slots for v in r if v]
        assert s.orders == [sum(v != 0 for v in r) for r in non_null]
        assert s.times[0] == grid[0] and s.times[-1] == grid[-1] and set(s.times) <= set(grid)
        # each non-empty step ends at its own grid point (except a trailing null run, which extends the last)
        ends = [grid[i + 1] for i, r in enumerate(slots) if any(r)]
        assert s.times[1:-1] == ends[:-1]
        # re-encoding drops null rows and packs each triplet's NFEs into the first slots
        packed = [[v for v in r if v] + [0] * (3 - sum(v != 0 for v in r)) for r in non_null]
        assert s.to_slots(ZOO) == packed
        assert ModelSchedule.from_slots(packed, ZOO, s.times) == s


@pytest.mark.parametrize("slots, times, solver, match", [
    ([[0, 0, 0], [0, 0, 0]], [1.0, 0.5, 0.1], "dpm_solver", "all 2 slot rows are null"),
    ([[1, 0, 0]], [1.0, 0.5, 0.1], "dpm_solver", r"got 3 times for 1 slot rows; need K\+1 = 2"),
    ([[1, 0]], [1.0, 0.5], "dpm_solver", "slots row 0 has 2 entries; each step is a triplet of 3 slots"),
    ([[1, 0, 4]], [1.0, 0.5], "dpm_solver", r"slots row 0 slot 2 is 4; valid values are 0 \(null\) .. 3"),
    ([[1, -1, 0]], [1.0, 0.5], "dpm_solver", "slots row 0 slot 1 is -1"),
    ([[1, 1.0, 0]], [1.0, 0.5], "dpm_solver", "slots row 0 slot 1 must be an int, got 1.0"),
    ([[1, 0, 0], [2, 0, 0]], [1.0, 0.5, 0.7], "dpm_solver", r"times must be strictly decreasing; times\[2\] = 0.7"),
    ([[1, 0, 0]], [1.0, 0.0], "dpm_solver", r"times\[1\] = 0.0 must be finite and in \(0, 1\]"),
    ([[1, 1, 0]], [1.0, 0.5], "ddim", "step 0 has 2 members; ddim needs exactly 1 NFE per step"),
])
def test_from_slots_errors(slots, times, solver, match):
    with pytest.raises(ScheduleError, match=match):
        ModelSchedule.from_slots(slots, ZOO, times, solver)


def test_from_slots_accepts_numpy():
    np = pytest.importorskip("numpy")
    slots = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 0]])
    s = ModelSchedule.from_slots(slots, ZOO, np.array([1.0, 0.5, 0.2, 0.01]))
    assert s.members_per_nfe == ["large", "small", "tiny"] and s.times == [1.0, 0.5, 0.01]
    assert all(isinstance(t, float) and not math.isnan(t) for t in s.times)


def test_files_written_atomically_get_the_usual_permissions(sched, tmp_path):
    """mkstemp creates 0600 files; a saved schedule (or summary, store header) must read like any other file."""
    mask = os.umask(0o022)
    try:
        sched.save(tmp_path / "schedule.json")
    finally:
        os.umask(mask)
    assert (tmp_path / "schedule.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------- v2: IIA coefficients
def corrected_schedule(coefficients=((0.1,), (0.0,), (-0.2,))):
    plain = ModelSchedule.from_times_and_members([1.0, 0.6, 0.3, 0.01], ["a", "b", "a"], solver="ddim")
    return plain, plain.with_correction("eps", coefficients, weights="w123")


def test_v2_round_trip_identity_and_v1_compatibility(tmp_path):
    from oms_lightning.schedule import FORMAT_V2, schedule_key

    plain, iia = corrected_schedule()
    assert iia != plain and schedule_key(iia) != schedule_key(plain) and iia.plain() == plain
    assert corrected_schedule()[1] == iia and hash(corrected_schedule()[1]) == hash(iia)
    assert schedule_key(corrected_schedule(((0.1,), (0.0,), (-0.3,)))[1]) != schedule_key(iia)
    path = iia.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["format"] == FORMAT_V2
    again = ModelSchedule.load(path)
    assert again == iia and again.correction.coefficients == ((0.1,), (0.0,), (-0.2,))
    assert json.loads(plain.to_json())["format"] == FORMAT            # a plain schedule stays v1
    assert ModelSchedule.load(plain.save(tmp_path / "p.json")) == plain
    assert "+ IIA eps" in iia.compact()


@pytest.mark.parametrize("coefficients, match", [
    (((0.1,), (0.0,)), "one row per step|3 steps"),
    (((0.1,), (float("nan"),), (0.0,)), "step 1"),
    (((0.1, 0.2), (0.0,), (0.0,)), "step 0"),
])
def test_bad_coefficients_are_refused_naming_the_step(coefficients, match):
    with pytest.raises(ScheduleError, match=match):
        corrected_schedule(coefficients)


def test_coefficients_for_other_times_members_or_feature_sets_are_refused(tmp_path):
    _, iia = corrected_schedule()
    d = iia.to_dict()
    d["steps"][1]["t_end"] = d["steps"][2]["t_start"] = 0.35          # edited times
    with pytest.raises(ScheduleError, match="fitted for other times, members or solver.*fit_coefficients.py"):
        ModelSchedule.from_dict(d)
    d = iia.to_dict()
    d["correction"]["feature_set"] = "edm"
    with pytest.raises(ScheduleError, match="no IIA feature set 'edm'"):
        ModelSchedule.from_dict(d)
    d = iia.to_dict()
    d["format"] = FORMAT
    with pytest.raises(ScheduleError, match="unexpected key"):          # v1 has no coefficients
        ModelSchedule.from_dict(d)
    with pytest.raises(ScheduleError, match="exactly the keys"):
        ModelSchedule.from_dict({**iia.to_dict(), "correction": {"feature_set": "eps"}})
