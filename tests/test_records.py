"""Schedule → FID records: GridSpace / SlotSpace sampling, the JSON-lines store, resumable and distributed generation."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL, TINY, write_member
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.predictor import generate as gen
from oms_lightning.predictor.generate import (generate_distributed, generate_records, merge_shards, shard_path)
from oms_lightning.predictor.records import FORMAT, RecordStore, fid_settings, schedule_key
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import schedule_from_dict, schedule_to_dict
from oms_lightning.search.space import GridSpace, SlotSpace, make_space

MEMBERS = ("a", "b", "c")
N, SEED, BATCH = 16, 3, 16

# The setup shared by the in-process run and the 2-process DDP script (written to a file so both build it alike).
SCRIPT = textwrap.dedent('''
    """Written by tests/test_records.py: schedule→FID generation on a fake zoo, in one or two CPU processes."""
    import sys

    import numpy as np
    import torch


    def build(root, cache):
        from oms_lightning.metrics import DigitsClassifierExtractor, FIDEvaluator
        from oms_lightning.search.space import make_space
        from oms_lightning.zoo import LatencyProfile, Zoo

        zoo = Zoo.load(root, "digits")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            extractor = DigitsClassifierExtractor()  # untrained: any fixed feature map serves for equality
        real = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
        evaluator = FIDEvaluator("digits_classifier", real, cache, "cpu", extractor=extractor)
        profile = LatencyProfile({n: 0.001 * (i + 1) for i, n in enumerate(zoo.names)}, 16, "test cpu", "float32",
                                 zoo.fingerprint())
        rng = np.random.default_rng(0)
        slots = make_space("dpm_solver", zoo.names, zoo.noise_schedule, 3)
        grid = make_space("ddim", zoo.names, zoo.noise_schedule, 8)
        schedules = [slots.sample(rng, 0.6) for _ in range(3)] + [grid.sample(rng, 0.6) for _ in range(2)]
        return zoo, evaluator, profile, schedules


    if __name__ == "__main__":
        torch.set_num_threads(1)
        from oms_lightning.predictor.generate import generate_distributed

        root, cache, store, devices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        zoo, evaluator, profile, schedules = build(root, cache)
        generate_distributed(zoo, schedules, store, evaluator, N, SEED, BATCH, profile, accelerator="cpu",
                             devices=devices, strategy="ddp" if devices > 1 else "auto", progress=False)
''').replace("N, SEED, BATCH, profile", f"{N}, {SEED}, {BATCH}, profile")


# ---------------------------------------------------------------------------------------------------------------
# search spaces
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++"])
def test_grid_space_decodes_every_sample_to_a_valid_schedule(solver):
    noise = VPSchedule()
    space = make_space(solver, MEMBERS, noise, 20)
    assert isinstance(space, GridSpace) and space.shape == (20,)
    grid = torch.tensor(space.times, dtype=torch.float64)
    assert len(space.times) == 21 and space.times[0] == 1.0 and space.times[-1] == space.t_end == 1e-4
    steps = grid.diff() if solver == "ddim" else noise.lambda_(grid).diff()  # uniform in t / in logSNR
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = space.sample_genotype(rng, null_prob=0.7, alpha=0.4)
        s = space.decode(g)
        s.validate(MEMBERS, t_min=noise.t_min)
        assert s.solver == solver and s.nfe == int(np.count_nonzero(g))
        t = s.times
        assert all(a > b for a, b in zip(t, t[1:])) and t[0] == 1.0 and t[-1] == space.t_end
        assert [m for m in s.members_per_nfe] == [MEMBERS[v - 1] for v in g[g > 0]]
        back = space.encode(s)
        assert space.decode(back) == s and back[0] != 0
        if g[0]:
            assert np.array_equal(back, g)
    single = space.single("b", 7)
    assert single.nfe == 7 and single.member_names == ["b"] and space.encode(single)[0] == 2
    assert space.single("c", 20).times == list(space.times)


def test_grid_space_rejects_what_is_not_in_it():
    space = GridSpace(MEMBERS, 10, VPSchedule(), "ddim")
    with pytest.raises(UserError, match="null"):
        space.decode(np.zeros(10, dtype=np.int64))
    with pytest.raises(UserError, match="shape"):
        space.decode(np.ones(9, dtype=np.int64))
    with pytest.raises(UserError, match="solver"):
        space.encode(GridSpace(MEMBERS, 10, VPSchedule(), "dpm_solver++").single("a", 3))
    with pytest.raises(UserError, match="not on the grid"):
        space.encode(ModelSchedule.single("a", [1.0, 0.55, 1e-3], solver="ddim"))
    with pytest.raises(UserError, match="unknown search space"):
        make_space("heun", MEMBERS, VPSchedule(), 10)
    with pytest.raises(UserError, match="GridSpace supports"):
        GridSpace(MEMBERS, 10, VPSchedule(), "dpm_solver")
    assert isinstance(make_space("dpm_solver", MEMBERS, VPSchedule(), 5), SlotSpace)


@pytest.mark.parametrize("null_prob", [0.8, 0.5])
def test_slot_space_nfe_distribution_follows_null_probability(null_prob):
    space = SlotSpace(MEMBERS, 10, VPSchedule())
    rng = np.random.default_rng(1)
    nfes = [int(np.count_nonzero(space.sample_genotype(rng, null_prob))) for _ in range(2000)]
    expected = 10 * 3 * (1 - null_prob)  # P(all 30 slots null) ≤ 0.8^30: no resampling effect
    assert abs(np.mean(nfes) - expected) < 0.1 * expected
    for _ in range(50):
        s = space.sample(rng, null_prob)
        assert s.validate(MEMBERS).solver == "dpm_solver" and s.nfe >= 1


# ---------------------------------------------------------------------------------------------------------------
# the record store
# ---------------------------------------------------------------------------------------------------------------
SETTINGS = {"n": 16, "seed": 0, "extractor": "digits_classifier", "split": "train"}


def fake_record(i: int, fid: float = 10.0) -> dict:
    s = ModelSchedule.single("a", [1.0, 0.5 - 0.01 * i, 1e-3])
    return {"schedule": schedule_to_dict(s), "key": schedule_key(s), "cost": 0.1, "nfe": 2, "fid": fid + i, "n": 16,
            "extractor": "digits_classifier", "seed": 0, "zoo": "z1", "settings": "x", "seconds": 1.0}


def test_store_round_trip(tmp_path):
    path = tmp_path / "sub" / "records.jsonl"
    store = RecordStore(path, "z1", SETTINGS)
    assert json.loads(path.read_text().splitlines()[0]) == {"format": FORMAT, "zoo": "z1", "settings": SETTINGS}
    assert store.records() == [] and store.done_keys() == set()
    recs = [fake_record(i) for i in range(3)]
    for r in recs:
        store.append(r)
    again = RecordStore(path, "z1", dict(reversed(SETTINGS.items())))  # key order does not matter
    assert again.records() == recs and again.done_keys() == {r["key"] for r in recs} and len(again) == 3
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 4
    # the key ignores meta and float noise below 1e-9, and tells different schedules apart
    s = schedule_from_dict(recs[0]["schedule"])
    nudged = ModelSchedule.single("a", [1.0, 0.5 + 1e-12, 1e-3], meta={"note": 1})
    assert schedule_key(nudged) == schedule_key(s) != schedule_key(ModelSchedule.single("b", s.times))


@pytest.mark.parametrize("torn", [b'{"schedule": {"form', b'{"schedule": garbage}\n'])
def test_torn_last_line_is_ignored_then_repaired(tmp_path, caplog, torn):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, "z1", SETTINGS)
    store.append(fake_record(0))
    store.append(fake_record(1))
    with open(path, "ab") as f:
        f.write(torn)  # a crash in the middle of the third append
    reopened = RecordStore(path, "z1", SETTINGS)
    with caplog.at_level(logging.WARNING):
        assert [r["key"] for r in reopened.records()] == [fake_record(i)["key"] for i in range(2)]
    assert "torn last line" in caplog.text
    assert path.read_bytes().endswith(torn)  # reading never modifies the file
    reopened.append(fake_record(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert [r["key"] for r in RecordStore(path, "z1", SETTINGS).records()] == [fake_record(i)["key"] for i in range(3)]


def test_garbage_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, "z1", SETTINGS)
    store.append(fake_record(0))
    with open(path, "a") as f:
        f.write("not json at all\n")
    store.append(fake_record(1))
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        RecordStore(path, "z1", SETTINGS).records()


def test_foreign_zoo_settings_or_header_is_an_error_saying_what_differs(tmp_path):
    path = tmp_path / "records.jsonl"
    RecordStore(path, "z1", SETTINGS).append(fake_record(0))
    with pytest.raises(UserError, match=r"another zoo \(fingerprint z1, this zoo is z2\).*delete .*store\.path="):
        RecordStore(path, "z2", SETTINGS)
    with pytest.raises(UserError, match=r"other FID settings \(n: stored 16, now 32; seed: stored 0, now 1\)"):
        RecordStore(path, "z1", {**SETTINGS, "n": 32, "seed": 1})
    bad = tmp_path / "headless.jsonl"
    bad.write_text(json.dumps(fake_record(0)) + "\n")
    with pytest.raises(UserError, match="not a schedule/FID record store.*delete"):
        RecordStore(bad, "z1", SETTINGS)
    bad.write_text('{"format": "oms-lightning/schedule-fid-v1", "zoo": "z1"}\n')
    with pytest.raises(UserError, match="garbled header"):
        RecordStore(bad, "z1", SETTINGS)


def test_merge_shards_appends_in_input_order_once_and_deletes_them(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, "z1", SETTINGS)
    recs = [fake_record(i) for i in range(5)]
    store.append(recs[1])
    for rank, mine in enumerate([[recs[0], recs[2], recs[4]], [recs[1], recs[3]]]):
        shard = RecordStore(shard_path(path, rank), "z1", SETTINGS)
        assert shard.path.name == f"records.rank{rank}.jsonl"
        for r in mine:
            shard.append(r)
    assert merge_shards(store, [r["key"] for r in recs]) == 4
    assert [r["key"] for r in store.records()] == [recs[i]["key"] for i in (1, 0, 2, 3, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]
    assert merge_shards(store) == 0


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(zoo root, FID cache dir, script path, build()): a 3-member fake zoo and the shared DDP script."""
    base = tmp_path_factory.mktemp("records")
    write_member(base / "zoo", "a", TINY, seed=0)
    write_member(base / "zoo", "b", SMALL, seed=1)
    write_member(base / "zoo", "c", TINY, seed=2)
    script = base / "gen_records.py"
    script.write_text(SCRIPT)
    namespace: dict = {"__name__": "gen_records"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield base / "zoo", base / "cache", script, namespace["build"](base / "zoo", base / "cache")
    finally:
        torch.set_num_threads(threads)


def test_generation_skips_done_schedules_and_resumes_after_an_interruption(setup, tmp_path, monkeypatch):
    _, _, _, (zoo, evaluator, profile, schedules) = setup
    schedules = schedules + [schedules[0]]  # a duplicate is evaluated once
    store = RecordStore(tmp_path / "records.jsonl", zoo.fingerprint(), fid_settings(evaluator, N, SEED))
    real = gen.evaluate_schedule
    calls = []

    def crashing(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "evaluate_schedule", crashing)
    with pytest.raises(KeyboardInterrupt):
        generate_records(zoo, schedules, store, evaluator, N, SEED, BATCH, profile, progress=False)
    assert [r["key"] for r in store.records()] == [schedule_key(s) for s in schedules[:2]]

    calls.clear()
    monkeypatch.setattr(gen, "evaluate_schedule", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    out = generate_records(zoo, schedules, store, evaluator, N, SEED, BATCH, profile, progress=False)
    assert calls == schedules[2:5]  # only what was missing
    keys = [r["key"] for r in store.records()]
    assert keys == [schedule_key(s) for s in schedules[:5]] and len(set(keys)) == 5
    assert [r["key"] for r in out] == keys
    for r, s in zip(out, schedules):
        assert r["nfe"] == s.nfe and r["cost"] == pytest.approx(profile.cost(s)) and r["n"] == N
        assert r["seed"] == SEED and r["zoo"] == zoo.fingerprint() and np.isfinite(r["fid"]) and r["seconds"] > 0
        assert schedule_from_dict(r["schedule"]) == s

    calls.clear()
    assert generate_records(zoo, schedules, store, evaluator, N, SEED, BATCH, profile, progress=False) == out
    assert calls == []
    with pytest.raises(UserError, match="FID settings"):
        generate_records(zoo, schedules, store, evaluator, N, SEED + 1, BATCH, profile, progress=False)


@pytest.mark.slow
def test_two_process_ddp_records_equal_a_single_process_run(setup, tmp_path):
    root, cache, script, (zoo, evaluator, profile, schedules) = setup
    single = generate_distributed(zoo, schedules, tmp_path / "single.jsonl", evaluator, N, SEED, BATCH, profile,
                                  accelerator="cpu", devices=1, progress=False)
    assert len(single) == len(schedules) and not list(tmp_path.glob("*.rank*"))

    # an interrupted earlier DDP run left a shard with one record: it is merged, not recomputed
    ddp_path = tmp_path / "ddp.jsonl"
    shard = RecordStore(shard_path(ddp_path, 1), zoo.fingerprint(), fid_settings(evaluator, N, SEED))
    shard.append(single[3])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, str(script), str(root), str(cache), str(ddp_path), "2"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stdout + r.stderr  # two processes really ran
    assert sorted(p.name for p in tmp_path.glob("ddp*")) == ["ddp.jsonl"]  # shards merged and deleted

    ddp = RecordStore(ddp_path, zoo.fingerprint(), fid_settings(evaluator, N, SEED)).records()
    assert ddp[0] == single[3]  # the leftover shard's record went in first
    by_key = {rec["key"]: rec for rec in ddp}
    assert len(by_key) == len(ddp) == len(single)
    for a in single:
        b = by_key[a["key"]]
        strip = lambda rec: {k: v for k, v in rec.items() if k not in ("seconds", "fid")}  # noqa: E731
        assert strip(a) == strip(b)
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    # with nothing left over, the merged store is the single-process store record for record, in input order
    assert [rec["key"] for rec in ddp[1:]] == [a["key"] for a in single if a["key"] != single[3]["key"]]


@pytest.mark.slow
def test_spawned_ranks_called_in_process_equal_a_single_process_run(setup, tmp_path):
    """ddp_spawn: what the search uses, since it spreads many calls from one running job (ranks receive the
    schedules and the profile as plain dicts: Fabric's spawn refuses frozen dataclasses)."""
    _, _, _, (zoo, evaluator, profile, schedules) = setup
    single = generate_distributed(zoo, schedules, tmp_path / "single.jsonl", evaluator, N, SEED, BATCH, profile,
                                  accelerator="cpu", devices=1, progress=False)
    spawned = generate_distributed(zoo, schedules, tmp_path / "spawn.jsonl", evaluator, N, SEED, BATCH, profile,
                                   accelerator="cpu", devices=2, strategy="ddp_spawn", progress=False)
    assert sorted(p.name for p in tmp_path.glob("spawn*")) == ["spawn.jsonl"]  # shards merged and deleted
    assert [r["key"] for r in spawned] == [r["key"] for r in single]
    assert {r["key"]: r["fid"] for r in spawned} == pytest.approx({r["key"]: r["fid"] for r in single}, rel=1e-6)
    stored = RecordStore(tmp_path / "spawn.jsonl", zoo.fingerprint(), fid_settings(evaluator, N, SEED)).records()
    assert len(stored) == len(single)
