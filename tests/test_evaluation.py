"""The evaluation module: intervals and verdicts, paired comparison, the baseline enumeration and cost at equal
quality — with fake scores where the answer is known by construction."""
import math

import numpy as np
import pytest
from scipy import stats

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.spacing import SPACINGS
from oms_lightning.errors import UserError
from oms_lightning.evaluation import Evaluation, check_fresh_seeds, compare, t_interval, verdict
from oms_lightning.samplers import (SAMPLERS, cost_at_equal_quality, fitting_nfes, single_member_baselines,
                                    single_member_sampler)
from oms_lightning.metrics import METRICS
from oms_lightning.predictor.records import schedule_key

NOISE = VPSchedule()


class FakeEvaluation(Evaluation):
    """Scores from a table (schedule key or NFE → per-seed FIDs); counts how many schedules were scored."""

    def __init__(self, table, seeds=(0, 1, 2)):
        super().__init__(zoo=type("Z", (), {"noise_schedule": NOISE})(), metrics=None, seeds=list(seeds), n=10)
        self.table, self.calls = table, 0

    def score(self, schedule):
        self.calls += 1
        fids = self.table(schedule)
        return {m: list(fids) for m in METRICS}


# ----------------------------------------------------------------------------------------------- statistics
def test_t_interval_matches_the_textbook_formula():
    v = [5.1, 4.7, 5.6, 5.0]
    mean, lo, hi = t_interval(v)
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert mean == pytest.approx(np.mean(v)) and (lo, hi) == pytest.approx((mean - half, mean + half))
    with pytest.raises(UserError, match="at least 2 seeds"):
        t_interval([1.0])


@pytest.mark.parametrize("lo,hi,lower_is_better,expected", [
    (-2.0, -0.1, True, "better"), (0.1, 2.0, True, "worse"), (-0.1, 0.1, True, "tie"), (0.0, 1.0, True, "tie"),
    (0.1, 2.0, False, "better"), (-2.0, -0.1, False, "worse")])
def test_verdict(lo, hi, lower_is_better, expected):
    assert verdict(lo, hi, lower_is_better) == expected


def test_evaluation_seeds_must_be_fresh_and_distinct():
    assert check_fresh_seeds([100, 101], {"dataset": 0, "selection": 1}) == [100, 101]
    with pytest.raises(UserError, match="overlap.*selection"):
        check_fresh_seeds([1, 100], {"dataset": 0, "selection": 1})
    with pytest.raises(UserError, match="distinct"):
        check_fresh_seeds([100, 100], {})


def test_paired_comparison_separates_what_unpaired_intervals_cannot():
    """Seed-to-seed noise is shared by both contenders (same per-sample noise): the paired difference is tight."""
    a = single_member_sampler("a", "ddim", None, "karras", 4, NOISE)
    b = single_member_sampler("b", "ddim", None, "karras", 4, NOISE)
    seed_noise = np.array([0.0, 1.5, -1.2, 0.7, -0.4])
    fids = {schedule_key(a): 5.0 + seed_noise - 0.3, schedule_key(b): 5.0 + seed_noise}
    ev = FakeEvaluation(lambda s: fids[schedule_key(s)], seeds=range(5))
    out = compare(ev, {"searched": a, "baseline": b}, reference="baseline", noise_floor={"fid": 0.4})
    row = out["contenders"]["searched"]["fid"]
    ca, cb = row["ci"], out["contenders"]["baseline"]["fid"]["ci"]
    assert ca[1] > cb[0]  # the unpaired intervals overlap ...
    assert row["diff"] == pytest.approx(-0.3) and row["verdict"] == "better"  # ... the paired one does not
    assert "verdict" not in out["contenders"]["baseline"]["fid"] and out["noise_floor"] == {"fid": 0.4}
    assert out["disagreements"]["searched"] == []


