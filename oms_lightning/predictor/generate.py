"""Schedule → FID records: sample every schedule with the same per-sample noise, score it, append it to the store.

    store = RecordStore("outputs/records.jsonl", zoo.fingerprint(), fid_settings(evaluator, n=1000, seed=0))
    generate_records(zoo, schedules, store, evaluator, n=1000, seed=0, batch_size=256, profile=profile)

Resumable: schedules whose key is already in the store are skipped, and each record is appended (fsync'ed) as
soon as it is done. `generate_distributed` splits the same work over Lightning Fabric processes (one shard
file per rank, merged by rank 0 in the input order, so the store equals a single-process run's).
"""
from __future__ import annotations

import logging
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from oms_lightning.progress import progress as progress_bar

from oms_lightning.errors import UserError
from oms_lightning.predictor.records import RecordStore, fid_settings, schedule_key, settings_fingerprint
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import schedule_to_dict

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(hours=12)  # ranks that finish early wait for the slowest at a barrier


def evaluate_schedule(zoo, schedule: ModelSchedule, evaluator, n: int, seed: int, batch_size: int, profile) -> dict:
    """Generate n images (sample i from noise (seed, i), as for every schedule), score their FID → one record."""
    start = time.perf_counter()
    images = generate(zoo, schedule, n, seed=seed, batch_size=batch_size)
    result = evaluator.fid(images, seed)
    fid = float(result.value)
    return {"schedule": schedule_to_dict(schedule), "key": schedule_key(schedule),
            "cost": float(profile.cost(schedule)), "nfe": schedule.nfe, "fid": fid if math.isfinite(fid) else None,
            "n": int(result.n), "extractor": result.extractor, "seed": int(seed), "zoo": zoo.fingerprint(),
            "settings": settings_fingerprint(fid_settings(evaluator, n, seed)),
            "seconds": time.perf_counter() - start}


def _check_store(zoo, store: RecordStore, evaluator, n: int, seed: int) -> None:
    if store.zoo != zoo.fingerprint():
        raise UserError(f"record store {store.path} is bound to zoo {store.zoo}, but this zoo is {zoo.fingerprint()}; "
                        f"open it with RecordStore(path, zoo.fingerprint(), ...)")
    wanted = fid_settings(evaluator, n, seed)
    if store.settings_fingerprint != settings_fingerprint(wanted):
        raise UserError(f"record store {store.path} was opened with FID settings {store.settings}, but generation "
                        f"uses {wanted}; open it with RecordStore(path, zoo.fingerprint(), "
                        f"fid_settings(evaluator, n, seed))")


def _unique(schedules: Sequence[ModelSchedule]) -> list[tuple[str, ModelSchedule]]:
    seen, out = set(), []
    for s in schedules:
        k = schedule_key(s)
        if k not in seen:
            seen.add(k)
            out.append((k, s))
    return out


def generate_records(zoo, schedules: Sequence[ModelSchedule], store: RecordStore, evaluator, n: int, seed: int,
                     batch_size: int, profile, progress: bool = True) -> list[dict]:
    """Evaluate every schedule not yet in `store` (in order), appending each record as soon as it is done.

    Returns the records of `schedules` (existing and new) in input order, one per distinct schedule.
    """
    _check_store(zoo, store, evaluator, n, seed)
    by_key = {r["key"]: r for r in store.records()}
    unique = _unique(schedules)
    todo = [(k, s) for k, s in unique if k not in by_key]
    if len(todo) < len(unique):
        log.info("%s: %d of %d distinct schedules already have records; evaluating %d", store.path,
                 len(unique) - len(todo), len(unique), len(todo))
    with progress_bar(total=len(todo), desc="schedule→FID", unit="schedule", disable=not progress or not todo,
              dynamic_ncols=True) as bar:
        for key, schedule in todo:
            record = evaluate_schedule(zoo, schedule, evaluator, n, seed, batch_size, profile)
            store.append(record)
            by_key[key] = record
            bar.set_postfix(nfe=record["nfe"], fid=record["fid"], refresh=False)
            bar.update()
    return [by_key[k] for k, _ in unique]


