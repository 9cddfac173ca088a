"""Train one zoo member (what `python train.py` and the search's missing members run) and write
`checkpoints/<data>/<member>.ckpt` (EMA weights) + a grid.

Layout for member M on data D (paths.run_dir):
    checkpoints/D/M.ckpt         the zoo member (EMA weights, plain containers; what sampling and search load)
    checkpoints/D/M.png          sample grid of the final EMA weights
    checkpoints/D/M/last.ckpt    full training state for resume (raw + EMA weights, optimizer, step)
    checkpoints/D/M/samples/     a grid per validation
    checkpoints/D/M/wandb_run_id.txt   so a resumed run logs into the same W&B run
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from omegaconf import DictConfig, OmegaConf

from oms_lightning.config import shorten_validation_interval, validate_train_config
from oms_lightning.errors import UserError
from oms_lightning.images import save_grid
from oms_lightning.io import file_lock, remove_orphans
from oms_lightning.progress import PlainProgressBar, job_log, on_terminal, waiting_for
from oms_lightning.tracking import make_logger
from oms_lightning.training.callbacks import EMA, AtomicCheckpointIO
from oms_lightning.training.module import DiffusionModule, module_from_config
from oms_lightning.zoo import check_training_checkpoint, load_member, save_member, split_member_name, train_command


def member_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.checkpoints) / str(cfg.data.name) / f"{cfg.model.name}.ckpt"


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); choose another folder with "
                        "paths.checkpoints=/some/writable/dir") from None


def resolve_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`ckpt_path=last` → this member's last.ckpt; a path → that file; refuse to silently clobber a run or a
    trained member (its training folder may be gone while the member file, the product, remains)."""
    last = run_dir / "last.ckpt"
    if cfg.ckpt_path is None:
        if last.exists() and not cfg.overwrite:
            raise UserError(f"{run_dir} already holds a training run. Resume it with ckpt_path=last, or start "
                            "over with overwrite=true (its checkpoints are replaced).")
        if member_path(cfg).exists() and not cfg.overwrite:
            raise UserError(f"{member_path(cfg)} is already a trained zoo member (its training state in {run_dir} "
                            "is gone, so it cannot be resumed). Train it again with overwrite=true (the member "
                            "file is replaced when the new run finishes) or use another paths.checkpoints.")
        return None
    path = last if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume at {path}; train without ckpt_path first")
    return path


def check_accelerator(trainer_cfg: DictConfig) -> None:
    if str(trainer_cfg.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("trainer.accelerator asks for a CUDA GPU but none is available on this machine; "
                        "use trainer.accelerator=cpu (or auto)")


def build_trainer(cfg: DictConfig, logger, run_dir: Path) -> L.Trainer:
    check_accelerator(cfg.trainer)
    callbacks = [
        EMA(decay=cfg.ema.decay, warmup=cfg.ema.warmup),
        # Only the latest full training state is kept: the zoo member file is the product.
        ModelCheckpoint(dirpath=run_dir, save_top_k=0, save_last=True, every_n_train_steps=cfg.checkpoint_every),
        ThroughputMonitor(batch_size_fn=len),
    ]
    if cfg.trainer.get("enable_progress_bar", True) and not on_terminal(sys.stdout):
        callbacks.append(PlainProgressBar())   # a log gets one line per interval, not a redraw per step
    extra = {}
    if cfg.model.get("network") == "multidecoder" and cfg.trainer.get("strategy") == "ddp":
        # a batch may hold no sample of some stage: that decoder then takes no part in the loss, which plain DDP
        # refuses; this strategy lets it sit out the step
        extra["strategy"] = "ddp_find_unused_parameters_true"
    try:
        return instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
                           plugins=[AtomicCheckpointIO()], **extra)
    except MisconfigurationException as e:
        raise UserError(f"invalid trainer settings: {e}") from None


def expected_hparams(module: DiffusionModule) -> dict:
    """What a checkpoint must share with this run to be resumed by it."""
    h = module.hparams
    return {"model_name": h.model_name, "net": h.net, "data": h.data, "noise": h.noise}


