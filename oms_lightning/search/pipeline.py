"""`python search.py budget=B`: zoo → latency profile → schedule→FID store → predictor → SearchCallback running
the evolution on it → per budget: the search's candidates re-ranked and the strongest single-member baseline chosen
on a selection seed, both scored on fresh evaluation seeds by `oms_lightning.evaluation` → schedule, frontier plot
and summary.json.

Every expensive stage is cached by zoo and settings as soon as it is done, so a multirun over budgets computes the
store and the predictor once and a killed search redoes only what it lost. Searches sharing a cache folder take
turns per stage (file locks in the cache folder) and reuse each other's results.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from oms_lightning.diffusion.solvers import ODE_SOLVERS, get_solver
from oms_lightning.errors import UserError
from oms_lightning.evaluation import (Evaluation, check_fresh_seeds, compare, cost_at_equal_quality,
                                     fitting_nfes, single_member_baselines)
from oms_lightning.io import atomic_write_text, file_lock
from oms_lightning.metrics import METRICS, FIDEvaluator, SampleMetrics, default_extractor_for
from oms_lightning.predictor.encoding import DEFAULT_FEATURES, DEFAULT_SOLVERS
from oms_lightning.predictor.generate import generate_distributed, generate_records
from oms_lightning.predictor.module import PredictorModule, fit_predictor, rank_metrics_near
from oms_lightning.predictor.records import RecordStore, fid_settings, settings_fingerprint
from oms_lightning.schedule import ModelSchedule, schedule_key
from oms_lightning.schedule_file import schedule_from_dict, schedule_to_dict
from oms_lightning.search.callback import SearchCallback
from oms_lightning.search.report import print_details, print_table, report_outcomes
from oms_lightning.steps import AYSTable, ays_table, optimize_command
from oms_lightning.search.space import SamplerSpace, encode_exactly, make_spaces, random_schedules, single_member_anchors
from oms_lightning.member_ranges import split_member_name
from oms_lightning.zoo import Zoo, latency_path, load_or_profile, resolve_device, time_schedules, train_command


def log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- zoo
def missing_members(cfg: DictConfig) -> list[str]:
    folder = Path(cfg.paths.checkpoints) / str(cfg.data.name)
    files = sorted({split_member_name(m)[0] for m in cfg.zoo.members})   # `multistage.s0` lives in multistage.ckpt
    return [m for m in files if not (folder / f"{m}.ckpt").is_file()]


def ensure_zoo(cfg: DictConfig) -> None:
    """Train missing members through train.py's own code path, or stop with the commands to run. Under a lock:
    a second search waits for the first one's training instead of training the same member again."""
    missing = missing_members(cfg)
    if missing and not cfg.zoo.train_missing:
        cmds = "\n".join(f"  {train_command(m, str(cfg.data.name))}" for m in missing)
        raise UserError(f"zoo member(s) {', '.join(missing)} are not trained yet; train them with\n{cmds}\n"
                        "or run search.py with zoo.train_missing=true")
    if missing:
        with file_lock(Path(cfg.paths.checkpoints) / str(cfg.data.name) / ".train.lock", waiting=waiting_for):
            _train_missing(cfg, missing_members(cfg))  # again: another search may have trained them meanwhile


def _train_missing(cfg: DictConfig, missing: list[str]) -> None:
    from hydra import compose

    from oms_lightning.train_job import train

    for m in missing:
        train_cfg = compose("train", overrides=[f"model={m}", f"data={cfg.data.name}",
                                                f"paths.checkpoints={cfg.paths.checkpoints}", *cfg.zoo.train_overrides])
        # a search killed while training this member left its training state: continue it, never start over
        resume = (Path(train_cfg.paths.run_dir) / "last.ckpt").is_file()
        if resume:
            train_cfg.ckpt_path = "last"
        log(f"{'resuming' if resume else 'training'} missing zoo member {m!r} ({', '.join(cfg.zoo.train_overrides)})")
        train(train_cfg)


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


