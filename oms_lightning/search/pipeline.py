"""`python search.py budget=B`: zoo → latency profile → schedule→FID store → predictor (+ SearchCallback) →
schedule, frontier plot and summary.json. Every expensive stage is cached by zoo and settings, so a multirun
over budgets computes the store and the predictor once.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text
from oms_lightning.metrics import FIDEvaluator, default_extractor_for
from oms_lightning.predictor.generate import generate_distributed, generate_records
from oms_lightning.predictor.module import PredictorModule, fit_predictor
from oms_lightning.predictor.records import RecordStore, fid_settings, settings_fingerprint
from oms_lightning.schedule import ModelSchedule
from oms_lightning.search.callback import SearchCallback
from oms_lightning.search.report import print_table, report_outcomes
from oms_lightning.search.space import make_space, random_schedules, single_member_anchors
from oms_lightning.zoo import Zoo, load_or_profile, resolve_device, train_command


def log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- zoo
def missing_members(cfg: DictConfig) -> list[str]:
    folder = Path(cfg.paths.checkpoints) / str(cfg.data.name)
    return [m for m in sorted(cfg.zoo.members) if not (folder / f"{m}.ckpt").is_file()]


def ensure_zoo(cfg: DictConfig) -> None:
    """Train missing members through train.py's own code path, or stop with the commands to run."""
    missing = missing_members(cfg)
    if not missing:
        return
    if not cfg.zoo.train_missing:
        cmds = "\n".join(f"  {train_command(m, str(cfg.data.name))}" for m in missing)
        raise UserError(f"zoo member(s) {', '.join(missing)} are not trained yet; train them with\n{cmds}\n"
                        "or run search.py with zoo.train_missing=true")
    from hydra import compose

    from oms_lightning.train_job import train

    for m in missing:
        log(f"training missing zoo member {m!r} ({', '.join(cfg.zoo.train_overrides)})")
        train(compose("train", overrides=[f"model={m}", f"data={cfg.data.name}",
                                          f"paths.checkpoints={cfg.paths.checkpoints}", *cfg.zoo.train_overrides]))


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


# ----------------------------------------------------------------------------------------------- data
def store_for(cfg_cache: Path, name: str, zoo: Zoo, settings: dict) -> RecordStore:
    key = f"{zoo.fingerprint()}-{settings_fingerprint(settings)[:12]}"
    return RecordStore(cfg_cache / f"{name}-{key}.jsonl", zoo.fingerprint(), settings)


def build_dataset(cfg: DictConfig, zoo: Zoo, space, evaluator, profile, cache: Path) -> tuple[list[dict], RecordStore]:
    d = cfg.search.dataset
    schedules = (random_schedules(space, d.n_random, seed=cfg.seed, null_prob=d.null_prob, alpha=d.alpha)
                 + single_member_anchors(space, d.anchor_nfes))
    store = store_for(cache, "records", zoo, fid_settings(evaluator, d.n_samples, d.sample_seed))
    log(f"schedule→FID store {store.path}: {len(store)} records, {len(schedules)} schedules wanted")
    start = time.perf_counter()
    if d.devices == 1 and d.num_nodes == 1:
        records = generate_records(zoo, schedules, store, evaluator, d.n_samples, d.sample_seed, d.batch_size,
                                   profile)
    else:
        records = generate_distributed(zoo, schedules, store.path, evaluator, d.n_samples, d.sample_seed,
                                       d.batch_size, profile, accelerator=d.accelerator, devices=d.devices,
                                       num_nodes=d.num_nodes, strategy=d.strategy)
    usable = [r for r in records if r["fid"] is not None]
    log(f"{len(usable)} records ready ({time.perf_counter() - start:.0f} s)")
    return usable, store


