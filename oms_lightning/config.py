"""Validation of composed Hydra configs: a wrong value ends with one message naming the key and the fix."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from oms_lightning.errors import UserError


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if value is None:
        raise UserError(f"missing config value `{key}`; set it on the command line, e.g. {key}=...")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key → (predicate, what a valid value is)
Rule = tuple[Callable[[Any], bool], str]
TRAIN_RULES: dict[str, Rule] = {
    "optim.lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "optim.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    "optim.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number ≥ 0"),
    "ema.decay": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1), e.g. 0.9999"),
    "model.dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "trainer.max_steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "trainer.val_check_interval": (lambda v: _is_int(v) and v > 0, "a positive integer (optimizer steps)"),
    "checkpoint_every": (lambda v: _is_int(v) and v > 0, "a positive integer (optimizer steps)"),
    "data.module.batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "sampling.steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "sampling.grid_size": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0 (0 = no grids)"),
    "seed": (_is_int, "an integer"),
}


def check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    for key, (ok, expected) in rules.items():
        value = _get(cfg, key)
        if not ok(value):
            raise UserError(f"invalid value {key}={value!r}: expected {expected}")


def shorten_validation_interval(cfg: DictConfig) -> bool:
    """A run shorter than one validation interval validates (and checkpoints) once, at its last step, so that
    `train.py trainer.max_steps=50` just works; True when the interval was changed."""
    steps, every = _get(cfg, "trainer.max_steps"), _get(cfg, "trainer.val_check_interval")
    if _is_int(steps) and _is_int(_get(cfg, "checkpoint_every")) and 0 < steps < cfg.checkpoint_every:
        cfg.checkpoint_every = steps
    if _is_int(steps) and _is_int(every) and 0 < steps < every:
        cfg.trainer.val_check_interval = steps
        return True
    return False


def validate_train_config(cfg: DictConfig) -> None:
    check_rules(cfg, TRAIN_RULES)
    if cfg.trainer.max_steps % cfg.trainer.val_check_interval:
        raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} must be a multiple of "
                        f"trainer.val_check_interval={cfg.trainer.val_check_interval}, so the last step is "
                        "validated and checkpointed")
    if cfg.trainer.max_steps % cfg.checkpoint_every:
        raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} must be a multiple of "
                        f"checkpoint_every={cfg.checkpoint_every}, so the last step is checkpointed")
    from oms_lightning.diffusion.noise_schedule import VPSchedule

    try:
        VPSchedule.from_dict(OmegaConf.to_container(cfg.diffusion, resolve=True))
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid diffusion settings: {e}") from None
