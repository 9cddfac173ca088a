"""A model schedule on disk (oms_lightning.schedule.file): JSON round trips, refused files, atomic writes, v2."""
import json
import os
import random

import pytest

from conftest import SCHEDULE_ZOO as ZOO
from conftest import corrected_schedule, random_schedule
from oms_lightning.schedule import ScheduleError, schedule_key
from oms_lightning.schedule.file import (FORMAT, FORMAT_V2, load_schedule, save_schedule, schedule_from_dict,
                                         schedule_from_json, schedule_to_dict, schedule_to_json)


def test_json_round_trip(sched, tmp_path):
    d = schedule_to_dict(sched)
    assert d["format"] == FORMAT and d["solver"] == "dpm_solver"
    assert d["steps"][2] == {"t_start": 0.2, "t_end": 0.001, "members": ["tiny", "large", "large"]}
    assert d["meta"] == {"fid": 3.5}
    back = schedule_from_dict(json.loads(json.dumps(d)))
    assert back == sched and back.meta == sched.meta
    assert schedule_from_json(schedule_to_json(sched)) == sched
    path = save_schedule(sched, tmp_path / "sub" / "schedule.json")
    loaded = load_schedule(path)
    assert loaded == sched and loaded.meta == {"fid": 3.5}
    assert [p.name for p in path.parent.iterdir()] == ["schedule.json"]   # no temp files left behind


def test_json_round_trip_random(tmp_path):
    rng = random.Random(0)
    for i in range(30):
        s = random_schedule(rng).with_meta(cost=rng.random(), zoo=ZOO)
        loaded = load_schedule(save_schedule(s, tmp_path / f"{i}.json"))
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
        load_schedule(p)


def test_load_directory(tmp_path):
    with pytest.raises(ScheduleError, match="is a directory"):
        load_schedule(tmp_path)


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
        load_schedule(path)
    assert str(e.value).startswith(f"{path}: ")


def test_load_good_dict_accepts_int_times(tmp_path):
    s = load_schedule(write(tmp_path, good_dict()))
    assert s.times == [1.0, 0.5] and isinstance(s.times[0], float) and s.solver == "ddim"


def test_from_dict_meta_optional():
    d = good_dict()
    del d["meta"]
    assert schedule_from_dict(d).meta == {}


@pytest.mark.parametrize("bad_meta, match", [
    ({"obj": object()}, "not JSON-serialisable"),
    ({"fid": float("nan")}, "not JSON-serialisable"),
])
def test_atomic_save_on_serialisation_failure(sched, tmp_path, bad_meta, match):
    target = tmp_path / "schedule.json"
    with pytest.raises(ScheduleError, match=match):
        save_schedule(sched.with_meta(**bad_meta), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    save_schedule(sched, target)
    before = target.read_text()
    with pytest.raises(ScheduleError, match=match):
        save_schedule(sched.with_meta(**bad_meta), target)
    assert target.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["schedule.json"]


def test_files_written_atomically_get_the_usual_permissions(sched, tmp_path):
    """mkstemp creates 0600 files; a saved schedule (or summary, store header) must read like any other file."""
    mask = os.umask(0o022)
    try:
        save_schedule(sched, tmp_path / "schedule.json")
    finally:
        os.umask(mask)
    assert (tmp_path / "schedule.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------- v2: IIA coefficients
def test_v2_round_trip_identity_and_v1_compatibility(tmp_path):
    plain, iia = corrected_schedule()
    assert iia != plain and schedule_key(iia) != schedule_key(plain) and iia.plain() == plain
    assert corrected_schedule()[1] == iia and hash(corrected_schedule()[1]) == hash(iia)
    assert schedule_key(corrected_schedule(((0.1,), (0.0,), (-0.3,)))[1]) != schedule_key(iia)
    path = save_schedule(iia, tmp_path / "s.json")
    assert json.loads(path.read_text())["format"] == FORMAT_V2
    again = load_schedule(path)
    assert again == iia and again.correction.coefficients == ((0.1,), (0.0,), (-0.2,))
    assert json.loads(schedule_to_json(plain))["format"] == FORMAT            # a plain schedule stays v1
    assert load_schedule(save_schedule(plain, tmp_path / "p.json")) == plain
    assert "+ IIA eps" in iia.compact()


def test_coefficients_for_other_times_members_or_feature_sets_are_refused(tmp_path):
    _, iia = corrected_schedule()
    d = schedule_to_dict(iia)
    d["steps"][1]["t_end"] = d["steps"][2]["t_start"] = 0.35          # edited times
    with pytest.raises(ScheduleError, match="fitted for other times, members or solver.*fit_coefficients.py"):
        schedule_from_dict(d)
    d = schedule_to_dict(iia)
    d["correction"]["feature_set"] = "edm"
    with pytest.raises(ScheduleError, match="no IIA feature set 'edm'"):
        schedule_from_dict(d)
    d = schedule_to_dict(iia)
    d["format"] = FORMAT
    with pytest.raises(ScheduleError, match="unexpected key"):          # v1 has no coefficients
        schedule_from_dict(d)
    with pytest.raises(ScheduleError, match="exactly the keys"):
        schedule_from_dict({**schedule_to_dict(iia), "correction": {"feature_set": "eps"}})
