"""The evaluation stage of one budget: the searched schedule, the cheapest one at the baseline's quality and the
baseline scored on fresh seeds through `oms_lightning.evaluation` (paired intervals, verdicts, non-inferiority),
and the joint search's ablation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from oms_lightning.diffusion.ays_steps import AYSTable
from oms_lightning.evaluation import PRIMARY, Evaluation, compare, non_inferiority
from oms_lightning.metrics import METRICS, FIDEvaluator, sample_metrics_for, search_evaluator_for
from oms_lightning.predictor.module import rank_metrics_near
from oms_lightning.predictor.records import fid_settings
from oms_lightning.progress import job_log, stage
from oms_lightning.samplers import cost_at_equal_quality, same_steps_single_member
from oms_lightning.schedule import ModelSchedule, schedule_key
from oms_lightning.search.dataset import store_for, with_iia
from oms_lightning.search.refine import Refinement
from oms_lightning.search.selection import (Selection, best_on_selection_seed, candidates, choose_baseline,
                                            refine_budget)
from oms_lightning.search.space import SamplerSpace, encode_exactly
from oms_lightning.zoo import Zoo, machine_speed_change, time_schedules

log = job_log("search")


@dataclasses.dataclass
class Measures:
    """Everything that measures quality, built once per search: the FID evaluator over the data, the selection
    seed's stores (`Selection`), the fresh-seed `Evaluation` and the real-vs-real noise floor."""

    evaluator: FIDEvaluator
    selection: Selection
    evaluation: Evaluation
    noise_floor: dict


def measures(cfg: DictConfig, zoo: Zoo, profile, device, seeds: list[int]) -> Measures:
    cache, e = Path(cfg.paths.cache), cfg.search.evaluation
    sample_metrics = sample_metrics_for(cfg.data, cfg.paths.checkpoints, device)   # what is reported
    evaluator = search_evaluator_for(sample_metrics, cfg.data, cfg.paths.checkpoints)   # what the search selects on
    evaluation = Evaluation(zoo, sample_metrics, seeds, int(e.n), cfg.search.dataset.batch_size, progress=log,
                            store=lambda seed: store_for(cache, f"eval{seed}", zoo, {
                                **fid_settings(sample_metrics.evaluator, int(e.n), seed), "metrics": list(METRICS)}))
    return Measures(evaluator, Selection(cfg, zoo, evaluator, profile, cache), evaluation,
                    sample_metrics.noise_floor(int(e.n), seed=seeds[0]))


def evaluate_budget(cfg: DictConfig, zoo: Zoo, profile, results: list, spaces: list, selection: Selection,
                    evaluation: Evaluation, noise_floor: dict, predictor_metrics: dict, ays: AYSTable,
                    members_only: list | None) -> dict:
    """One budget, in order: choose the baseline on the selection seed, re-rank the search's candidates (and the
    baseline itself when the spaces contain it: a search never loses to a point it could have chosen) on the same
    seed, refine around them by true FID, then score the best schedule, the cheapest one at the baseline's quality
    and the baseline on fresh seeds (paired intervals, verdicts, non-inferiority), time them, predictor τ near the
    budget."""
    budget = results[0].budget
    with stage("baseline choice"):
        baseline, baseline_records, singles = choose_baseline(cfg, zoo, profile, budget, selection, ays)
    plain_top = rerank_candidates(cfg, results, spaces, baseline)
    # iia=rerank: the corrected versions compete beside the plain ones (IIA may hurt FID)
    top = plain_top + (with_iia(cfg, zoo, plain_top) if cfg.search.iia == "rerank" else [])
    with stage("re-rank"):
        reranked = selection(top)
    with stage("refinement"):
        refinement = refine_budget(cfg, zoo, profile, budget, top + singles, baseline, singles, selection)
    if refinement is None:
        w = min(range(len(reranked)), key=lambda j: reranked[j]["fid"])
        winner, winner_fid, cheapest = top[w], reranked[w]["fid"], None
    else:
        winner, cheapest = refinement.best, refinement.cheapest
        winner_fid = refinement.fid(winner)
    contenders = {"searched": winner, "baseline": baseline}
    if cheapest is not None and schedule_key(cheapest) not in map(schedule_key, contenders.values()):
        contenders["equal_quality"] = cheapest
    with stage("fresh-seed evaluation"):
        comparison = compare(evaluation, contenders, reference="baseline", noise_floor=noise_floor)
    equal_quality = (None if cheapest is None else
                     equal_quality_row(cfg, comparison, contenders, cheapest, baseline, profile, refinement))
    with stage("baseline cost at equal FID"):
        equal = cost_at_equal_quality(evaluation, baseline, evaluation.mean(winner),
                                      profile.latency[baseline.meta["member"]],
                                      max_cost=cfg.search.evaluation.equal_quality_max_budgets * budget,
                                      known_nfe=baseline.nfe, ays=ays)
    log(f"budget {1000 * budget:.0f} ms: timing winner and baseline, interleaved")
    with stage("wall-time check"):
        walls, latency_now = time_schedules(zoo, [winner, baseline], profile.batch_size,
                                            rounds=cfg.search.evaluation.timing_rounds, profile_rounds=True)
    test = predictor_metrics.get("test_predictions")
    near = rank_metrics_near(test["score"], test["fid"], test["cost"], budget) if test else None
    ablation = (joint_ablation(cfg, zoo, profile, selection, evaluation, noise_floor, baseline, singles, winner,
                               plain_top, members_only) if members_only is not None else None)
    return {"budget": budget, "results": results, "winner": winner, "ablation": ablation,
            "winner_record": {"fid": winner_fid, "extractor": reranked[0]["extractor"]},
            "winner_is_baseline": schedule_key(winner) == schedule_key(baseline),
            "baseline": baseline, "baseline_records": baseline_records, "refinement": refinement,
            "equal_quality": equal_quality,
            "costs": {"searched": profile.cost(winner), "baseline": profile.cost(baseline)},
            "comparison": comparison, "equal": equal, "walls": walls, "tau_near_budget": near,
            "costs_now": {"searched": winner.cost(latency_now), "baseline": baseline.cost(latency_now)},
            "machine_speed_change": machine_speed_change(profile.latency, latency_now),
            "same_steps": same_steps_single_member(winner, zoo, selection)}


