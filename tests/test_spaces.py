"""The search-space protocol, for every space: valid decodes, stable keys, operators that keep validity, determinism
under a seed, repair into the budget; single-member samplers are points of the sampler spaces; the time genes keep
the grid ordered with fixed ends; and a search whose optimum is a single-member sampler finds it."""
import numpy as np
import pytest

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.samplers import sampler_anchors, single_member_baselines, single_member_sampler
from oms_lightning.schedule import schedule_key
from oms_lightning.search.evolution import evolve
from oms_lightning.search.space import (JITTER_MAX, SPACE_KINDS, Genome, SamplerSpace, encode_exactly, make_space,
                                        make_spaces)

NOISE = VPSchedule()
MEMBERS = ("a", "b", "c")
LATENCY = {"a": 1.0, "b": 2.0, "c": 4.0}
KINDS = [k for k in SPACE_KINDS if k != "all"]


def cost(s):
    return s.cost(LATENCY)


@pytest.mark.parametrize("kind", KINDS)
def test_protocol_properties(kind):
    space = make_space(kind, MEMBERS, NOISE, 12)
    rng = np.random.default_rng(0)
    unit = np.array([LATENCY[m] for m in MEMBERS])
    for _ in range(40):
        a, b = space.sample_genotype(rng, 0.5), space.sample_genotype(rng, 0.5)
        for g in (a, space.mutate(a, rng), space.crossover(a, b, rng), space.mutate(space.crossover(a, b, rng), rng)):
            s = space.decode(g).validate(MEMBERS, t_min=NOISE.t_min)
            assert space.key(g) == space.key(g) and schedule_key(space.decode(g)) == schedule_key(s)
            repaired = space.repair(g, rng, unit, 10.0, 12.0, lambda x: cost(space.decode(x)))
            assert cost(space.decode(repaired)) <= 12.0
    # deterministic under a seed
    runs = []
    for _ in range(2):
        r = np.random.default_rng(7)
        g = space.sample_genotype(r, 0.5)
        for _ in range(10):
            g = space.mutate(space.crossover(g, space.sample_genotype(r, 0.5), r), r)
        runs.append(schedule_key(space.decode(g)))
    assert runs[0] == runs[1]


def test_equal_keys_mean_equal_schedules():
    space = make_space("sampler:dpm_solver", MEMBERS, NOISE, 15)
    rng = np.random.default_rng(1)
    by_key = {}
    for _ in range(300):
        g = space.mutate(space.sample_genotype(rng, 0.6), rng)
        by_key.setdefault(space.key(g), set()).add(schedule_key(space.decode(g)))
    assert all(len(v) == 1 for v in by_key.values())


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver", "dpm_solver++", "dpm_solver++3m", "heun"])
def test_every_single_member_baseline_is_a_point_of_its_sampler_space(solver):
    space = make_space(f"sampler:{solver}", MEMBERS, NOISE, 30)
    baselines = [s for s in single_member_baselines(MEMBERS, NOISE, LATENCY, 24.0, nfes="all") if s.solver == solver]
    assert len(baselines) > 20
    for s in baselines:
        assert schedule_key(space.decode(space.encode(s))) == schedule_key(s), s.compact()


def test_encode_refuses_what_the_space_cannot_express():
    space = make_space("sampler:ddim", MEMBERS, NOISE, 4)
    with pytest.raises(UserError, match="not in this space"):
        space.encode(single_member_sampler("a", "heun", None, "karras", 4, NOISE))
    with pytest.raises(UserError, match="not in this space"):
        space.encode(single_member_sampler("a", "ddim", None, "karras", 6, NOISE))  # 6 steps > 4


def test_time_genes_keep_the_grid_ordered_with_fixed_ends():
    space = SamplerSpace(MEMBERS, "ddim", 8, NOISE)
    plain = Genome(np.ones((8, 1), dtype=np.int64), 2, np.zeros(7))
    base = space.decode(plain).times
    for jitter in (np.full(7, JITTER_MAX), np.full(7, -JITTER_MAX), np.random.default_rng(0).uniform(-.9, .9, 7)):
        times = space.decode(Genome(plain.slots, 2, jitter)).times
        assert times[0] == base[0] and times[-1] == base[-1]
        assert all(x > y for x, y in zip(times, times[1:])) and times != base
    frozen = SamplerSpace(MEMBERS, "ddim", 8, NOISE, time_genes=False)
    assert frozen.decode(Genome(plain.slots, 2, np.full(7, 0.5))).times == base


def test_heun_rows_stay_whole():
    space = make_space("sampler:heun", MEMBERS, NOISE, 12)
    rng = np.random.default_rng(3)
    for _ in range(100):
        g = space.mutate(space.sample_genotype(rng, 0.5), rng)
        assert all(s.order == 2 for s in space.decode(g).steps)