def rerank_fn(cfg: DictConfig, zoo: Zoo, evaluator, profile, cache: Path):
    """True FID on fresh samples (another seed than the dataset's), cached: baselines are computed once."""
    r = cfg.search.rerank
    store = store_for(cache, "rerank", zoo, fid_settings(evaluator, r.n_samples, r.seed))

    def rerank(schedules: list[ModelSchedule]) -> list[dict]:
        return generate_records(zoo, schedules, store, evaluator, r.n_samples, r.seed, cfg.search.dataset.batch_size,
                                profile, progress=True)

    return rerank


def baseline_schedules(cfg: DictConfig, zoo: Zoo) -> list[ModelSchedule]:
    """Every member alone at every NFE of `rerank.baseline_nfes` (all orders the solver allows), not limited to the
    search space's K steps: the single-model sampler a user would otherwise run, given every chance to win."""
    nfes = list(cfg.search.rerank.baseline_nfes)
    wide = make_space(cfg.search.space.kind, zoo.names, zoo.schedule, max(nfes))
    return single_member_anchors(wide, nfes)


def same_steps_single_member(outcome, zoo: Zoo, rerank) -> dict[str, float]:
    """Ablation: the winner's steps and orders with one member at every NFE. It separates what mixing models
    buys from what searching the step structure buys (OMS-DPM searches both)."""
    winner = ModelSchedule.from_dict(outcome.winner["schedule"])
    alone = [ModelSchedule.from_times_and_members(winner.times, [[m] * s.order for s in winner.steps])
             for m in zoo.names]
    return {m: r["fid"] for m, r in zip(zoo.names, rerank(alone))}


# ----------------------------------------------------------------------------------------------- predictor
def predictor_key(records: list[dict], cfg: DictConfig, zoo: Zoo) -> str:
    h = hashlib.sha256(zoo.fingerprint().encode())
    h.update(json.dumps(sorted((r["key"], r["fid"]) for r in records)).encode())
    h.update(json.dumps(OmegaConf.to_container(cfg.search.predictor, resolve=True), sort_keys=True).encode())
    h.update(str(cfg.search.space.size).encode())
    return h.hexdigest()[:16]


def train_or_load_predictor(cfg, zoo, records, cache: Path, callback: SearchCallback, logger) -> dict:
    """Train the predictor with the SearchCallback attached, or reuse the cached one and run the callback on it."""
    p = cfg.search.predictor
    key = predictor_key(records, cfg, zoo)
    ckpt, meta_path = cache / f"predictor-{key}.ckpt", cache / f"predictor-{key}.json"
    if ckpt.is_file() and meta_path.is_file():
        try:
            module = PredictorModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
            metrics = json.loads(meta_path.read_text())
        except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, never silently used
            log(f"cached predictor {ckpt} is unreadable ({type(e).__name__}); training a new one")
        else:
            log(f"reusing predictor {ckpt} (held-out Kendall tau {metrics['kendall_tau']:.3f})")
            callback.run(module.eval(), logger)
            return metrics
    log(f"training the predictor on {len(records)} records ({p.epochs} epochs)")
    module, metrics = fit_predictor(
        records, list(zoo.names), zoo.schedule.to_dict(), cfg.search.space.size,
        trainer_kwargs={"max_epochs": p.epochs, "callbacks": [callback], "logger": logger or False,
                        "default_root_dir": str(cache / f"predictor-{key}"), "accelerator": "cpu",
                        "log_every_n_steps": 1},
        val_fraction=p.val_fraction, split_seed=p.split_seed, batch_size=p.batch_size, seed=cfg.seed,
        loss=p.loss, margin=p.margin, fid_threshold=p.fid_threshold, lr=p.lr)
    best = metrics.pop("best_model_path")
    if best:
        Path(best).replace(ckpt)
    atomic_write_text(meta_path, json.dumps(metrics, indent=2) + "\n")
    log(f"predictor held-out Kendall tau {metrics['kendall_tau']:.3f}, Spearman {metrics['spearman']:.3f}")
    return metrics


