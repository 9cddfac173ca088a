"""`python search.py budget=B`: zoo → latency profile → schedule→FID store → per budget: predictor → evolution
(SearchCallback) → the strongest single-member baseline chosen, the search's candidates re-ranked and refined by true
FID on a selection seed (`search/refine.py`) → the best schedule and the cheapest one at the baseline's quality scored
on fresh evaluation seeds by `oms_lightning.evaluation` → schedule, frontier plot and summary.json.

Every expensive stage is cached by zoo and settings as soon as it is done, so a multirun over budgets computes the
store and the predictor once and a killed search redoes only what it lost. Searches sharing a cache folder take
turns per stage (file locks in the cache folder) and reuse each other's results.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oms_lightning.diffusion.ays_steps import AYSTable, ays_table, optimize_command
from oms_lightning.diffusion.solvers import ODE_SOLVERS
from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text, file_lock
from oms_lightning.progress import STAGE_SECONDS, job_log, stage, waiting_for
from oms_lightning.samplers import single_member_baselines
from oms_lightning.search.callback import SearchCallback
from oms_lightning.search.dataset import build_dataset, in_range, measured_records
from oms_lightning.search.outcome import evaluate_budget, measures, members_only_spaces
from oms_lightning.search.predictor_cache import train_or_load_predictor
from oms_lightning.search.report import print_details, print_table, report_outcomes
from oms_lightning.search.settings import budget_in_nfes, check_evaluation_settings, resolve_budgets
from oms_lightning.search.space import make_spaces
from oms_lightning.training import ensure_zoo
from oms_lightning.zoo import Zoo, latency_path, load_or_profile, resolve_device


log = job_log("search")


# ----------------------------------------------------------------------------------------------- zoo
def load_ays(cfg: DictConfig, zoo: Zoo) -> dict:
    """`ays=auto`: the AYS steps files of the zoo's members (their own weights) for the ODE solvers, which join the
    search's time grids and the baselines; `ays=off`: none."""
    if cfg.ays not in ("auto", "off"):
        raise UserError(f"ays={cfg.ays!r}: choose auto (use the members' optimize_steps.py files) or off")
    if cfg.ays == "off":
        return {}
    table, missing = ays_table(cfg.paths.checkpoints, str(cfg.data.name),
                               {m: zoo.fingerprint([m]) for m in zoo.names}, ODE_SOLVERS)
    found = ", ".join(f"{m}/{s}" for m, s in table) or "none"
    log(f"AYS steps of this zoo's weights: {found}" + (
        f" (add one with `{optimize_command(missing[0][0], missing[0][1], str(cfg.data.name))}`)" if missing else ""))
    return table


def zoo_and_profile(cfg: DictConfig, device) -> tuple[Zoo, object]:
    """The zoo (missing members trained first, `ensure_zoo`) and its latency profile (measured or cached)."""
    ensure_zoo(cfg)
    zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=list(cfg.zoo.members), device=device)
    profile = load_or_profile(zoo, latency_path(cfg.paths.checkpoints, str(cfg.data.name)),
                              batch_size=cfg.profile.batch_size, device=device,
                              max_age_hours=cfg.profile.max_age_hours, max_spread=cfg.profile.max_spread)
    return zoo, profile


# ----------------------------------------------------------------------------------------------- evolution
def evolve(cfg: DictConfig, zoo: Zoo, profile, spaces: list, budget: float, predictor, ays: AYSTable):
    """The evolution stage: every space under the budget, scored by the predictor, starting from the best
    single-member samplers; with `search.ablation`, the same with time fixed. Returns (results, members-only
    results or None)."""
    initial = {budget: in_range(zoo, single_member_baselines(zoo.names, zoo.noise_schedule, profile.latency, budget,
                                                             nfes="largest", ays=ays))}
    evolution = {**OmegaConf.to_container(cfg.search.evolution, resolve=True), "null_prob": cfg.search.dataset.null_prob}
    results = SearchCallback(spaces, profile.cost, [budget], seed=cfg.seed, evolution=evolution,
                             initial=initial).search(predictor)[budget]
    if not cfg.search.ablation:
        return results, None
    log("ablation: the same evolution with time fixed (members and solver families only)")
    return results, SearchCallback(members_only_spaces(spaces), profile.cost, [budget], seed=cfg.seed,
                                   evolution=evolution, initial=initial).search(predictor)[budget]