def test_anchors_and_kind_all():
    spaces = make_spaces("all", MEMBERS, NOISE, 12)
    assert type(spaces[0]).__name__ == "SlotSpace" and spaces[0].max_steps == 4
    assert sorted(sp.solver for sp in spaces[1:]) == ["ddim", "dpm_solver", "dpm_solver++", "dpm_solver++3m", "heun"]
    anchors = sampler_anchors(make_space("sampler:dpm_solver", MEMBERS, NOISE, 12), [6])
    assert {tuple(s.orders) for s in anchors} == {(2, 2, 2), (3, 3)} and len(anchors) == 3 * 2  # karras only


def target_objective(target):
    """0 at `target`, growing with the number of wrong members, the NFE gap and the λ-distance of the grids."""
    lam_t = NOISE.lambda_(np.asarray(target.times)) if False else None  # noqa: F841 (kept simple below)

    def score(schedules):
        out = []
        for s in schedules:
            wrong = sum(m != "b" for m in s.members_per_nfe)
            gap = abs(s.nfe - target.nfe)
            grid = 0.0
            if len(s.times) == len(target.times):
                grid = float(np.abs(np.log(s.times) - np.log(target.times)).sum())
            out.append(wrong + gap + grid + (0.0 if s.solver == target.solver else 5.0))
        return np.array(out)

    return score


def test_search_finds_a_single_member_sampler_that_is_the_optimum():
    target = single_member_sampler("b", "heun", None, "karras", 6, NOISE)
    space = make_space("sampler:heun", MEMBERS, NOISE, 16)
    r = evolve(space, target_objective(target), cost, 12.0, population=20, children=20, generations=60, seed=0,
               null_prob=0.5)
    assert schedule_key(r.best.schedule) == schedule_key(target) and r.best.score == 0.0


# ----------------------------------------------------------------------------------------------- AYS time grids
def ays_levels_for(scale: float):
    """Two refinement levels of a made-up AYS schedule (EDM-like, distinct per member through `scale`)."""
    from oms_lightning.diffusion.ays import edm_sigmas, insert_log_midpoints, sigma_of_t

    lo, hi = sigma_of_t(NOISE, 1e-3).item(), sigma_of_t(NOISE, 1.0).item()
    ten = edm_sigmas(lo, hi, 5, rho=scale)
    return (tuple(ten.tolist()), tuple(insert_log_midpoints(ten).tolist()))


AYS = {("a", "dpm_solver++"): ays_levels_for(5.0), ("b", "dpm_solver++"): ays_levels_for(9.0),
       ("a", "ddim"): ays_levels_for(3.0)}


def test_ays_schedules_join_the_baselines_and_the_time_grids_of_their_solver():
    from oms_lightning.diffusion.ays_steps import ays_sigmas, times_from_sigmas

    s = single_member_sampler("a", "dpm_solver++", None, "ays", 5, NOISE, AYS)
    assert s.times == pytest.approx(times_from_sigmas(ays_sigmas(AYS[("a", "dpm_solver++")], 5), NOISE))
    assert s.meta["spacing"] == "ays"
    assert single_member_sampler("c", "dpm_solver++", None, "ays", 5, NOISE, AYS) is None   # c has none
    assert single_member_sampler("a", "heun", None, "ays", 6, NOISE, AYS) is None          # not for heun
    with_ays = single_member_baselines(MEMBERS, NOISE, LATENCY, 24.0, nfes="all", ays=AYS)
    plain = single_member_baselines(MEMBERS, NOISE, LATENCY, 24.0, nfes="all")
    extra = [b for b in with_ays if b.meta["spacing"] == "ays"]
    assert len(with_ays) == len(plain) + len(extra)
    assert {(b.meta["member"], b.solver) for b in extra} == set(AYS)

    space = make_space("sampler:dpm_solver++", MEMBERS, NOISE, 12, AYS)
    assert space.spacings[-2:] == ("ays:a", "ays:b")
    assert "ays:a" not in make_space("sampler:heun", MEMBERS, NOISE, 12, AYS).spacings
    for b in extra:
        if b.solver == "dpm_solver++" and len(b.steps) <= space.max_steps:
            assert encode_exactly(space, b) is not None
    # a mixed-member schedule on b's AYS grid: any member assignment may use any member's grid
    g = Genome(np.array([[1], [2], [3], [1], [2]] + [[0]] * (space.max_steps - 5)), space.spacings.index("ays:b"),
               np.zeros(space.max_steps - 1))
    mixed = space.decode(g)
    assert mixed.member_names == ["a", "b", "c"] and mixed.meta["spacing"] == "ays:b"
    assert mixed.times == pytest.approx(times_from_sigmas(ays_sigmas(AYS[("b", "dpm_solver++")], 5), NOISE))


