"""`python search.py budget=B`: zoo → latency profile → schedule→FID store → per budget: predictor → evolution
(SearchCallback) → the strongest single-member baseline chosen, the search's candidates re-ranked and refined by true
FID on a selection seed (`search/refine.py`) → the best schedule and the cheapest one at the baseline's quality scored
on fresh evaluation seeds by `oms_lightning.evaluation` → schedule, frontier plot and summary.json.

Every expensive stage is cached by zoo and settings as soon as it is done, so a multirun over budgets computes the
store and the predictor once and a killed search redoes only what it lost. Searches sharing a cache folder take
turns per stage (file locks in the cache folder) and reuse each other's results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oms_lightning.diffusion.solvers import ODE_SOLVERS, get_solver
from oms_lightning.errors import UserError
from oms_lightning.evaluation import (PRIMARY, Evaluation, check_fresh_seeds, compare, cost_at_equal_quality,
                                     fitting_nfes, non_inferiority, single_member_baselines, single_member_sampler)
from oms_lightning.io import atomic_write_text, file_lock
from oms_lightning.metrics import METRICS, FIDEvaluator, sample_metrics_for, search_evaluator_for
from oms_lightning.predictor.encoding import DEFAULT_FEATURES, DEFAULT_SOLVERS
from oms_lightning.predictor.generate import generate_distributed, generate_records
from oms_lightning.predictor.module import PredictorModule, fit_predictor, rank_metrics_near
from oms_lightning.predictor.records import RecordStore, fid_settings, settings_fingerprint
from oms_lightning.schedule import ModelSchedule, schedule_key
from oms_lightning.schedule_file import schedule_from_dict, schedule_to_dict
from oms_lightning.search.callback import SearchCallback
from oms_lightning.search.refine import Refinement, neighbours, refine
from oms_lightning.search.report import print_details, print_table, report_outcomes
from oms_lightning.search.segments import (Sampler, probe_runs, rank_samplers, segment_schedules, spread,
                                           two_segment_runs)
from oms_lightning.steps import AYS, AYSTable, ays_table, optimize_command
from oms_lightning.search.space import SamplerSpace, encode_exactly, make_spaces, random_schedules, single_member_anchors
from oms_lightning.member_ranges import FULL, split_member_name
from oms_lightning.zoo import (Zoo, latency_path, load_or_profile, machine_speed_change, resolve_device, time_schedules,
                               train_command)


def log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


STAGE_SECONDS: dict[str, float] = {}   # where a run's time went, stage by stage (summary.json: stage_seconds)


@contextlib.contextmanager
def stage(name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.perf_counter() - started


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
    """Budgets in seconds per batch: `budgets=[...]` (one predictor, a frontier) or `budget=` (default:
    `default_budget_nfe` NFEs of the costliest member); each in ms per batch or in NFEs of a member (`6xmedium`,
    see `resolve_budget`)."""
    if cfg.get("budgets"):
        return sorted(resolve_budget(b, latency) for b in cfg.budgets)
    if cfg.budget is None:
        return [resolve_budget(f"{cfg.default_budget_nfe}x{max(latency, key=latency.get)}", latency)]
    return [resolve_budget(cfg.budget, latency)]


_NFE_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[x×]\s*(\S+)\s*$")


def resolve_budget(value, latency: dict[str, float]) -> float:
    """A budget in seconds per batch from milliseconds per batch (`900`) or from NFEs of a member (`6xmedium`: six
    forward passes of `medium`, converted through this profile, so it means the same on a busy machine: the
    profile's *ratios* hold under load while its absolute times do not)."""
    unit = _NFE_UNIT.match(str(value)) if isinstance(value, str) else None
    if unit:
        count, member = float(unit.group(1)), unit.group(2)
        if member not in latency:
            raise UserError(f"budget={value!r}: {member!r} is not a zoo member; use NFEs of one of "
                            f"{', '.join(sorted(latency))} (e.g. budget=6x{max(latency, key=latency.get)})")
        budget = count * latency[member]
    else:
        try:
            budget = float(value) / 1000.0
        except (TypeError, ValueError):
            raise UserError(f"budget={value!r} is neither milliseconds per batch (900) nor NFEs of a member "
                            f"(6x{max(latency, key=latency.get)})") from None
    cheapest = min(latency, key=latency.get)
    if not budget >= latency[cheapest]:
        raise UserError(f"budget {1000 * budget:.1f} ms is below the cheapest valid schedule: one NFE of "
                        f"{cheapest!r} costs {1000 * latency[cheapest]:.1f} ms per batch on this device; "
                        f"use budget >= {1000 * latency[cheapest]:.1f} (or budget=1x{cheapest})")
    return budget


def budget_in_nfes(budget: float, latency: dict[str, float]) -> dict:
    """The budget in NFEs of the costliest member: the form that survives a busy machine, beside the milliseconds."""
    member = max(latency, key=latency.get)
    return {"member": member, "nfe": round(budget / latency[member], 3), "spec": f"{budget / latency[member]:.3g}x{member}"}


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
    margin = e.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UserError(f"invalid value search.evaluation.margin={margin!r}: expected a fraction of the baseline's "
                        f"FID in [0, 1) (the non-inferiority margin; 0.02 = 2 %)")
    check_refine_settings(cfg.search.refine, int(cfg.search.rerank.n_samples))
    check_device_settings(cfg.search.dataset)
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


def check_refine_settings(rf: DictConfig, n_select: int) -> None:
    """Refuse bad `search.refine` settings: counts are non-negative integers, rungs increasing sample counts, keep
    and cheapest_share fractions."""
    def integer(key: str, least: int) -> None:
        v = rf.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise UserError(f"invalid value search.refine.{key}={v!r}: expected an integer >= {least}")

    for key, least in (("evaluations", 0), ("width", 1), ("per_round", 1), ("seeds", 0), ("seed_samplers", 1),
                       ("probes", 0), ("confirm", 0), ("confirm_top", 1)):
        integer(key, least)
    rungs = list(rf.rungs)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in rungs) or rungs != sorted(set(rungs)):
        raise UserError(f"invalid value search.refine.rungs={rungs}: expected increasing sample counts >= 2 (those "
                        f"at or above search.rerank.n_samples={n_select}, the last rung, are skipped)")
    for key, low_open in (("keep", True), ("cheapest_share", False)):
        v = rf.get(key)
        number = not isinstance(v, bool) and isinstance(v, (int, float))
        if not number or v > 1 or v < 0 or (low_open and v == 0):
            raise UserError(f"invalid value search.refine.{key}={v!r}: expected a fraction in "
                            f"{'(0, 1]' if low_open else '[0, 1]'}")


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
        records = measure(cfg, zoo, schedules, store, evaluator, d.n_samples, d.sample_seed, profile)
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


