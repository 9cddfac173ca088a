"""What two jobs build the same way: the zoo with the schedule it samples, from `model=` + spacing or a schedule
file (sample.py, and fit_coefficients.py for its plain schedule). Not a job: jobs import it. The other shared
pieces live in the library: the device `zoo.resolve_device`, the evaluator wiring `metrics.sample_metrics_for`, log
lines `progress.job_log`, zoo training `training.train_member`."""
from __future__ import annotations

from omegaconf import DictConfig

from oms_lightning.diffusion.ays_steps import AYS, ays_levels, find_steps
from oms_lightning.errors import UserError
from oms_lightning.samplers import single_member_schedule
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import load_schedule
from oms_lightning.zoo import Zoo


def member_name(cfg: DictConfig) -> str | None:
    """`model=<preset>` selects configs/model/<preset>.yaml (absent by default): its name is the member's."""
    model = cfg.get("model")
    return None if model is None else str(model.name)


def load_zoo_and_schedule(cfg: DictConfig, device) -> tuple[Zoo, ModelSchedule]:
    """The schedule file (read once) or one member everywhere, and a zoo holding just the members it uses."""
    if (member_name(cfg) is None) == (cfg.schedule is None):
        raise UserError("give exactly one of model=<member> (one member for every step) or schedule=PATH.json")
    loaded = load_schedule(cfg.schedule) if cfg.schedule is not None else None
    names = [member_name(cfg)] if loaded is None else list(loaded.member_names)
    zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=names, device=device)
    if loaded is None:
        ays = (ays_levels(find_steps(cfg.paths.checkpoints, str(cfg.data.name), names[0], zoo.fingerprint(),
                                     str(cfg.solver))) if cfg.spacing == AYS else None)
        loaded = single_member_schedule(names[0], str(cfg.solver), cfg.steps, zoo.noise_schedule, order=cfg.order,
                                        spacing=str(cfg.spacing), t_end=cfg.t_end, ays=ays)
    return zoo, loaded.validate(zoo.names, t_min=zoo.noise_schedule.t_min)
