"""Selection on the selection seed (never reported): true FIDs per sample count (`Selection`), the strongest
single-member baseline, the candidates of the evolution, and the refinement around them (`search/refine.py`)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from oms_lightning.diffusion.ays_steps import AYS, AYSTable
from oms_lightning.predictor.records import RecordStore, fid_settings
from oms_lightning.progress import job_log
from oms_lightning.samplers import fitting_nfes, single_member_baselines, single_member_sampler
from oms_lightning.schedule import ModelSchedule, schedule_key
from oms_lightning.search.dataset import in_range, measure, store_for
from oms_lightning.search.refine import Refinement, neighbours, refine
from oms_lightning.search.segments import (Sampler, probe_runs, rank_samplers, segment_schedules, spread_by_family,
                                           two_segment_runs)
from oms_lightning.zoo import FULL, Zoo

log = job_log("search")


class Selection:
    """True FID on the *selection* seed (another seed than the dataset's), one record store per sample count: the
    re-rank, the baseline choice and the refinement's races measure here — never to report. Sample i always starts
    from noise (seed, i), so every schedule sees the same noise (common random numbers: paired differences), and
    a schedule measured once is never measured again, in this run or the next."""

    def __init__(self, cfg: DictConfig, zoo: Zoo, evaluator, profile, cache: Path):
        self.cfg, self.zoo, self.evaluator, self.profile, self.cache = cfg, zoo, evaluator, profile, cache
        self.seed, self.n = int(cfg.search.rerank.seed), int(cfg.search.rerank.n_samples)
        self.stores: dict[int, RecordStore] = {}

    def store(self, n: int) -> RecordStore:
        if n not in self.stores:
            self.stores[n] = store_for(self.cache, "rerank", self.zoo, fid_settings(self.evaluator, n, self.seed))
        return self.stores[n]

    def records(self, schedules: list[ModelSchedule], n: int | None = None) -> list[dict]:
        n = self.n if n is None else int(n)
        return measure(self.cfg, self.zoo, schedules, self.store(n), self.evaluator, n, self.seed, self.profile,
                       progress=len(schedules) > 1)

    def __call__(self, schedules: list[ModelSchedule]) -> list[dict]:
        """Records at the selection's own sample count (the re-rank)."""
        return self.records(schedules)

    def fid_at(self, schedules: list[ModelSchedule], n: int) -> list[float]:
        return [float("inf") if r["fid"] is None else r["fid"] for r in self.records(schedules, n)]


def choose_baseline(cfg: DictConfig, zoo: Zoo, profile, budget: float, rerank: Selection,
                    ays: AYSTable) -> tuple[ModelSchedule, list[dict], list[ModelSchedule]]:
    """The strongest single-member sampler within the budget, chosen on the selection seed: every member × solver
    × spacing (AYS included where a member has steps) at the NFEs `evaluation.baseline_nfes` allows, and each
    member's best of those at every other NFE that fits (the member's FID-vs-cost curve: quality is not monotone
    in NFE, so a smaller NFE may win). Returns (the chosen schedule, every candidate's record, the candidates best
    first)."""
    candidates = in_range(zoo, single_member_baselines(zoo.names, zoo.noise_schedule, profile.latency, budget,
                                                       nfes=cfg.search.evaluation.baseline_nfes, ays=ays))
    log(f"budget {1000 * budget:.0f} ms: choosing the baseline among {len(candidates)} single-member samplers "
        f"(selection seed {cfg.search.rerank.seed}, cached)")
    records = rerank(candidates)
    curve = member_curves(zoo, profile, budget, candidates, records, ays) if cfg.search.evaluation.curves else []
    if curve:
        log(f"budget {1000 * budget:.0f} ms: each member's best sampler at every NFE that fits ({len(curve)} more)")
        candidates, records = candidates + curve, records + rerank(curve)
    records = [{**r, "cost": profile.cost(s)} for r, s in zip(records, candidates)]
    order = sorted(range(len(records)), key=lambda j: records[j]["fid"])
    return candidates[order[0]], records, [candidates[j] for j in order]


def member_curves(zoo: Zoo, profile, budget: float, candidates: list[ModelSchedule], records: list[dict],
                  ays: AYSTable) -> list[ModelSchedule]:
    """Per member, its best sampler among `candidates` (by selection FID) at every NFE within the budget that is
    not among them yet."""
    known = {schedule_key(s) for s in candidates}
    best: dict[str, ModelSchedule] = {}
    for s, r in sorted(zip(candidates, records), key=lambda p: p[1]["fid"]):
        best.setdefault(s.meta["member"], s)
    out = []
    for member, s in best.items():
        m = s.meta
        for nfe in fitting_nfes(profile.latency[member], budget, "all"):
            c = single_member_sampler(member, m["solver"], m["order"], m["spacing"], nfe, zoo.noise_schedule, ays)
            if c is not None and schedule_key(c) not in known:
                known.add(schedule_key(c))
                out.append(c)
    return in_range(zoo, out)


def candidates(results: list, top_k: int, per_space: int) -> list[ModelSchedule]:
    """What the selection seed re-ranks: the top-k by predicted score over every space, plus the best `per_space`
    of each space (one predictor ranks several solver families less well than it ranks within one)."""
    pooled = sorted((c for r in results for c in r.population), key=lambda c: c.score)
    chosen = {}
    for c in pooled[:top_k] + [c for r in results for c in r.top(per_space)]:
        chosen.setdefault(schedule_key(c.schedule), c.schedule)
    return list(chosen.values())


def best_on_selection_seed(schedules: list[ModelSchedule], rerank) -> ModelSchedule:
    records = rerank(schedules)
    return schedules[min(range(len(records)), key=lambda i: records[i]["fid"])]


def segment_candidates(cfg: DictConfig, singles: list[ModelSchedule], latency: dict, budget: float, zoo: Zoo,
                       selection: Selection, n: int) -> tuple[list[ModelSchedule], int]:
    """Two-segment schedules (OMS-DPM's "one member first, another after", which the predictor ranks worst) as the
    refinement's starting points: the `refine.probe_pairs` best solver/spacing pairs of the baseline pool are
    probed on `refine.probes` of them at n samples (`segments.probe_runs`; pairs rank differently once members mix),
    and `refine.segments` schedules are shared over the `refine.seed_samplers` pairs that mixed best and the best
    single sampler's pair, each pair's share spread over its families (`segments.spread_by_family`). Returns
    (segment schedules, the number of probe schedules measured)."""
    rf = cfg.search.refine
    members = {m: latency[m] for m in zoo.names if zoo.time_range(m) == FULL and m in latency}
    runs = two_segment_runs(members, budget)
    samplers = list(dict.fromkeys(s for s in map(Sampler.of, singles) if s is not None and s.spacing != AYS))
    if not runs or not samplers or len(members) < 2:
        return [], 0
    probes = probe_runs(members, budget, singles[0].meta.get("member", ""), int(rf.probes))
    probed_pairs = samplers[: int(rf.probe_pairs)]      # the pool is best first: the tail rarely mixes best either
    ranked = rank_samplers(probed_pairs, probes, zoo.noise_schedule, selection.fid_at, n) if int(rf.probes) else []
    chosen = list(dict.fromkeys([s for s, _ in ranked[: int(rf.seed_samplers)]] + samplers[:1]))
    quota = [int(rf.segments) // len(chosen) + (i < int(rf.segments) % len(chosen)) for i in range(len(chosen))]
    segments = [s for sampler, q in zip(chosen, quota)   # each pair's family evenly over its splits, best pair first
                for s in spread_by_family(in_range(zoo, segment_schedules(runs, [sampler], zoo.noise_schedule)), q)]
    probed = len(segment_schedules(probes, probed_pairs, zoo.noise_schedule)) if ranked else 0
    return segments, probed


def refine_budget(cfg: DictConfig, zoo: Zoo, profile, budget: float, measured: list[ModelSchedule],
                  baseline: ModelSchedule, singles: list[ModelSchedule], selection: Selection) -> Refinement | None:
    """The refinement stage (`search/refine.py`): true FID around the re-ranked candidates and single-member
    samplers already measured (`measured`, the baseline among them), seeded with two-segment schedules on the
    solver/spacing pairs that mix best; None with `search.refine.evaluations=0`."""
    rf = cfg.search.refine
    if int(rf.evaluations) <= 0:
        return None
    rungs = [*(int(n) for n in rf.rungs if int(n) < selection.n), selection.n]
    segments, probed = segment_candidates(cfg, singles, profile.latency, budget, zoo, selection, rungs[0])
    log(f"budget {1000 * budget:.0f} ms: refining by true FID on the selection seed ({rf.evaluations} evaluations, "
        f"rungs {rungs} samples, {len(segments)} segment schedules to start, {probed} probes of mixing)")

    def move(s: ModelSchedule) -> list[ModelSchedule]:
        return neighbours(s, zoo.names, zoo.noise_schedule, profile.cost, budget,
                          valid=lambda n: not zoo.out_of_range(n))

    result = refine(measured, baseline, segments, selection.fid_at, profile.cost, move, rungs=rungs,
                    evaluations=max(0, int(rf.evaluations) - probed), keep=float(rf.keep), width=int(rf.width),
                    per_round=int(rf.per_round), cheapest_share=float(rf.cheapest_share),
                    confirm=int(rf.confirm), confirm_top=int(rf.confirm_top), seed=cfg.seed, log=log)
    result.evaluations += probed   # the probes were true evaluations too
    if int(rf.confirm) > selection.n:
        log(f"budget {1000 * budget:.0f} ms: confirmed at {rf.confirm} samples: best {result.best.compact()}, "
            f"cheapest at the baseline's quality {result.cheapest.compact()}")
    return result