def measure(cfg: DictConfig, zoo: Zoo, schedules: list, store: RecordStore, evaluator, n: int, seed: int, profile,
            progress: bool = True) -> list[dict]:
    """The true FID of every schedule not yet in `store` — in this process, or spread over
    `search.dataset.devices` fresh Fabric processes (ddp_spawn) when at least `search.dataset.spread_min`
    schedules are new — for the dataset and for every selection-seed evaluation (re-rank, baseline, refinement)
    alike."""
    d = cfg.search.dataset
    pending = {schedule_key(s) for s in schedules} - store.done_keys()
    if d.devices == 1 or len(pending) < d.spread_min:   # starting the ranks costs seconds: spread only what pays
        return generate_records(zoo, schedules, store, evaluator, n, seed, d.batch_size, profile, progress)
    strategy = "ddp_spawn" if d.strategy == "auto" else d.strategy
    log(f"{len(pending)} new schedules spread over {d.devices} processes ({store.path.name})")
    return generate_distributed(zoo, schedules, store.path, evaluator, n, seed, d.batch_size, profile,
                                accelerator=d.accelerator, devices=d.devices, strategy=strategy, progress=progress)


def check_device_settings(d: DictConfig) -> None:
    """The search calls the spread many times, so its ranks must be spawned with their arguments: `ddp` would
    re-run search.py whole in every rank (which then waits forever on the stores' locks rank 0 holds)."""
    if isinstance(d.devices, bool) or not isinstance(d.devices, int) or d.devices < 1:
        raise UserError(f"invalid value search.dataset.devices={d.devices!r}: expected an integer >= 1")
    if isinstance(d.spread_min, bool) or not isinstance(d.spread_min, int) or d.spread_min < 1:
        raise UserError(f"invalid value search.dataset.spread_min={d.spread_min!r}: expected an integer >= 1 (the "
                        f"fewest new schedules worth starting the device processes for)")
    if d.devices > 1 and d.strategy not in ("auto", "ddp_spawn"):
        raise UserError(f"search.dataset.strategy={d.strategy!r}: the search spreads its evaluations over processes "
                        f"spawned per call; use auto or ddp_spawn (ddp re-runs the whole search in every rank)")
    if d.get("num_nodes", 1) != 1:
        raise UserError(f"search.dataset.num_nodes={d.num_nodes}: the search spreads over the devices of one "
                        f"machine; run one search per node on its own cache instead")


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
def choose_baseline(cfg: DictConfig, zoo: Zoo, profile, budget: float, rerank: Selection,
                    ays: AYSTable) -> tuple[ModelSchedule, list[dict], list[ModelSchedule]]:
    """The strongest single-member sampler within the budget, chosen on the selection seed: every member × solver
    × spacing (AYS included where a member has steps) at the NFEs `evaluation.baseline_nfes` allows, and each
    member's best of those at every other NFE that fits (the member's FID-vs-cost curve: quality is not monotone
    in NFE, so a smaller NFE may win). Returns (the chosen schedule, every candidate's record, the candidates best
    first)."""
    candidates = in_range(zoo, single_member_baselines(zoo.names, zoo.schedule, profile.latency, budget,
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
            c = single_member_sampler(member, m["solver"], m["order"], m["spacing"], nfe, zoo.schedule, ays)
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


def refine_budget(cfg: DictConfig, zoo: Zoo, profile, budget: float, measured: list[ModelSchedule],
                  baseline: ModelSchedule, singles: list[ModelSchedule], selection: Selection) -> Refinement | None:
    """The refinement stage (`search/refine.py`): true FID around the re-ranked candidates and single-member
    samplers already measured (`measured`, the baseline among them), seeded with two-segment schedules on the
    solver/spacing pairs that mix best; None with `search.refine.evaluations=0`."""
    rf = cfg.search.refine
    if int(rf.evaluations) <= 0:
        return None
    rungs = [*(int(n) for n in rf.rungs if int(n) < selection.n), selection.n]
    seeds, probed = segment_seeds(cfg, singles, profile.latency, budget, zoo, selection, rungs[0])
    log(f"budget {1000 * budget:.0f} ms: refining by true FID on the selection seed ({rf.evaluations} evaluations, "
        f"rungs {rungs} samples, {len(seeds)} segment schedules to start, {probed} probes of mixing)")

    def move(s: ModelSchedule) -> list[ModelSchedule]:
        return neighbours(s, zoo.names, zoo.schedule, profile.cost, budget, valid=lambda n: not zoo.out_of_range(n))

    result = refine(measured, baseline, seeds, selection.fid_at, profile.cost, move, rungs=rungs,
                    evaluations=max(0, int(rf.evaluations) - probed), keep=float(rf.keep), width=int(rf.width),
                    per_round=int(rf.per_round), cheapest_share=float(rf.cheapest_share),
                    confirm=int(rf.confirm), confirm_top=int(rf.confirm_top), seed=cfg.seed, log=log)
    result.evaluations += probed   # the probes were true evaluations too
    if int(rf.confirm) > selection.n:
        log(f"budget {1000 * budget:.0f} ms: confirmed at {rf.confirm} samples: best {result.best.compact()}, "
            f"cheapest at the baseline's quality {result.cheapest.compact()}")
    return result


def segment_seeds(cfg: DictConfig, singles: list[ModelSchedule], latency: dict, budget: float, zoo: Zoo,
                  selection: Selection, n: int) -> tuple[list[ModelSchedule], int]:
    """Two-segment schedules (OMS-DPM's "one member first, another after", which the predictor ranks worst) as the
    refinement's starting points: every solver/spacing pair of the baseline pool is probed on `refine.probes`
    of them at n samples (`segments.probe_runs`; pairs rank differently once members mix), and `refine.seeds`
    schedules are spread evenly over the two-segment families of the `refine.seed_samplers` pairs that mixed best
    and of the best single sampler's pair. Returns (seeds, the
    number of probe schedules measured)."""
    rf = cfg.search.refine
    members = {m: latency[m] for m in zoo.names if zoo.time_range(m) == FULL and m in latency}
    runs = two_segment_runs(members, budget)
    samplers = list(dict.fromkeys(s for s in map(Sampler.of, singles) if s is not None and s.spacing != AYS))
    if not runs or not samplers or len(members) < 2:
        return [], 0
    probes = probe_runs(members, budget, singles[0].meta.get("member", ""), int(rf.probes))
    ranked = rank_samplers(samplers, probes, zoo.schedule, selection.fid_at, n) if int(rf.probes) else []
    chosen = list(dict.fromkeys([s for s, _ in ranked[: int(rf.seed_samplers)]] + samplers[:1]))
    quota = [int(rf.seeds) // len(chosen) + (i < int(rf.seeds) % len(chosen)) for i in range(len(chosen))]
    seeds = [s for sampler, q in zip(chosen, quota)   # each pair's family evenly over its splits, best pair first
             for s in spread(in_range(zoo, segment_schedules(runs, [sampler], zoo.schedule)), q)]
    probed = len(segment_schedules(probes, samplers, zoo.schedule)) if ranked else 0
    return seeds, probed


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
    top = candidates(results, cfg.search.rerank.top_k, cfg.search.rerank.top_per_space)
    expressible = any(encode_exactly(space, baseline) is not None for space in spaces)
    if expressible and schedule_key(baseline) not in {schedule_key(s) for s in top}:
        top.append(baseline)
    plain_top = list(top)
    if cfg.search.iia == "rerank":  # the corrected versions compete beside the plain ones (IIA may hurt FID)
        top += with_iia(cfg, zoo, plain_top)
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


def zoo_and_profile(cfg: DictConfig, device) -> tuple[Zoo, object]:
    """The zoo (missing members trained first, `ensure_zoo`) and its latency profile (measured or cached)."""
    ensure_zoo(cfg)
    zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=list(cfg.zoo.members), device=device)
    profile = load_or_profile(zoo, latency_path(cfg.paths.checkpoints, str(cfg.data.name)),
                              batch_size=cfg.profile.batch_size, device=device,
                              max_age_hours=cfg.profile.max_age_hours, max_spread=cfg.profile.max_spread)
    return zoo, profile


# ----------------------------------------------------------------------------------------------- measuring
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


# ----------------------------------------------------------------------------------------------- evolution
def measured_records(selection: Selection, profile, n: int, dataset: list[dict], max_steps: int) -> list[dict]:
    """The selection seed's true FIDs at the dataset's sample count (the refinement's first races measure there)
    that the dataset does not hold, of schedules the predictor can encode (≤ max_steps steps): the predictor learns
    from every FID the search has measured at that count."""
    have = {r["key"] for r in dataset}
    out = []
    for r in selection.store(n).records():
        s = schedule_from_dict(r["schedule"])
        if r["fid"] is not None and r["key"] not in have and len(s.steps) <= max_steps:
            out.append({**r, "cost": profile.cost(s)})
    return out


def evolve(cfg: DictConfig, zoo: Zoo, profile, spaces: list, budget: float, predictor, ays: AYSTable):
    """The evolution stage: every space under the budget, scored by the predictor, starting from the best
    single-member samplers; with `search.ablation`, the same with time fixed. Returns (results, members-only
    results or None)."""
    starts = {budget: in_range(zoo, single_member_baselines(zoo.names, zoo.schedule, profile.latency, budget,
                                                            nfes="largest", ays=ays))}
    evolution = {**OmegaConf.to_container(cfg.search.evolution, resolve=True), "null_prob": cfg.search.dataset.null_prob}
    results = SearchCallback(spaces, profile.cost, [budget], seed=cfg.seed, evolution=evolution,
                             starts=starts).search(predictor)[budget]
    if not cfg.search.ablation:
        return results, None
    log("ablation: the same evolution with time fixed (members and solver families only)")
    return results, SearchCallback(members_only_spaces(spaces), profile.cost, [budget], seed=cfg.seed,
                                   evolution=evolution, starts=starts).search(predictor)[budget]


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
    spaces = make_spaces(str(cfg.search.space.kind), zoo.names, zoo.schedule, int(cfg.search.space.size), ays,
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
