"""Zoo: loading by name in sorted order, clear errors, denoisers per NFE, fingerprint; latency profile and cache."""
import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
import torch

import oms_lightning.zoo.profiler as zoo_mod
from conftest import BIG, DATA, SMALL, TINY, write_member
from oms_lightning.zoo import save_member
from oms_lightning.diffusion.denoiser import EpsDenoiser
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.nets import UNet
from oms_lightning.schedule import ModelSchedule, ScheduleError
from oms_lightning.zoo import (LatencyProfile, Zoo, cost_model_error, load_or_profile, profile_latency,
                               time_schedules)

@pytest.fixture
def root(tmp_path):
    for i, name in enumerate(["c", "a", "b"]):
        write_member(tmp_path, name, TINY if name == "a" else SMALL, seed=i)
    return tmp_path


def schedule(members_per_step):
    times = [1.0 - 0.9 * k / len(members_per_step) for k in range(len(members_per_step) + 1)]
    return ModelSchedule.from_times_and_members(times, members_per_step)


# ---------------------------------------------------------------------- loading
def test_names_sorted_regardless_of_argument_order(root):
    zoo = Zoo.load(root, "digits", ["c", "a", "b"])
    assert zoo.names == ("a", "b", "c") and len(zoo) == 3
    assert "b" in zoo and "z" not in zoo
    assert zoo.image_shape == (1, 8, 8) and zoo.data == DATA and zoo.noise_schedule == VPSchedule()
    assert Zoo.load(root, "digits", ["b", "a"]).names == ("a", "b")


def test_names_none_loads_every_member_file_only(root):
    (root / "digits" / "fid_classifier.pt").write_bytes(b"not a member")
    torch.save({"state_dict": {}, "global_step": 1}, root / "digits" / "lightning.ckpt")  # foreign, skipped
    zoo = Zoo.load(root, "digits")
    assert zoo.names == ("a", "b", "c")


def test_corrupt_member_file_is_reported_not_skipped(root):
    (root / "digits" / "b.ckpt").write_bytes(b"torn write")
    with pytest.raises(UserError, match=r"b\.ckpt is corrupt"):
        Zoo.load(root, "digits")


def test_nets_are_eval_frozen_and_converted(root):
    zoo = Zoo.load(root, "digits", ["a", "b"], dtype=torch.float64)
    for name in zoo.names:
        net = zoo.net(name)
        assert not net.training
        assert all(not p.requires_grad and p.dtype == torch.float64 for p in net.parameters())
    x = torch.randn(2, *zoo.image_shape, dtype=torch.float64)
    assert zoo.denoiser("a")(x, 0.5).shape == x.shape


def test_missing_member_lists_train_commands(root):
    with pytest.raises(UserError) as e:
        Zoo.load(root, "digits", ["a", "large", "medium"])
    msg = str(e.value)
    assert "large" in msg and "medium" in msg
    assert "python train.py model=large data=digits" in msg
    assert "python train.py model=medium data=digits" in msg


def test_empty_data_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="python train.py model="):
        Zoo.load(tmp_path, "digits")


def test_mismatched_data_names_member_and_field(root):
    write_member(root, "d", data={**DATA, "image_size": 16})
    with pytest.raises(UserError, match=r"'d'.*data\.image_size"):
        Zoo.load(root, "digits", ["a", "d"])


def test_mismatched_noise_names_member_and_field(root):
    write_member(root, "e", noise=VPSchedule(beta_max=10.0).to_dict())
    with pytest.raises(UserError, match=r"'e'.*noise\.beta_max"):
        Zoo.load(root, "digits", ["a", "b", "e"])


def test_file_holding_another_member_is_refused(root):
    (root / "digits" / "b.ckpt").rename(root / "digits" / "x.ckpt")
    with pytest.raises(UserError, match=r"holds member 'b'"):
        Zoo.load(root, "digits", ["x"])


def test_cuda_without_cuda_is_a_user_error(root):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="CUDA is not available"):
        Zoo.load(root, "digits", ["a"], device="cuda")


# ---------------------------------------------------------------------- denoisers
def test_denoisers_for_returns_member_per_nfe(root):
    zoo = Zoo.load(root, "digits", ["a", "b", "c"])
    assert isinstance(zoo.denoiser("a"), EpsDenoiser) and zoo.denoiser("a") is zoo.denoiser("a")
    sched = schedule([("a", "c"), ("b",), ("c", "c", "a")])
    dens = zoo.denoisers_for(sched)
    assert len(dens) == sched.nfe == 6
    assert [next(n for n in zoo.names if zoo.denoiser(n) is d) for d in dens] == ["a", "c", "b", "c", "c", "a"]
    assert all(d.net is zoo.net(m) for d, m in zip(dens, sched.members_per_nfe))


def test_unknown_member_in_schedule_is_refused(root):
    zoo = Zoo.load(root, "digits", ["a", "b"])
    with pytest.raises(ScheduleError, match="unknown member 'c'"):
        zoo.denoisers_for(schedule([("a",), ("c",)]))
    with pytest.raises(UserError, match="unknown zoo member 'zz'"):
        zoo.denoiser("zz")


# ---------------------------------------------------------------------- fingerprint
def test_fingerprint_changes_when_a_member_is_retrained(root):
    fp = Zoo.load(root, "digits", ["a", "b"]).fingerprint()
    assert fp == Zoo.load(root, "digits", ["b", "a"]).fingerprint()  # stable across loads
    assert fp != Zoo.load(root, "digits", ["a", "b", "c"]).fingerprint()  # depends on the names
    write_member(root, "b", seed=123, step=100)  # same architecture and meta, other weights
    assert Zoo.load(root, "digits", ["a", "b"]).fingerprint() != fp


def test_fingerprint_ignores_metadata(root):
    """Issue 11: a member rewritten with the same weights but other meta (a no-op resume) keeps every cache."""
    fp = Zoo.load(root, "digits", ["a", "b"]).fingerprint()
    write_member(root, "b", seed=2, step=999)  # the fixture's seed → same weights, other global_step
    assert Zoo.load(root, "digits", ["a", "b"]).fingerprint() == fp


# ---------------------------------------------------------------------- latency
@pytest.fixture
def one_thread():
    """Time on one intra-op thread: on a shared 2-core runner, 2 OpenMP threads competing with other processes
    can make every forward take ~1 s whatever its size. The thread count is part of the device name."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def speed_zoo(tmp_path, one_thread):
    write_member(tmp_path, "big", BIG)
    write_member(tmp_path, "tiny", TINY)
    return Zoo.load(tmp_path, "digits")


def test_profile_latency_measures_every_member(speed_zoo):
    prof = profile_latency(speed_zoo, batch_size=8, warmup=1, repeats=5)
    assert set(prof.latency) == {"big", "tiny"}
    assert all(v > 0 for v in prof.latency.values())
    assert prof.latency["big"] > prof.latency["tiny"]  # medians of 5; a 256x FLOP gap survives a busy CPU
    assert prof.batch_size == 8 and prof.dtype == "float32" and prof.zoo_fingerprint == speed_zoo.fingerprint()
    assert prof.device_name == zoo_mod.device_description("cpu") and "(1 thread)" in prof.device_name
    sched = schedule([("big", "tiny"), ("tiny",), ("big", "big", "tiny")])
    expected = 3 * prof.latency["big"] + 3 * prof.latency["tiny"]
    assert prof.cost(sched) == pytest.approx(expected, rel=1e-12)


def test_cost_is_exact_sum_of_latencies():
    prof = LatencyProfile({"a": 0.25, "b": 0.5, "c": 2.0}, 8, "cpu", "float32", "f00")
    sched = schedule([("a", "c"), ("b",), ("c", "c", "a")])
    assert prof.cost(sched) == 0.25 + 2.0 + 0.5 + 2.0 + 2.0 + 0.25 == 7.0
    with pytest.raises(ScheduleError, match="no latency for member 'z'"):
        prof.cost(schedule([("z",)]))


def test_profile_round_trips_through_json(tmp_path):
    prof = LatencyProfile({"b": 0.5, "a": 0.25}, 8, "cpu (2 threads)", "float32", "abc", spread={"a": 0.1, "b": 0.3},
                          spread_limit=0.2)
    again = LatencyProfile.load(prof.save(tmp_path / "p.json"))
    assert again == prof and LatencyProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    assert again.spread == {"a": 0.1, "b": 0.3} and again.worst_spread == 0.3 and again.noisy
    assert again.noisy_members() == {"b": 0.3} and again.noisy_members(0.05) == {"b": 0.3, "a": 0.1}
    with pytest.raises(ValueError):
        LatencyProfile({"a": -1.0}, 8, "cpu", "float32", "abc")
    with pytest.raises(ValueError, match="spread"):
        LatencyProfile({"a": 1.0}, 8, "cpu", "float32", "abc", spread={"a": -0.1})
    with pytest.raises(ValueError, match="no latency"):
        LatencyProfile({"a": 1.0}, 8, "cpu", "float32", "abc", spread={"z": 0.1})


def test_profile_written_before_spreads_still_loads(tmp_path):
    old = LatencyProfile({"a": 0.25}, 8, "cpu", "float32", "abc").to_dict()
    del old["spread"], old["spread_limit"]  # exactly the keys a file from before spreads holds
    (tmp_path / "old.json").write_text(json.dumps(old))
    prof = LatencyProfile.load(tmp_path / "old.json")
    assert prof.latency == {"a": 0.25} and prof.spread == {} and prof.worst_spread == 0.0 and not prof.noisy


def test_profile_latency_interleaves_members_round_by_round(speed_zoo):
    calls = []
    hooks = [speed_zoo.net(n).register_forward_hook(lambda *_, n=n: calls.append(n)) for n in speed_zoo.names]
    try:
        prof = profile_latency(speed_zoo, batch_size=2, warmup=1, repeats=4, rounds=4)
        warm, timed = calls[:2], calls[2:]
        assert warm == ["big", "tiny"]  # every member warmed up before any is timed
        assert timed == ["big", "tiny", "tiny", "big", "big", "tiny", "tiny", "big"]  # rotated, never in blocks
        calls.clear()
        profile_latency(speed_zoo, batch_size=2, warmup=0, repeats=10, rounds=4)
        assert calls.count("big") == calls.count("tiny") == 4 * (10 // 4)  # max(1, repeats // rounds) per round
    finally:
        for h in hooks:
            h.remove()
    assert set(prof.spread) == {"big", "tiny"} and all(v >= 0 for v in prof.spread.values())


def test_latency_is_median_of_passes_and_spread_is_over_round_medians(speed_zoo, monkeypatch):
    names = {id(speed_zoo.net(n)): n for n in speed_zoo.names}
    rounds_seen = {n: 0 for n in speed_zoo.names}
    slow_round = {"big": 1, "tiny": None}  # big is slowed down in its second round only; tiny stays steady

    def fake_timed_passes(net, x, t, passes, dev):
        name = names[id(net)]
        r = rounds_seen[name]
        rounds_seen[name] += 1
        return [0.02 if r == slow_round[name] else 0.01] * passes

    monkeypatch.setattr(zoo_mod, "_timed_passes", fake_timed_passes)
    prof = profile_latency(speed_zoo, batch_size=2, warmup=0, repeats=10, rounds=5)
    assert prof.latency == {"big": pytest.approx(0.01), "tiny": pytest.approx(0.01)}
    # round medians [.01, .02, .01, .01, .01]: p10 = .01, p90 = .016 (linear), so (p90 - p10) / median = 0.6
    assert prof.spread == {"big": pytest.approx(0.6), "tiny": 0.0}


def test_profile_argument_errors(speed_zoo, tmp_path):
    with pytest.raises(UserError, match="rounds must be a positive integer"):
        profile_latency(speed_zoo, batch_size=2, rounds=0)
    with pytest.raises(UserError, match="max_spread"):
        load_or_profile(speed_zoo, tmp_path / "p.json", batch_size=2, max_spread=-1)
    with pytest.raises(UserError, match="attempts"):
        load_or_profile(speed_zoo, tmp_path / "p.json", batch_size=2, attempts=0)


class FakeProfiler:
    """Stands in for profile_latency (real profiling is tested above): counts calls, returns a valid profile.

    `spreads` are the worst spreads (of member 'b') of successive calls; quiet once they run out."""

    def __init__(self, spreads=()):
        self.calls = 0
        self.spreads = list(spreads)

    def __call__(self, zoo, batch_size, warmup=3, repeats=10, device=None, rounds=5):
        self.calls += 1
        device = zoo.device if device is None else device
        worst = self.spreads.pop(0) if self.spreads else 0.01
        return LatencyProfile({n: 0.001 * (i + 1) for i, n in enumerate(zoo.names)}, batch_size,
                              zoo_mod.device_description(device), "float32", zoo.fingerprint(),
                              spread={"a": 0.01, "b": worst})


def test_load_or_profile_reuses_and_invalidates(root, monkeypatch, caplog):
    zoo = Zoo.load(root, "digits", ["a", "b"])
    path = root / "latency.json"
    counter = FakeProfiler()
    monkeypatch.setattr(zoo_mod, "profile_latency", counter)
    kw = {"warmup": 0, "repeats": 1}

    first = load_or_profile(zoo, path, batch_size=4, **kw)
    assert counter.calls == 1 and path.is_file()

    def fail(*a, **k):
        raise AssertionError("must reuse the cached profile")

    monkeypatch.setattr(zoo_mod, "profile_latency", fail)
    assert load_or_profile(zoo, path, batch_size=4, **kw) == first  # fresh and matching: reused

    monkeypatch.setattr(zoo_mod, "profile_latency", counter)
    assert load_or_profile(zoo, path, batch_size=8, **kw).batch_size == 8  # other batch size
    assert counter.calls == 2
    assert load_or_profile(zoo, path, batch_size=8, **kw).batch_size == 8  # now cached
    assert counter.calls == 2

    write_member(root, "b", seed=99)  # retrained member → other fingerprint
    zoo2 = Zoo.load(root, "digits", ["a", "b"])
    prof = load_or_profile(zoo2, path, batch_size=8, **kw)
    assert counter.calls == 3 and prof.zoo_fingerprint == zoo2.fingerprint() != zoo.fingerprint()

    old = dict(prof.to_dict(), created=(datetime.now(timezone.utc) - timedelta(hours=30)).isoformat())
    path.write_text(json.dumps(old))  # too old for max_age_hours=24
    load_or_profile(zoo2, path, batch_size=8, max_age_hours=24, **kw)
    assert counter.calls == 4
    load_or_profile(zoo2, path, batch_size=8, max_age_hours=24, **kw)
    assert counter.calls == 4

    path.write_text('{"format": "oms-lightning/latency-prof')  # torn / corrupt cache
    with caplog.at_level(logging.WARNING, logger="oms_lightning.zoo"):
        prof = load_or_profile(zoo2, path, batch_size=8, **kw)
    assert counter.calls == 5 and "unreadable" in caplog.text
    assert LatencyProfile.load(path) == prof  # rewritten


def test_noisy_profile_is_measured_again_and_the_least_noisy_kept(root, monkeypatch, caplog):
    zoo = Zoo.load(root, "digits", ["a", "b"])
    path = root / "latency.json"
    counter = FakeProfiler(spreads=[0.6, 0.1, 0.9])
    monkeypatch.setattr(zoo_mod, "profile_latency", counter)
    prof = load_or_profile(zoo, path, batch_size=4, max_spread=0.25)
    assert counter.calls == 2 and prof.spread["b"] == 0.1 and not prof.noisy  # stops once quiet
    assert LatencyProfile.load(path) == prof and prof.spread_limit == 0.25

    counter = FakeProfiler(spreads=[0.6, 0.4, 0.5, 0.01])
    monkeypatch.setattr(zoo_mod, "profile_latency", counter)
    with caplog.at_level(logging.WARNING, logger="oms_lightning.zoo"):
        prof = load_or_profile(zoo, path, batch_size=8, max_spread=0.25, attempts=3)
    assert counter.calls == 3 and prof.spread["b"] == 0.4 and prof.noisy  # never quiet: least noisy, marked
    assert "'b' by 40%" in caplog.text and "busy" in caplog.text and "after 3 attempt(s)" in caplog.text


def test_cached_noisy_profile_is_not_reused(root, monkeypatch):
    zoo = Zoo.load(root, "digits", ["a", "b"])
    path = root / "latency.json"
    noisy = FakeProfiler(spreads=[0.5])(zoo, 4)
    noisy.save(path)
    counter = FakeProfiler()
    monkeypatch.setattr(zoo_mod, "profile_latency", counter)
    reused = load_or_profile(zoo, path, batch_size=4, max_spread=0.6)  # quiet enough for a looser limit
    assert counter.calls == 0 and reused.latency == noisy.latency and reused.spread_limit == 0.6
    prof = load_or_profile(zoo, path, batch_size=4, max_spread=0.25)
    assert counter.calls == 1 and prof.spread["b"] == 0.01 and LatencyProfile.load(path) == prof


def test_time_schedules_interleaves_and_times_each_schedule(root, monkeypatch):
    zoo = Zoo.load(root, "digits", ["a", "b"])
    first, second = schedule([("a",), ("a",)]), schedule([("b",), ("b",), ("b",)])
    calls, real_generate = [], zoo_mod.generate

    def recording_generate(z, sched, n, seed=0, batch_size=256):
        calls.append((sched, n, seed, batch_size))
        return real_generate(z, sched, n, seed=seed, batch_size=batch_size)

    monkeypatch.setattr(zoo_mod, "generate", recording_generate)
    rows = time_schedules(zoo, [first, second], batch_size=2, rounds=3, seed=7)
    assert [c[0] for c in calls] == [first, second] * 4  # one warm-up each, then A, B per round
    assert all(c[1:] == (2, 7, 2) for c in calls)
    assert len(rows) == 2 and all(r["runs"] == 3 and r["wall_seconds"] > 0 and r["wall_spread"] >= 0 for r in rows)


def test_cost_model_error_is_relative_to_wall_time():
    assert cost_model_error(1.2, 1.0) == pytest.approx(0.2)
    assert cost_model_error(0.5, 1.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        cost_model_error(1.0, 0.0)


def test_timing_can_reprice_the_cost_model_on_the_machine_as_timed(root):
    zoo = Zoo.load(root, "digits")
    first = ModelSchedule.single(zoo.names[0], [1.0, 0.5, 1e-3], solver="ddim")
    rows, latency = time_schedules(zoo, [first], batch_size=2, rounds=2, profile_rounds=True)
    assert len(rows) == 1 and rows[0]["runs"] == 2
    assert set(latency) == set(zoo.names) and all(v > 0 for v in latency.values())


def test_machine_speed_change_is_the_median_latency_ratio():
    from oms_lightning.zoo import machine_speed_change

    assert machine_speed_change({"a": 1.0, "b": 2.0, "c": 1.0}, {"a": 1.5, "b": 3.0, "c": 0.9}) == pytest.approx(0.5)
    assert machine_speed_change({"a": 1.0}, {"a": 0.8}) == pytest.approx(-0.2)