def in_range(zoo: Zoo, schedules: list[ModelSchedule]) -> list[ModelSchedule]:
    """The schedules whose every NFE runs a member inside its valid time range: a multi-decoder stage alone over
    the whole trajectory is no sampler (its decoder never saw the other stages)."""
    return [s for s in schedules if not zoo.out_of_range(s)]


def resolve_budgets(cfg: DictConfig, latency: dict[str, float]) -> list[float]:
    """Budgets in seconds per batch: `budgets=[...]` (one predictor, a frontier) or `budget=` (ms per batch;
    default: `default_budget_nfe` NFEs of the costliest member)."""
    if cfg.get("budgets"):
        return sorted(resolve_budget(b, latency) for b in cfg.budgets)
    if cfg.budget is None:
        return [cfg.default_budget_nfe * max(latency.values())]
    return [resolve_budget(cfg.budget, latency)]


def resolve_budget(value, latency: dict[str, float]) -> float:
    try:
        budget = float(value) / 1000.0
    except (TypeError, ValueError):
        raise UserError(f"budget={value!r} is not a number (milliseconds per batch)") from None
    cheapest = min(latency, key=latency.get)
    if budget < latency[cheapest]:
        raise UserError(f"budget {1000 * budget:.1f} ms is below the cheapest valid schedule: one NFE of "
                        f"{cheapest!r} costs {1000 * latency[cheapest]:.1f} ms per batch on this device; "
                        f"use budget >= {1000 * latency[cheapest]:.1f}")
    return budget