def test_metrics_that_disagree_are_flagged():
    a = single_member_sampler("a", "ddim", None, "karras", 4, NOISE)
    b = single_member_sampler("b", "ddim", None, "karras", 4, NOISE)
    ev = FakeEvaluation(lambda s: None, seeds=range(3))
    base = {m: [1.0, 2.0, 3.0] for m in METRICS}
    better = {**{m: [0.5, 1.6, 2.4] for m in METRICS}, "pixel_fd": [1.5, 2.4, 3.6]}
    ev.score = lambda s: better if s is a else base
    out = compare(ev, {"searched": a, "baseline": b}, reference="baseline")
    assert out["contenders"]["searched"]["fid"]["verdict"] == "better"
    assert out["disagreements"]["searched"] == ["pixel_fd says worse where fid says better"]


# ----------------------------------------------------------------------------------------------- baselines
def test_single_member_sampler_reaches_every_nfe_like_dpm_solver_fast():
    s = single_member_sampler("m", "dpm_solver", 3, "logsnr_uniform", 7, NOISE)
    assert s.nfe == 7 and s.orders == [3, 3, 1]
    assert single_member_sampler("m", "dpm_solver", 2, "karras", 5, NOISE).orders == [2, 2, 1]
    assert single_member_sampler("m", "heun", None, "karras", 5, NOISE) is None
    assert single_member_sampler("m", "heun", None, "karras", 6, NOISE).nfe == 6
    for solver in ("ddim", "dpm_solver++", "dpm_solver++3m"):
        assert single_member_sampler("m", solver, None, "time_uniform", 9, NOISE).nfe == 9


def test_fitting_nfes():
    assert fitting_nfes(0.1, 0.95, "all") == list(range(1, 10))
    assert fitting_nfes(0.1, 1.0, "largest") == [10]  # exactly on budget fits
    assert fitting_nfes(0.1, 0.95, 3) == [7, 8, 9]
    assert fitting_nfes(0.1, 2.0, "largest") == [14, 20]  # the largest of each t_end regime (1e-3 below 15 NFE)
    assert fitting_nfes(0.1, 2.0, 2) == [13, 14, 19, 20]
    with pytest.raises(UserError):
        fitting_nfes(0.1, 0.95, 0)


def test_baselines_cover_every_member_solver_spacing_within_budget():
    latency = {"big": 0.02, "small": 0.01}  # big fits 6 NFEs: every sampler makes >= 2 steps, so spacings differ
    budget = 0.125
    out = single_member_baselines(["big", "small"], NOISE, latency, budget, nfes="all")
    combos = {(s.meta["member"], s.meta["sampler"], s.meta["spacing"]) for s in out}
    samplers = {solver if order is None else f"{solver}-{order}" for solver, order in SAMPLERS}
    assert samplers == {"ddim", "dpm_solver-2", "dpm_solver-3", "dpm_solver++", "dpm_solver++3m", "heun"}
    assert combos == {(m, k, sp) for m in latency for k in samplers for sp in SPACINGS}
    assert all(s.cost(latency) <= budget * (1 + 1e-9) for s in out)
    for member, most in (("big", 6), ("small", 12)):
        nfes = {s.nfe for s in out if s.meta["member"] == member and s.meta["sampler"] == "ddim"}
        assert nfes == set(range(1, most + 1))  # every integer NFE that fits, the largest included
    largest = single_member_baselines(["big", "small"], NOISE, latency, budget, nfes="largest")
    assert {s.nfe for s in largest if s.meta["member"] == "small" and s.meta["sampler"] != "heun"} == {12}
    assert {s.nfe for s in largest if s.meta["member"] == "big" and s.meta["sampler"] == "heun"} == {6}
    odd = single_member_baselines(["small"], NOISE, {"small": 0.01}, 0.11, nfes="largest")
    assert {s.nfe for s in odd if s.meta["sampler"] == "heun"} == {10}  # 11 is odd: the next one down
    assert len({schedule_key(s) for s in out}) == len(out)


# ----------------------------------------------------------------------------------------------- equal quality
def _decreasing(schedule):
    return [100.0 / schedule.nfe] * 3  # FID 100 / NFE on every seed