# ---------------------------------------------------------------------------------------------------------------
# Distributed (Lightning Fabric)
# ---------------------------------------------------------------------------------------------------------------
def shard_path(store_path: str | os.PathLike, rank: int) -> Path:
    """records.jsonl → records.rank<r>.jsonl (next to the store)."""
    p = Path(store_path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.jsonl'}")


def _shard_files(store_path: Path) -> list[Path]:
    p = Path(store_path)
    found = p.parent.glob(f"{p.stem}.rank*{p.suffix or '.jsonl'}")
    return sorted((f for f in found if f.stem.rsplit(".rank", 1)[-1].isdigit()),
                  key=lambda f: int(f.stem.rsplit(".rank", 1)[-1]))


def merge_shards(store: RecordStore, order: Sequence[str] = ()) -> int:
    """Append the records of every shard file of `store` not yet in it — keys in `order` first, in that order,
    then any others in shard order — and delete the shard files. Idempotent after a crash. Returns the count."""
    shards = _shard_files(store.path)
    if not shards:
        return 0
    pending: dict[str, dict] = {}
    for f in shards:
        for r in RecordStore(f, store.zoo, store.settings).records():
            pending.setdefault(r["key"], r)
    done = store.done_keys()
    rank = {k: i for i, k in enumerate(order)}
    keys = sorted((k for k in pending if k not in done), key=lambda k: (rank.get(k, len(rank)),))
    for k in keys:
        store.append(pending[k])
    for f in shards:
        f.unlink()
    log.info("%s: merged %d record(s) from %d shard file(s)", store.path, len(keys), len(shards))
    return len(keys)


def _strategy(strategy: Any, timeout: timedelta) -> Any:
    """A DDP-family strategy name becomes its strategy object with a long collective timeout."""
    if isinstance(strategy, str):
        from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

        entry = STRATEGY_REGISTRY[strategy] if strategy in STRATEGY_REGISTRY else None
        if entry is not None and entry["strategy"] is DDPStrategy:
            return DDPStrategy(**entry["init_params"], timeout=timeout)
    return strategy


def _to_device(zoo, evaluator, device):
    """The zoo (reloaded) and evaluator on this rank's device; unchanged when already there."""
    import torch

    from oms_lightning.zoo import Zoo

    device = torch.device(device)
    if zoo.device != device:
        zoo = Zoo.load(zoo.root, zoo.data_name, zoo.names, device=device, dtype=zoo.dtype)
    metric = getattr(evaluator, "metric", None)
    if metric is not None and getattr(evaluator, "device", device) != device:
        evaluator.metric = metric.to(device)
        evaluator.device = device
    return zoo, evaluator


def _worker(fabric, zoo, schedule_dicts, store_path, evaluator, n, seed, batch_size, profile_dict,
            progress) -> list[dict]:
    from oms_lightning.schedule.file import schedule_from_dict
    from oms_lightning.zoo import LatencyProfile

    rank, world = fabric.global_rank, fabric.world_size
    schedules = [schedule_from_dict(d) for d in schedule_dicts]
    profile = LatencyProfile.from_dict(profile_dict)
    settings = fid_settings(evaluator, n, seed)
    store_path = Path(store_path)
    order = [k for k, _ in _unique(schedules)]
    if store_path.exists():  # every rank checks the header, so a foreign store stops all ranks at once
        RecordStore(store_path, zoo.fingerprint(), settings)
    if rank == 0:  # create the store; a previous interrupted run's shards go in first
        merge_shards(RecordStore(store_path, zoo.fingerprint(), settings), order)
    fabric.barrier()
    store = RecordStore(store_path, zoo.fingerprint(), settings)
    zoo, evaluator = _to_device(zoo, evaluator, fabric.device)
    if world == 1:
        return generate_records(zoo, schedules, store, evaluator, n, seed, batch_size, profile, progress)
    done = store.done_keys()
    todo = [s for k, s in _unique(schedules) if k not in done]
    shard = RecordStore(shard_path(store_path, rank), zoo.fingerprint(), settings)
    generate_records(zoo, todo[rank::world], shard, evaluator, n, seed, batch_size, profile,
                     progress=progress and rank == 0)
    fabric.barrier()
    if rank == 0:
        merge_shards(store, order)
    fabric.barrier()
    by_key = {r["key"]: r for r in store.records()}
    return [by_key[k] for k in order]


def generate_distributed(zoo, schedules: Sequence[ModelSchedule], store_path: str | os.PathLike, evaluator, n: int,
                         seed: int, batch_size: int, profile, *, accelerator: Any = "auto", devices: Any = 1,
                         num_nodes: int = 1, strategy: Any = "auto", progress: bool = True,
                         timeout: timedelta = DEFAULT_TIMEOUT) -> list[dict]:
    """`generate_records` over Fabric processes: rank r evaluates the not-yet-done schedules i with
    i % world_size == r into `<store stem>.rank<r>.jsonl`; after a barrier rank 0 merges the shards into the store
    in input order and deletes them. Shards left by an interrupted run are merged first, so a re-run resumes.

    devices=1 runs in this process (no launch). strategy="ddp_spawn" starts the ranks as fresh processes that
    receive these arguments (what a job calls many times, as the search does); with strategy="ddp" the script
    itself is re-run for the other ranks (as Lightning's Trainer does), so everything before this call must be
    deterministic. Schedules and the profile cross the process boundary as plain dicts (Fabric's spawn refuses
    frozen dataclasses); each rank reloads the zoo and moves the evaluator to its device. Returns the records of
    `schedules` in input order on every rank.
    """
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=_strategy(strategy, timeout))
    return fabric.launch(_worker, zoo, [schedule_to_dict(s) for s in schedules], str(store_path), evaluator, n,
                         seed, batch_size, profile.to_dict(), progress)