def train_member(cfg: DictConfig) -> dict:
    """Train one member as configured; returns a summary (paths, steps, val loss, wall time)."""
    if shorten_validation_interval(cfg):
        print(f"trainer.max_steps={cfg.trainer.max_steps} is shorter than one validation interval: validating once, "
              f"at the last step")
    validate_train_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    ensure_writable(run_dir)
    ckpt_path = resolve_resume(cfg, run_dir)
    remove_orphans(run_dir, "last.ckpt")  # a save killed midway left its temporary file, never a torn last.ckpt
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data.module)
    module = module_from_config(cfg, str(cfg.data.name), int(cfg.data.image_size), int(cfg.data.channels))
    module.run_dir = run_dir
    start_step = 0
    if ckpt_path is not None:
        start_step = check_training_checkpoint(ckpt_path, expected_hparams(module))
    elif cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)

    logger = make_logger(cfg.logger, name=f"train-{cfg.data.name}-{cfg.model.name}", group=f"zoo-{cfg.data.name}",
                         run_id_file=run_dir / "wandb_run_id.txt", config=OmegaConf.to_container(cfg, resolve=True))
    if logger:
        logger.log_hyperparams({"num_parameters": module.num_parameters()})
    trainer = build_trainer(cfg, logger, run_dir)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    wall = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, module, trainer, wall, trainer.global_step - start_step)


def same_weights(path: Path, state_dict: dict) -> bool:
    """True when the member file at `path` already holds exactly these weights (a resume with no steps left)."""
    if not path.is_file():
        return False
    try:
        stored = load_member(path).net.state_dict()
    except UserError:
        return False
    return stored.keys() == state_dict.keys() and all(torch.equal(stored[k], state_dict[k].cpu()) for k in stored)


def finish(cfg: DictConfig, module: DiffusionModule, trainer: L.Trainer, wall: float, steps_run: int) -> dict:
    """After fit the module holds the EMA weights (the callback copies them in): write the member and a grid.
    A member file changes only when its weights do, so a no-op resume keeps every cache keyed by it."""
    val_loss = trainer.callback_metrics.get("val/loss")
    val_loss = float(val_loss) if val_loss is not None else float("nan")
    h = module.hparams
    path = member_path(cfg)
    unchanged = same_weights(path, module.net.state_dict())
    if not unchanged:
        save_member(path, name=h.model_name, net_kwargs=h.net, noise=h.noise, data=h.data,
                    state_dict=module.net.state_dict(),
                    meta={"global_step": trainer.global_step, "val_loss": val_loss,
                          "num_parameters": module.num_parameters(), "ema_decay": float(cfg.ema.decay)})
        grid = save_grid(module.sample(module.sampling["grid_size"] or 64), path.with_suffix(".png"))
    else:
        grid = path.with_suffix(".png")
    summary = {"member": str(path), "grid": str(grid), "run_dir": str(cfg.paths.run_dir),
               "global_step": trainer.global_step, "steps_run": steps_run, "member_unchanged": unchanged,
               "val_loss": val_loss, "wall_seconds": round(wall, 1), "num_parameters": module.num_parameters()}
    if unchanged:
        print(f"\n{h.model_name} on {h.data['name']} was already trained to step {trainer.global_step}: nothing to do, "
              f"member file unchanged\n  zoo member (EMA weights): {path}")
        return summary
    resumed = f" (resumed at step {trainer.global_step - steps_run})" if steps_run < trainer.global_step else ""
    print(f"\ntrained {h.model_name} on {h.data['name']}: {steps_run} steps in {wall:.0f} s{resumed}, "
          f"val loss {val_loss:.4f}, {module.num_parameters():,} parameters\n"
          f"  zoo member (EMA weights): {path}\n  sample grid:              {grid}\n"
          f"  training state (resume):  {Path(cfg.paths.run_dir) / 'last.ckpt'}  (ckpt_path=last)")
    return summary


# ------------------------------------------------------------------------------------------ a zoo's missing members
log = job_log("search")   # the search trains a zoo's missing members through this code path


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

    for m in missing:
        train_cfg = compose("train", overrides=[f"model={m}", f"data={cfg.data.name}",
                                                f"paths.checkpoints={cfg.paths.checkpoints}", *cfg.zoo.train_overrides])
        # a search killed while training this member left its training state: continue it, never start over
        resume = (Path(train_cfg.paths.run_dir) / "last.ckpt").is_file()
        if resume:
            train_cfg.ckpt_path = "last"
        log(f"{'resuming' if resume else 'training'} missing zoo member {m!r} ({', '.join(cfg.zoo.train_overrides)})")
        train_member(train_cfg)