def test_cost_at_equal_quality_is_the_cheapest_reaching_nfe():
    family = single_member_sampler("m", "dpm_solver++", None, "karras", 4, NOISE)
    ev = FakeEvaluation(_decreasing)
    out = cost_at_equal_quality(ev, family, target=100.0 / 13 + 1e-9, latency=0.01, max_cost=0.4)
    assert out["nfe"] == 13 and out["cost"] == pytest.approx(0.13) and out["sampler"] == "dpm_solver++"
    assert ev.calls <= 2 * (2 + math.ceil(math.log2(40)))  # bisection per t_end regime, not a walk over every NFE
    again = cost_at_equal_quality(FakeEvaluation(_decreasing), family, 100.0 / 13 + 1e-9, 0.01, 0.4, known_nfe=20)
    assert again["nfe"] == 13
    assert cost_at_equal_quality(FakeEvaluation(_decreasing), family, target=1.0, latency=0.01, max_cost=0.4) is None


def test_cost_at_equal_quality_survives_the_t_end_switch():
    """Quality jumps back at 15 NFE (t_end 1e-3 → 1e-4): the cheap regime's answer must not be missed because the
    largest NFE is worse."""
    family = single_member_sampler("m", "dpm_solver++", None, "karras", 4, NOISE)
    worse_later = FakeEvaluation(lambda s: [100.0 / s.nfe if s.nfe < 15 else 10.0] * 3)
    assert cost_at_equal_quality(worse_later, family, target=8.0, latency=0.01, max_cost=0.4)["nfe"] == 13
    only_later = FakeEvaluation(lambda s: [8.0 if s.nfe < 15 else 100.0 / s.nfe] * 3)
    assert cost_at_equal_quality(only_later, family, target=5.0, latency=0.01, max_cost=0.4)["nfe"] == 20


def test_cost_at_equal_quality_of_a_sampler_against_itself_is_at_most_its_own_cost():
    """More NFEs can be worse (11 best, 14 worse): the baseline's own NFE reaches its own mean, so the answer is
    never 'not reached'."""
    family = single_member_sampler("m", "dpm_solver++", None, "karras", 11, NOISE)
    dip = FakeEvaluation(lambda s: [5.0 if s.nfe in (10, 11) else 6.0 + (s.nfe < 10) * (10 - s.nfe)] * 3)
    out = cost_at_equal_quality(dip, family, target=5.0, latency=0.01, max_cost=0.17, known_nfe=11)
    assert out["nfe"] == 10


def test_cost_at_equal_quality_keeps_heun_on_even_nfes():
    family = single_member_sampler("m", "heun", None, "karras", 4, NOISE)
    out = cost_at_equal_quality(FakeEvaluation(_decreasing), family, target=100.0 / 9, latency=0.01, max_cost=0.4)
    assert out["nfe"] == 10


def test_scores_are_stored_per_seed_and_never_measured_twice(tmp_path):
    from conftest import TINY, write_member
    from oms_lightning.predictor.records import RecordStore
    from oms_lightning.zoo import Zoo

    write_member(tmp_path, "a", TINY)
    zoo = Zoo.load(tmp_path, "digits", ["a"])

    class CountingMetrics:
        calls = 0

        def score(self, images, seed):
            CountingMetrics.calls += 1
            return {m: float(images.mean()) + seed for m in METRICS}

    def store(seed):
        return RecordStore(tmp_path / f"eval{seed}.jsonl", zoo.fingerprint(), {"n": 4, "seed": seed})

    s = single_member_sampler("a", "ddim", None, "karras", 3, NOISE)
    first = Evaluation(zoo, CountingMetrics(), [5, 6], 4, store=store).score(s)
    assert CountingMetrics.calls == 2 and first["fid"][1] - first["fid"][0] == pytest.approx(1.0, abs=0.5)
    again = Evaluation(zoo, CountingMetrics(), [5, 6, 7], 4, store=store).score(s)  # a new process, one seed more
    assert CountingMetrics.calls == 3 and again["fid"][:2] == first["fid"]