def test_members_with_ays_steps_anchor_the_predictor_on_their_own_ays_times():
    anchors = sampler_anchors(make_space("sampler:dpm_solver++", MEMBERS, NOISE, 12, AYS), [4, 8])
    on_ays = {(s.meta["member"], s.nfe) for s in anchors if s.meta["spacing"] == "ays"}
    assert on_ays == {("a", 4), ("a", 8), ("b", 4), ("b", 8)}              # c has no AYS steps
    assert {(s.meta["member"], s.nfe) for s in anchors if s.meta["spacing"] == "karras"} == {
        (m, n) for m in MEMBERS for n in (4, 8)}
    a8 = next(s for s in anchors if s.meta["spacing"] == "ays" and s.meta["member"] == "a" and s.nfe == 8)
    assert a8 == single_member_sampler("a", "dpm_solver++", None, "ays", 8, NOISE, AYS)
    without = sampler_anchors(make_space("sampler:dpm_solver++", MEMBERS, NOISE, 12), [4, 8])
    assert all(s.meta["spacing"] == "karras" for s in without)


def test_protocol_properties_with_ays_grids():
    space = make_space("sampler:dpm_solver++", MEMBERS, NOISE, 12, AYS)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(60):
        a, b = space.sample_genotype(rng, 0.5), space.sample_genotype(rng, 0.5)
        for g in (space.mutate(a, rng), space.crossover(a, b, rng)):
            space.decode(g).validate(MEMBERS, t_min=NOISE.t_min)
            seen.add(space.spacings[g.spacing])
    assert {"ays:a", "ays:b"} <= seen
    with pytest.raises(UserError, match="spacings must be a non-empty subset"):
        SamplerSpace(MEMBERS, "ddim", 4, NOISE, spacings=("karras", "ays:zz"))


# ----------------------------------------------------------------------------------------------- valid time ranges
STAGED = ("a", "m", "m.s0", "m.s1")          # a plain member, a routed multi-decoder net and two of its stages


@pytest.mark.parametrize("kind", KINDS)
def test_spaces_only_make_assignments_inside_the_members_time_ranges(kind):
    from oms_lightning.zoo import MemberRanges

    ranges = MemberRanges((("m.s0", 0.0, 0.4), ("m.s1", 0.4, 1.0)))
    space = make_space(kind, STAGED, NOISE, 12, ranges=ranges)
    rng = np.random.default_rng(0)
    unit = np.array([1.0, 2.0, 1.5, 0.5])
    latency = dict(zip(STAGED, unit))
    used = set()
    for _ in range(30):
        a, b = space.sample_genotype(rng, 0.5), space.sample_genotype(rng, 0.5)
        for g in (a, space.mutate(a, rng), space.crossover(a, b, rng),
                  space.repair(a, rng, unit, 6.0, 8.0, lambda x: space.decode(x).cost(latency))):
            s = space.decode(g)
            assert ranges.out_of_range(s, NOISE) == [], s.compact()
            used |= set(s.member_names)
    assert {"m.s0", "m.s1"} <= used            # the stages are used, where they are valid
    # an evolution on it never proposes an out-of-range schedule
    result = evolve(space, lambda ss: [len(x.member_names) - x.nfe for x in ss], lambda x: x.cost(latency), 10.0,
                    population=8, children=8, generations=4, seed=0)
    assert all(ranges.out_of_range(c.schedule, NOISE) == [] for c in result.population)


def test_the_joint_space_with_time_frozen_is_the_members_only_search():
    """members_only_spaces (the joint search's first ablation): no time genes, no AYS grids, every schedule on its
    family's logSNR-uniform grid — what remains to search is the members (and the step count)."""
    from oms_lightning.diffusion.spacing import default_t_end, timesteps
    from oms_lightning.search.outcome import members_only_spaces

    joint = make_spaces("all", MEMBERS, NOISE, 12, AYS)
    frozen = members_only_spaces(joint)
    assert [type(s) for s in frozen] == [type(s) for s in joint]
    rng = np.random.default_rng(5)
    for space in frozen:
        if not isinstance(space, SamplerSpace):
            continue
        assert not space.time_genes and space.spacings == ("logsnr_uniform",) and space.ays == ()
        for _ in range(20):
            s = space.decode(space.mutate(space.sample_genotype(rng, 0.5), rng))
            grid = timesteps("logsnr_uniform", len(s.steps), NOISE, t_end=default_t_end(s.nfe)).tolist()
            assert s.times == pytest.approx(grid, abs=1e-12)
