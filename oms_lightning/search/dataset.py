"""The schedule→FID dataset stage and every true-FID measurement of the search: random schedules of every space
plus every member alone (`samplers.space_anchors`) and IIA-corrected anchors, measured in this process or spread
over Fabric processes (`measure`), kept in append-only record stores keyed by zoo and settings."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from oms_lightning import sampling
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.errors import UserError
from oms_lightning.io import file_lock
from oms_lightning.predictor.generate import generate_distributed, generate_records
from oms_lightning.predictor.records import RecordStore, fid_settings, settings_fingerprint
from oms_lightning.progress import job_log, waiting_for
from oms_lightning.samplers import space_anchors
from oms_lightning.schedule import ModelSchedule, schedule_key
from oms_lightning.schedule.file import schedule_from_dict, schedule_to_dict
from oms_lightning.search.space import random_schedules
from oms_lightning.zoo import Zoo

if TYPE_CHECKING:
    from oms_lightning.search.selection import Selection

log = job_log("search")


def in_range(zoo: Zoo, schedules: list[ModelSchedule]) -> list[ModelSchedule]:
    """The schedules whose every NFE runs a member inside its valid time range: a multi-decoder stage alone over
    the whole trajectory is no sampler (its decoder never saw the other stages)."""
    return [s for s in schedules if not zoo.out_of_range(s)]


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
        anchors += in_range(zoo, space_anchors(space, d.anchor_nfes))
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


def with_iia(cfg: DictConfig, zoo: Zoo, schedules: list[ModelSchedule]) -> list[ModelSchedule]:
    """The schedules with IIA coefficients fitted on the calibration seed (those whose solver has IIA features).
    Each fit is kept in the search cache (`iia-*.jsonl`, keyed by the plain schedule, bound to the zoo's weights and
    the calibration settings), so a rerun or a resumed search never fits one twice."""
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
                fit = sampling.fit_schedule(zoo, plain, calibration, int(c.sub_steps))
                known[key] = None if fit is None else schedule_to_dict(fit)
                store.append({"key": key, "schedule": known[key]})
            if known[key] is not None:
                fitted.append(schedule_from_dict(known[key]))
    return fitted


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