# ----------------------------------------------------------------------------------------------- the job
def run(cfg: DictConfig) -> list[dict]:
    """The search as a straight line: zoo → profile → dataset → per budget (ascending): predictor (retrained on
    every true FID measured so far) → evolution → baseline, re-rank and refinement on the selection seed →
    fresh-seed evaluation (best FID; cheapest at the baseline's quality) → report."""
    started = time.perf_counter()
    seeds = check_evaluation_settings(cfg)
    device = resolve_device(str(cfg.device))
    STAGE_SECONDS.clear()
    with stage("zoo and latency profile"):
        zoo, profile = zoo_and_profile(cfg, device)
    cache = Path(cfg.paths.cache)
    budgets = resolve_budgets(cfg, profile.latency)
    log(f"zoo {list(zoo.names)}; latency per batch of {profile.batch_size} on {profile.device_name}: "
        + ", ".join(f"{n} {1000 * v:.1f} ms (spread {100 * profile.spread.get(n, 0):.0f} %)"
                    for n, v in profile.latency.items())
        + "".join(f"; routed {n} per stage {' / '.join(f'{1000 * v:.1f}' for v in r['latency'])} ms"
                  for n, r in profile.routed.items())
        + f"; budget(s) {', '.join(f'{1000 * b:.1f}' for b in budgets)} ms")

    m = measures(cfg, zoo, profile, device, seeds)
    ays = load_ays(cfg, zoo)
    spaces = make_spaces(str(cfg.search.space.kind), zoo.names, zoo.noise_schedule, int(cfg.search.space.size), ays,
                         zoo.ranges())
    with stage("schedule→FID dataset"):
        records, store = build_dataset(cfg, zoo, spaces, m.evaluator, profile, cache)

    from oms_lightning.tracking import make_logger

    logger = make_logger(cfg.logger, name=f"search-{cfg.data.name}-{'-'.join(f'{1000 * b:.0f}' for b in budgets)}ms",
                         group=f"search-{cfg.data.name}", config=OmegaConf.to_container(cfg, resolve=True))
    outcomes, predictor_metrics = [], {}
    max_steps = max(sp.max_steps for sp in spaces)
    for budget in budgets:   # ascending: each budget's true FIDs teach the predictor of the next
        known = records + measured_records(m.selection, profile, int(cfg.search.dataset.n_samples), records,
                                           max_steps)
        with stage("predictor"):
            predictor, predictor_metrics = train_or_load_predictor(cfg, zoo, known, cache, logger,
                                                                   max_steps=max_steps)
        with stage("evolution"):
            results, members_only = evolve(cfg, zoo, profile, spaces, budget, predictor, ays)
        with file_lock(cache / ".evaluation.lock", waiting=waiting_for):  # the selection and evaluation stores
            outcomes.append({**evaluate_budget(cfg, zoo, profile, results, spaces, m.selection, m.evaluation,
                                               m.noise_floor, predictor_metrics, ays, members_only),
                             "predictor_metrics": predictor_metrics, "n_records": len(known),
                             "budget_nfe": budget_in_nfes(budget, profile.latency)})

    run_dir = Path(cfg.paths.run_dir)
    with stage("report"):
        summaries = report_outcomes(outcomes, zoo, profile, run_dir, store_size=len(store), logger=logger,
                                    predictor_metrics=predictor_metrics, settings={
                                        "select_seed": int(cfg.search.rerank.seed),
                                        "n_select": int(cfg.search.rerank.n_samples),
                                        "eval_seeds": seeds, "n_eval": int(cfg.search.evaluation.n)})
    for s in summaries:
        s["wall_seconds_total"] = round(time.perf_counter() - started, 1)
        s["stage_seconds"] = {k: round(v, 1) for k, v in STAGE_SECONDS.items()}   # all budgets together
    atomic_write_text(run_dir / "summary.json", json.dumps(summaries[0] if len(summaries) == 1 else summaries,
                                                            indent=2) + "\n")
    if logger:
        logger.experiment.summary.update({f"search/{k}": v for k, v in summaries[0].items()
                                          if isinstance(v, (int, float, str)) or v is None})
        logger.experiment.save(str(run_dir / "summary.json"), base_path=str(run_dir), policy="now")
    print_table(summaries)
    print_details(summaries)
    log("time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in STAGE_SECONDS.items()))
    log(f"done in {time.perf_counter() - started:.0f} s; results: {run_dir / 'summary.json'}, "
        f"{run_dir / 'schedule.json'}, {run_dir / 'frontier.png'}, {run_dir / 'winner.png'}")
    return summaries
