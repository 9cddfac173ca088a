"""W&B through Lightning's WandbLogger: online with a key, offline without one, off with `logger=none`."""
from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_write_text

MODES = ("auto", "online", "offline", "disabled")


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"logger.mode={mode!r} is not one of {MODES}")
    if os.environ.get("WANDB_MODE"):  # the environment wins, as in wandb itself (tests set WANDB_MODE=disabled)
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if has_wandb_key() else "offline"
    return mode


def make_logger(cfg, name: str, group: str | None = None, run_id_file: str | Path | None = None,
                config: dict | None = None) -> WandbLogger | bool:
    """A WandbLogger (or False for `logger=none`). With `run_id_file`, the W&B run id is stored there and
    reused, so a resumed training continues the same W&B run."""
    if cfg.kind == "none":
        return False
    if cfg.kind != "wandb":
        raise UserError(f"unknown logger kind {cfg.kind!r}; use logger=wandb or logger=none")
    mode = resolve_mode(cfg.mode)
    run_id = uuid.uuid4().hex[:12]
    if run_id_file is not None:
        if Path(run_id_file).is_file():
            run_id = Path(run_id_file).read_text().strip() or run_id
        elif rank_zero_only.rank == 0:
            atomic_write_text(run_id_file, run_id)
    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=cfg.project, entity=cfg.entity, name=name, group=group, tags=list(cfg.tags),
                         save_dir=cfg.save_dir, id=run_id, resume="allow", mode=mode, config=config)
    # Lightning passes `anonymous=None` to wandb.init, which wandb ≥ 0.19 answers with a deprecation warning on
    # every run; the setting does nothing, so it is dropped.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger
