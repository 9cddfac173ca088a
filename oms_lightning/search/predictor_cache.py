"""The predictor stage: a predictor trained on the records, cached by the records and settings it was trained on,
so a multirun over budgets (or a rerun) trains it once."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oms_lightning.io import atomic_write_text, file_lock
from oms_lightning.predictor.encoding import DEFAULT_FEATURES, DEFAULT_SOLVERS
from oms_lightning.predictor.module import PredictorModule, fit_predictor
from oms_lightning.progress import job_log, waiting_for
from oms_lightning.zoo import Zoo

log = job_log("search")


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
            records, list(zoo.names), zoo.noise_schedule.to_dict(), max_steps,
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
