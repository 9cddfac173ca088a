"""The OMS-DPM slot encoding of a model schedule (oms_lightning.schedule.slots): K triplets, 0 = null."""
import math
import random

import pytest

from conftest import SCHEDULE_ZOO as ZOO
from conftest import random_schedule
from oms_lightning.schedule import ScheduleError
from oms_lightning.schedule.slots import from_slots, to_slots


def test_to_slots_hand(sched):
    assert to_slots(sched, ZOO) == [[2, 2, 0], [1, 0, 0], [3, 1, 1]]
    with pytest.raises(ScheduleError, match=r"step 0 uses member 'small', which is not in members \['large', 'tiny'\]"):
        to_slots(sched, ["large", "tiny"])


@pytest.mark.parametrize("members", [["small", "large", "tiny"], ["large", "large", "tiny"], [], ["a", ""]])
def test_slot_members_must_be_sorted_unique(sched, members):
    with pytest.raises(ScheduleError, match="members must be"):
        to_slots(sched, members)
    with pytest.raises(ScheduleError, match="members must be"):
        from_slots([[1, 0, 0]], members, [1.0, 0.5])


def test_slots_round_trip_random():
    rng = random.Random(1234)
    for _ in range(200):
        s = random_schedule(rng)
        slots = to_slots(s, ZOO)
        assert len(slots) == len(s.steps) and all(len(r) == 3 for r in slots)
        assert sum(v != 0 for r in slots for v in r) == s.nfe
        assert from_slots(slots, ZOO, s.times, s.solver) == s


def test_from_slots_nulls_hand():
    grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05]
    slots = [[0, 0, 0],        # null: merged into the next non-empty step
             [0, 2, 0],        # -> (small,) over 1.0 → 0.6
             [3, 0, 1],        # -> (tiny, large) over 0.6 → 0.4
             [0, 0, 0],        # null
             [1, 1, 1],        # -> (large, large, large) over 0.4 → 0.1
             [0, 0, 0]]        # trailing null: the last step is extended to 0.05
    s = from_slots(slots, ZOO, grid)
    assert s.times == [1.0, 0.6, 0.4, 0.05]
    assert [st.members for st in s.steps] == [("small",), ("tiny", "large"), ("large", "large", "large")]
    assert s.nfe == 6 and s.orders == [1, 2, 3]
    assert to_slots(s, ZOO) == [[2, 0, 0], [3, 1, 0], [1, 1, 1]]


def test_from_slots_random_nulls():
    rng = random.Random(7)
    for _ in range(200):
        k = rng.randint(1, 10)
        slots = [[rng.randint(1, 3) if rng.random() > 0.6 else 0 for _ in range(3)] for _ in range(k)]
        if not any(any(r) for r in slots):
            slots[rng.randrange(k)][rng.randrange(3)] = rng.randint(1, 3)
        grid = [1.0] + sorted((rng.uniform(1e-3, 1.0) for _ in range(k - 1)), reverse=True) + [1e-3]
        s = from_slots(slots, ZOO, grid)
        non_null = [r for r in slots if any(r)]
        assert s.members_per_nfe == [ZOO[v - 1] for r in slots for v in r if v]
        assert s.orders == [sum(v != 0 for v in r) for r in non_null]
        assert s.times[0] == grid[0] and s.times[-1] == grid[-1] and set(s.times) <= set(grid)
        # each non-empty step ends at its own grid point (except a trailing null run, which extends the last)
        ends = [grid[i + 1] for i, r in enumerate(slots) if any(r)]
        assert s.times[1:-1] == ends[:-1]
        # re-encoding drops null rows and packs each triplet's NFEs into the first slots
        packed = [[v for v in r if v] + [0] * (3 - sum(v != 0 for v in r)) for r in non_null]
        assert to_slots(s, ZOO) == packed
        assert from_slots(packed, ZOO, s.times) == s


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
        from_slots(slots, ZOO, times, solver)


def test_from_slots_accepts_numpy():
    np = pytest.importorskip("numpy")
    slots = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 0]])
    s = from_slots(slots, ZOO, np.array([1.0, 0.5, 0.2, 0.01]))
    assert s.members_per_nfe == ["large", "small", "tiny"] and s.times == [1.0, 0.5, 0.01]
    assert all(isinstance(t, float) and not math.isnan(t) for t in s.times)