# ----------------------------------------------------------------------------------------------- the job
def run(cfg: DictConfig) -> list[dict]:
    started = time.perf_counter()
    device = resolve_device(str(cfg.device))
    ensure_zoo(cfg)
    zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=list(cfg.zoo.members), device=device)
    cache = Path(cfg.paths.cache)
    profile = load_or_profile(zoo, cache / "latency.json", batch_size=cfg.profile.batch_size, device=device,
                              max_age_hours=cfg.profile.max_age_hours)
    budgets = resolve_budgets(cfg, profile.latency)
    log(f"zoo {list(zoo.names)}; latency per batch of {profile.batch_size} on {profile.device_name}: "
        + ", ".join(f"{n} {1000 * v:.1f} ms" for n, v in profile.latency.items())
        + f"; budget(s) {', '.join(f'{1000 * b:.1f}' for b in budgets)} ms")

    evaluator = FIDEvaluator(default_extractor_for(str(cfg.data.name)), instantiate(cfg.data.module),
                             cache_dir=Path(cfg.paths.checkpoints) / str(cfg.data.name), device=device)
    space = make_space(cfg.search.space.kind, zoo.names, zoo.schedule, cfg.search.space.size)
    records, store = build_dataset(cfg, zoo, space, evaluator, profile, cache)

    from oms_lightning.tracking import make_logger

    logger = make_logger(cfg.logger, name=f"search-{cfg.data.name}-{'-'.join(f'{1000 * b:.0f}' for b in budgets)}ms",
                         group=f"search-{cfg.data.name}", config=OmegaConf.to_container(cfg, resolve=True))
    run_dir = Path(cfg.paths.run_dir)
    rerank = rerank_fn(cfg, zoo, evaluator, profile, cache)
    baselines = baseline_schedules(cfg, zoo)
    summaries: list[dict] = []

    def report(outcomes, trainer_logger):
        log("true FID of the single-member baselines (cached after the first run)")
        base = rerank(baselines)
        rows = report_outcomes(outcomes, base, zoo, run_dir, store_size=len(store), logger=trainer_logger,
                               seed=cfg.search.rerank.seed)
        for row, outcome in zip(rows, outcomes):
            row["winner_steps_single_member_fid"] = same_steps_single_member(outcome, zoo, rerank)
        summaries.extend(rows)

    callback = SearchCallback(space, profile.cost, budgets, rerank, top_k=cfg.search.rerank.top_k, seed=cfg.seed,
                              evolution={**OmegaConf.to_container(cfg.search.evolution, resolve=True),
                                         "null_prob": cfg.search.dataset.null_prob},
                              report_fn=report)
    predictor_metrics = train_or_load_predictor(cfg, zoo, records, cache, callback, logger)
    for s in summaries:
        s["kendall_tau"] = predictor_metrics["kendall_tau"]
        s["wall_seconds"] = round(time.perf_counter() - started, 1)
    if summaries:
        atomic_write_text(run_dir / "summary.json", json.dumps(summaries[0] if len(summaries) == 1 else summaries,
                                                                indent=2) + "\n")
        if logger:
            logger.experiment.summary.update({f"search/{k}": v for k, v in summaries[0].items()
                                              if isinstance(v, (int, float, str)) or v is None})
            logger.experiment.save(str(run_dir / "summary.json"), base_path=str(run_dir), policy="now")
    print_table(summaries)
    for row in summaries:
        log(f"budget {row['budget']:.0f} ms, the winner's steps with one member everywhere: "
            + ", ".join(f"{m} FID {f:.2f}" for m, f in row["winner_steps_single_member_fid"].items()))
        if row["budget_note"]:
            log(f"note for budget {row['budget']:.0f} ms: {row['budget_note']}")
    log(f"predictor held-out Kendall tau {predictor_metrics['kendall_tau']:.3f} on {len(records)} records; "
        f"done in {time.perf_counter() - started:.0f} s")
    log(f"results: {run_dir / 'summary.json'}, {run_dir / 'schedule.json'}, {run_dir / 'frontier.png'}, "
        f"{run_dir / 'winner.png'}")
    return summaries