def check_evaluation_settings(cfg: DictConfig) -> list[int]:
    """Refuse bad `search.evaluation` settings before hours of work; returns the evaluation seeds."""
    e = cfg.search.evaluation
    fitting_nfes(1.0, 1.0, e.baseline_nfes)  # raises on anything but all | largest | a positive integer
    for key, value, least in (("n", e.n, 2), ("timing_rounds", e.timing_rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"invalid value search.evaluation.{key}={value!r}: expected an integer >= {least}")
    if not isinstance(e.equal_quality_max_budgets, (int, float)) or e.equal_quality_max_budgets <= 0:
        raise UserError(f"invalid value search.evaluation.equal_quality_max_budgets={e.equal_quality_max_budgets!r}: "
                        f"expected a positive multiple of the budget")
    anchors = cfg.search.dataset.iia_anchors
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
        raise UserError(f"invalid value search.dataset.iia_anchors={anchors!r}: expected an integer >= 0 (how many "
                        f"dataset anchors also get IIA coefficients)")
    if cfg.search.iia not in ("none", "rerank"):
        raise UserError(f"search.iia={cfg.search.iia!r}: choose none or rerank (fit IIA coefficients for the top "
                        f"candidates before the re-rank)")
    used = {"the schedule→FID dataset": cfg.search.dataset.sample_seed,
            "the re-rank and baseline choice": cfg.search.rerank.seed}
    if cfg.search.iia == "rerank" or cfg.search.ablation or anchors:
        used["the IIA calibration"] = cfg.search.iia_calibration.seed
    return check_fresh_seeds(e.seeds, used)


# ----------------------------------------------------------------------------------------------- data
def store_for(cfg_cache: Path, name: str, zoo: Zoo, settings: dict) -> RecordStore:
    key = f"{zoo.fingerprint()}-{settings_fingerprint(settings)[:12]}"
    return RecordStore(cfg_cache / f"{name}-{key}.jsonl", zoo.fingerprint(), settings)


def build_dataset(cfg: DictConfig, zoo: Zoo, spaces: list, evaluator, profile,
                  cache: Path) -> tuple[list[dict], RecordStore]:
    """Random schedules of every space (`n_random` split evenly) plus every member alone at `anchor_nfes` in each
    (on its AYS times too where it has them), and `iia_anchors` of those anchors with IIA coefficients."""
    d = cfg.search.dataset
    per_space = -(-int(d.n_random) // len(spaces))
    schedules, anchors = [], []
    for i, space in enumerate(spaces):
        schedules += random_schedules(space, per_space, seed=cfg.seed + i, null_prob=d.null_prob, alpha=d.alpha)
        anchors += in_range(zoo, single_member_anchors(space, d.anchor_nfes))
    schedules += anchors + iia_anchors(cfg, zoo, anchors, int(d.iia_anchors))
    store = store_for(cache, "records", zoo, fid_settings(evaluator, d.n_samples, d.sample_seed))
    log(f"schedule→FID store {store.path}: {len(store)} records, {len(schedules)} schedules wanted")
    start = time.perf_counter()
    with file_lock(cache / ".records.lock", waiting=waiting_for):
        records = _generate(d, zoo, schedules, store, evaluator, profile)
    # costs from today's profile: a store outlives a re-measured profile, and cost is not part of a record's identity
    usable = [{**r, "cost": profile.cost(schedule_from_dict(r["schedule"]))} for r in records
              if r["fid"] is not None]
    log(f"{len(usable)} records ready ({time.perf_counter() - start:.0f} s)")
    return usable, store


def iia_anchors(cfg: DictConfig, zoo: Zoo, anchors: list[ModelSchedule], count: int) -> list[ModelSchedule]:
    """`count` anchors, a seeded draw among those whose solver has IIA features, with coefficients fitted on the
    calibration seed: corrected schedules beside their plain versions, so the predictor learns what coefficients do
    instead of extrapolating to them."""
    fittable = [s for s in anchors if get_solver(s.solver).feature_sets]
    chosen = random.Random(cfg.seed).sample(fittable, min(count, len(fittable)))
    if chosen:
        log(f"fitting IIA coefficients for {len(chosen)} anchors of the dataset (calibration seed "
            f"{cfg.search.iia_calibration.seed})")
    return with_iia(cfg, zoo, chosen)


def _generate(d: DictConfig, zoo: Zoo, schedules: list, store: RecordStore, evaluator, profile) -> list[dict]:
    if d.devices == 1 and d.num_nodes == 1:
        return generate_records(zoo, schedules, store, evaluator, d.n_samples, d.sample_seed, d.batch_size, profile)
    return generate_distributed(zoo, schedules, store.path, evaluator, d.n_samples, d.sample_seed, d.batch_size,
                                profile, accelerator=d.accelerator, devices=d.devices, num_nodes=d.num_nodes,
                                strategy=d.strategy)


def rerank_fn(cfg: DictConfig, zoo: Zoo, evaluator, profile, cache: Path):
    """True FID on the *selection* seed (another seed than the dataset's), cached in a record store: used to pick
    the winner among the top-k and the baseline among all single-member samplers — never to report them."""
    r = cfg.search.rerank
    store = store_for(cache, "rerank", zoo, fid_settings(evaluator, r.n_samples, r.seed))

    def rerank(schedules: list[ModelSchedule]) -> list[dict]:
        return generate_records(zoo, schedules, store, evaluator, r.n_samples, r.seed, cfg.search.dataset.batch_size,
                                profile, progress=True)

    return rerank


def same_steps_single_member(winner: ModelSchedule, zoo: Zoo, rerank) -> dict[str, float]:
    """Ablation on the selection seed: the winner's steps and orders with one member at every NFE. It separates
    what mixing models buys from what searching the step structure buys (OMS-DPM searches both)."""
    alone = in_range(zoo, [ModelSchedule.from_times_and_members(winner.times, [[m] * s.order for s in winner.steps],
                                                             solver=winner.solver) for m in zoo.names])
    return {s.member_names[0]: r["fid"] for s, r in zip(alone, rerank(alone))}   # stage members cannot run alone


# ----------------------------------------------------------------------------------------------- predictor
def predictor_key(records: list[dict], cfg: DictConfig, zoo: Zoo) -> str:
    h = hashlib.sha256(zoo.fingerprint().encode())
    h.update(json.dumps(sorted((r["key"], r["fid"]) for r in records)).encode())
    h.update(json.dumps(OmegaConf.to_container(cfg.search.predictor, resolve=True), sort_keys=True).encode())
    # the space (its size is the encoder's length) and the solver and IIA feature vocabularies: a predictor whose
    # solver ids or coefficient columns have shifted must never load
    h.update(json.dumps([str(cfg.search.space.kind), int(cfg.search.space.size), list(DEFAULT_SOLVERS),
                         list(DEFAULT_FEATURES)]).encode())
    return h.hexdigest()[:16]


def train_or_load_predictor(cfg, zoo, records, cache: Path, logger, max_steps: int) -> tuple[PredictorModule, dict]:
    """The cached predictor for these records and settings, or a new one trained and cached at once (before any
    search runs on it, so a search killed later never trains it again). Returns it with its metrics (τ on the
    test split). Under a lock: concurrent searches on one cache train it once and share it."""
    p = cfg.search.predictor
    key = predictor_key(records, cfg, zoo)
    ckpt, meta_path = cache / f"predictor-{key}.ckpt", cache / f"predictor-{key}.json"
    with file_lock(cache / ".predictor.lock", waiting=waiting_for):
        if ckpt.is_file() and meta_path.is_file():
            try:
                module = PredictorModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
                metrics = json.loads(meta_path.read_text())
            except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, never silently used
                log(f"cached predictor {ckpt} is unreadable ({type(e).__name__}); training a new one")
            else:
                log(f"reusing predictor {ckpt} (test-split Kendall tau {metrics['kendall_tau']:.3f})")
                return module.eval(), metrics
        log(f"training the predictor on {len(records)} records ({p.epochs} epochs)")
        module, metrics = fit_predictor(
            records, list(zoo.names), zoo.schedule.to_dict(), max_steps,
            trainer_kwargs={"max_epochs": p.epochs, "logger": logger or False,
                            "default_root_dir": str(cache / f"predictor-{key}"), "accelerator": "cpu",
                            "log_every_n_steps": 1},
            val_fraction=p.val_fraction, test_fraction=p.test_fraction, split_seed=p.split_seed,
            batch_size=p.batch_size, seed=cfg.seed, loss=p.loss, margin=p.margin, fid_threshold=p.fid_threshold,
            lr=p.lr)
        best = metrics.pop("best_model_path")
        if best:
            Path(best).replace(ckpt)
        atomic_write_text(meta_path, json.dumps(metrics, indent=2) + "\n")
    log(f"predictor Kendall tau on its test split {metrics['kendall_tau']:.3f} (selection split "
        f"{metrics['kendall_tau_val']:.3f}; ranking by NFE alone {metrics['test']['kendall_tau_neg_nfe']:.3f})")
    return module, metrics


def waiting_for(holder: str) -> None:
    log(f"waiting for another search on the same cache ({holder}); its results will be reused")


# ----------------------------------------------------------------------------------------------- evaluation
def choose_baseline(cfg: DictConfig, zoo: Zoo, profile, budget: float, rerank,
                    ays: AYSTable) -> tuple[ModelSchedule, list[dict], list[ModelSchedule]]:
    """The strongest single-member sampler within the budget, chosen on the selection seed: every member × solver
    × spacing (AYS included where a member has steps) at the NFEs `evaluation.baseline_nfes` allows. Returns (the
    chosen schedule, every candidate's record, the candidates best first)."""
    candidates = in_range(zoo, single_member_baselines(zoo.names, zoo.schedule, profile.latency, budget,
                                                       nfes=cfg.search.evaluation.baseline_nfes, ays=ays))
    log(f"budget {1000 * budget:.0f} ms: choosing the baseline among {len(candidates)} single-member samplers "
        f"(selection seed {cfg.search.rerank.seed}, cached)")
    records = [{**r, "cost": profile.cost(s)} for r, s in zip(rerank(candidates), candidates)]
    order = sorted(range(len(records)), key=lambda j: records[j]["fid"])
    return candidates[order[0]], records, [candidates[j] for j in order]


def seeds_fn(cfg: DictConfig, zoo: Zoo, profile, ays: AYSTable):
    """seeds(space, budget, cache) → the genotypes of the best single-member samplers within the budget that are
    points of the space, by predicted score (at most half a population): the search starts where baselines end."""
    n = max(1, int(cfg.search.evolution.population) // 2)
    by_budget: dict[float, list[ModelSchedule]] = {}  # the same samplers serve every space

    def seeds(space, budget: float, cache) -> list:
        if budget not in by_budget:
            by_budget[budget] = in_range(zoo, single_member_baselines(zoo.names, zoo.schedule, profile.latency,
                                                                      budget, nfes="largest", ays=ays))
        pairs = [(s, g) for s in by_budget[budget] if (g := encode_exactly(space, s)) is not None]
        if not pairs:
            return []
        scores, _ = cache.score([s for s, _ in pairs])
        order = sorted(range(len(pairs)), key=lambda i: scores[i])[:n]
        return [pairs[i][1] for i in order]

    return seeds


def candidates(results: list, top_k: int, per_space: int) -> list[ModelSchedule]:
    """What the selection seed re-ranks: the top-k by predicted score over every space, plus the best `per_space`
    of each space (one predictor ranks several solver families less well than it ranks within one)."""
    pooled = sorted((c for r in results for c in r.population), key=lambda c: c.score)
    chosen = {}
    for c in pooled[:top_k] + [c for r in results for c in r.top(per_space)]:
        chosen.setdefault(schedule_key(c.schedule), c.schedule)
    return list(chosen.values())


def evaluate_budget(cfg: DictConfig, zoo: Zoo, profile, results: list, spaces: list, rerank, evaluation: Evaluation,
                    noise_floor: dict, predictor_metrics: dict, ays: AYSTable, members_only: list | None) -> dict:
    """One budget, in order: choose the baseline on the selection seed, re-rank the search's candidates (and the
    baseline itself when the spaces contain it: a search never loses to a point it could have chosen) on the same
    seed, score winner and baseline on fresh seeds (paired intervals, verdicts), cost at equal quality, wall time,
    predictor τ near the budget."""
    budget = results[0].budget
    baseline, baseline_records, singles = choose_baseline(cfg, zoo, profile, budget, rerank, ays)
    top = candidates(results, cfg.search.rerank.top_k, cfg.search.rerank.top_per_space)
    expressible = any(encode_exactly(space, baseline) is not None for space in spaces)
    if expressible and schedule_key(baseline) not in {schedule_key(s) for s in top}:
        top.append(baseline)
    plain_top = list(top)
    if cfg.search.iia == "rerank":  # the corrected versions compete beside the plain ones (IIA may hurt FID)
        top += with_iia(cfg, zoo, plain_top)
    reranked = rerank(top)
    w = min(range(len(reranked)), key=lambda j: reranked[j]["fid"])
    winner = top[w]
    comparison = compare(evaluation, {"searched": winner, "baseline": baseline}, reference="baseline",
                         noise_floor=noise_floor)
    equal = cost_at_equal_quality(evaluation, baseline, evaluation.mean(winner), profile.latency[baseline.meta["member"]],
                                  max_cost=cfg.search.evaluation.equal_quality_max_budgets * budget,
                                  known_nfe=baseline.nfe, ays=ays)
    log(f"budget {1000 * budget:.0f} ms: timing winner and baseline, interleaved")
    walls = time_schedules(zoo, [winner, baseline], profile.batch_size, rounds=cfg.search.evaluation.timing_rounds)
    test = predictor_metrics.get("test_predictions")
    near = rank_metrics_near(test["score"], test["fid"], test["cost"], budget) if test else None
    ablation = (joint_ablation(cfg, zoo, profile, rerank, evaluation, noise_floor, baseline, singles, winner,
                               plain_top, members_only) if members_only is not None else None)
    return {"budget": budget, "results": results, "winner": winner, "winner_record": reranked[w], "ablation": ablation,
            "winner_is_baseline": schedule_key(winner) == schedule_key(baseline),
            "baseline": baseline, "baseline_records": baseline_records,
            "costs": {"searched": profile.cost(winner), "baseline": profile.cost(baseline)},
            "comparison": comparison, "equal": equal, "walls": walls, "tau_near_budget": near,
            "same_steps": same_steps_single_member(winner, zoo, rerank)}


# ----------------------------------------------------------------------------------------------- joint search
def with_iia(cfg: DictConfig, zoo: Zoo, schedules: list[ModelSchedule]) -> list[ModelSchedule]:
    """The schedules with IIA coefficients fitted on the calibration seed (those whose solver has IIA features).
    Each fit is kept in the search cache (`iia-*.jsonl`, keyed by the plain schedule, bound to the zoo's weights and
    the calibration settings), so a rerun or a resumed search never fits one twice."""
    from oms_lightning.fit_coefficients_job import fit_schedule

    c = cfg.search.iia_calibration
    calibration = {"n": int(c.n), "held_out": int(c.held_out), "seed": int(c.seed)}
    cache = Path(cfg.paths.cache)
    cache.mkdir(parents=True, exist_ok=True)
    fitted = []
    with file_lock(cache / ".iia.lock", waiting=waiting_for):
        store = store_for(cache, "iia", zoo, {"calibration": calibration, "sub_steps": int(c.sub_steps)})
        known = {r["key"]: r["schedule"] for r in store.records()}
        for plain in (s for s in schedules if s.correction is None):
            key = schedule_key(plain)
            if key not in known:   # None: its solver has no IIA features (nothing to fit)
                fit = fit_schedule(zoo, plain, calibration, int(c.sub_steps))
                known[key] = None if fit is None else schedule_to_dict(fit)
                store.append({"key": key, "schedule": known[key]})
            if known[key] is not None:
                fitted.append(schedule_from_dict(known[key]))
    return fitted


def members_only_spaces(spaces: list) -> list:
    """The same spaces with time fixed: each solver family on its logSNR-uniform grid, no time genes, no AYS grids
    (OMS-DPM's search over members, extended to every solver family): the joint search's first ablation."""
    return [dataclasses.replace(sp, time_genes=False, spacings=("logsnr_uniform",), ays=())
            if isinstance(sp, SamplerSpace) else sp for sp in spaces]


def best_on_selection_seed(schedules: list[ModelSchedule], rerank) -> ModelSchedule:
    records = rerank(schedules)
    return schedules[min(range(len(records)), key=lambda i: records[i]["fid"])]


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


# ----------------------------------------------------------------------------------------------- the job
def run(cfg: DictConfig) -> list[dict]:
    """The search as a straight line: zoo → profile → dataset → predictor + evolution → per budget re-rank,
    baseline, fresh-seed evaluation → report."""
    started = time.perf_counter()
    seeds = check_evaluation_settings(cfg)
    device = resolve_device(str(cfg.device))
    ensure_zoo(cfg)
    zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=list(cfg.zoo.members), device=device)
    cache = Path(cfg.paths.cache)
    profile = load_or_profile(zoo, latency_path(cfg.paths.checkpoints, str(cfg.data.name)),
                              batch_size=cfg.profile.batch_size, device=device,
                              max_age_hours=cfg.profile.max_age_hours, max_spread=cfg.profile.max_spread)
    budgets = resolve_budgets(cfg, profile.latency)
    log(f"zoo {list(zoo.names)}; latency per batch of {profile.batch_size} on {profile.device_name}: "
        + ", ".join(f"{n} {1000 * v:.1f} ms (spread {100 * profile.spread.get(n, 0):.0f} %)"
                    for n, v in profile.latency.items())
        + "".join(f"; routed {n} per stage {' / '.join(f'{1000 * v:.1f}' for v in r['latency'])} ms"
                  for n, r in profile.routed.items())
        + f"; budget(s) {', '.join(f'{1000 * b:.1f}' for b in budgets)} ms")

    datamodule = instantiate(cfg.data.module)
    evaluator = FIDEvaluator(default_extractor_for(str(cfg.data.name)), datamodule,
                             cache_dir=Path(cfg.paths.checkpoints) / str(cfg.data.name), device=device)
    ays = load_ays(cfg, zoo)
    spaces = make_spaces(str(cfg.search.space.kind), zoo.names, zoo.schedule, int(cfg.search.space.size), ays,
                         zoo.ranges())
    records, store = build_dataset(cfg, zoo, spaces, evaluator, profile, cache)

    from oms_lightning.tracking import make_logger

    logger = make_logger(cfg.logger, name=f"search-{cfg.data.name}-{'-'.join(f'{1000 * b:.0f}' for b in budgets)}ms",
                         group=f"search-{cfg.data.name}", config=OmegaConf.to_container(cfg, resolve=True))
    callback = SearchCallback(spaces, profile.cost, budgets, seed=cfg.seed,
                              evolution={**OmegaConf.to_container(cfg.search.evolution, resolve=True),
                                         "null_prob": cfg.search.dataset.null_prob},
                              seeds=seeds_fn(cfg, zoo, profile, ays))
    predictor, predictor_metrics = train_or_load_predictor(cfg, zoo, records, cache, logger,
                                                           max_steps=max(sp.max_steps for sp in spaces))
    callback.search(predictor)
    members_only = None
    if cfg.search.ablation:
        log("ablation: the same evolution with time fixed (members and solver families only)")
        members_only = SearchCallback(members_only_spaces(spaces), profile.cost, budgets, seed=cfg.seed,
                                      evolution=callback.evolution, seeds=seeds_fn(cfg, zoo, profile, ays)
                                      ).search(predictor)

    e = cfg.search.evaluation
    sample_metrics = SampleMetrics(evaluator, datamodule)
    evaluation = Evaluation(zoo, sample_metrics, seeds, int(e.n), cfg.search.dataset.batch_size, progress=log,
                            store=lambda seed: store_for(cache, f"eval{seed}", zoo, {
                                **fid_settings(evaluator, int(e.n), seed), "metrics": list(METRICS)}))
    noise_floor = sample_metrics.noise_floor(int(e.n), seed=seeds[0])
    rerank = rerank_fn(cfg, zoo, evaluator, profile, cache)
    with file_lock(cache / ".evaluation.lock", waiting=waiting_for):  # the selection and evaluation stores
        outcomes = [evaluate_budget(cfg, zoo, profile, callback.results[b], spaces, rerank, evaluation, noise_floor,
                                    predictor_metrics, ays, members_only and members_only[b]) for b in budgets]

    run_dir = Path(cfg.paths.run_dir)
    summaries = report_outcomes(outcomes, zoo, profile, run_dir, store_size=len(store), logger=logger,
                                predictor_metrics=predictor_metrics, settings={
                                    "select_seed": int(cfg.search.rerank.seed), "n_select": int(cfg.search.rerank.n_samples),
                                    "eval_seeds": seeds, "n_eval": int(e.n)})
    for s in summaries:
        s["wall_seconds_total"] = round(time.perf_counter() - started, 1)
    atomic_write_text(run_dir / "summary.json", json.dumps(summaries[0] if len(summaries) == 1 else summaries,
                                                            indent=2) + "\n")
    if logger:
        logger.experiment.summary.update({f"search/{k}": v for k, v in summaries[0].items()
                                          if isinstance(v, (int, float, str)) or v is None})
        logger.experiment.save(str(run_dir / "summary.json"), base_path=str(run_dir), policy="now")
    print_table(summaries)
    print_details(summaries)
    log(f"done in {time.perf_counter() - started:.0f} s; results: {run_dir / 'summary.json'}, "
        f"{run_dir / 'schedule.json'}, {run_dir / 'frontier.png'}, {run_dir / 'winner.png'}")
    return summaries