def rerank_candidates(cfg: DictConfig, results: list, spaces: list, baseline: ModelSchedule) -> list[ModelSchedule]:
    """The evolution's best per space for the re-rank, and the baseline itself when the spaces can express it: a
    search never loses to a point it could have chosen."""
    top = candidates(results, cfg.search.rerank.top_k, cfg.search.rerank.top_per_space)
    expressible = any(encode_exactly(space, baseline) is not None for space in spaces)
    if expressible and schedule_key(baseline) not in {schedule_key(s) for s in top}:
        top.append(baseline)
    return top


def equal_quality_row(cfg: DictConfig, comparison: dict, contenders: dict, cheapest: ModelSchedule,
                      baseline: ModelSchedule, profile, refinement: Refinement) -> dict:
    """The second objective's verdict: the cheapest schedule the refinement found at the baseline's selection
    quality, tested on the fresh seeds for non-inferiority to the baseline (margin: `evaluation.margin` × the
    baseline's fresh-seed FID)."""
    name = next(n for n, s in contenders.items() if schedule_key(s) == schedule_key(cheapest))
    rows = comparison["contenders"]
    base = rows["baseline"][PRIMARY]
    margin = float(cfg.search.evaluation.margin) * base["mean"]
    test = non_inferiority(rows[name][PRIMARY]["per_seed"], base["per_seed"], margin)
    cost, base_cost = profile.cost(cheapest), profile.cost(baseline)
    return {"schedule": cheapest.compact(), "contender": name, "cost": round(1000 * cost, 3),
            "baseline_cost": round(1000 * base_cost, 3), "speedup": base_cost / cost,
            "fid_mean": rows[name][PRIMARY]["mean"], "fid_ci": rows[name][PRIMARY]["ci"],
            "fid_select": refinement.fid(cheapest), "baseline_fid_select": refinement.fid(baseline),
            "diff": test["diff"], "upper": test["upper"], "margin": test["margin"],
            "margin_fraction": float(cfg.search.evaluation.margin), "confidence": test["confidence"],
            "non_inferior": test["holds"], "is_baseline": schedule_key(cheapest) == schedule_key(baseline)}


def members_only_spaces(spaces: list) -> list:
    """The same spaces with time fixed: each solver family on its logSNR-uniform grid, no time genes, no AYS grids
    (OMS-DPM's search over members, extended to every solver family): the joint search's first ablation."""
    return [dataclasses.replace(sp, time_genes=False, spacings=("logsnr_uniform",), ays=())
            if isinstance(sp, SamplerSpace) else sp for sp in spaces]


def joint_ablation(cfg: DictConfig, zoo: Zoo, profile, rerank, evaluation: Evaluation, noise_floor: dict,
                   baseline: ModelSchedule, singles: list[ModelSchedule], winner: ModelSchedule,
                   plain_top: list[ModelSchedule], members_only: list) -> dict:
    """What each ingredient of the joint search buys, every contender chosen on the selection seed and scored on
    the fresh seeds against the baseline: members only (time fixed) → + time genes and AYS grids → + IIA
    coefficients (the winner) → and the best single-member sampler with every tool: the top k of the baseline's
    pool (every member × solver × spacing, the members' AYS times included) and their IIA-corrected versions."""
    k, per_space = cfg.search.rerank.top_k, cfg.search.rerank.top_per_space
    top_singles = singles[:k]   # best first on the selection seed; the baseline is the first
    contenders = {"members_only": best_on_selection_seed(candidates(members_only, k, per_space), rerank),
                  "members_and_times": best_on_selection_seed(plain_top, rerank),
                  "joint": winner,
                  "single_member_ays_iia": best_on_selection_seed(top_singles + with_iia(cfg, zoo, top_singles),
                                                                  rerank),
                  "baseline": baseline}
    comparison = compare(evaluation, contenders, reference="baseline", noise_floor=noise_floor)
    return {"comparison": comparison, "schedules": {n: s.compact() for n, s in contenders.items()},
            "costs_ms": {n: 1000 * profile.cost(s) for n, s in contenders.items()}}
