"""Running a ModelSchedule on a zoo: the bridge between schedules (which member per NFE, which times) and the
pure solvers of `oms_lightning.diffusion.solvers`, with per-sample seeds and batching."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from oms_lightning.progress import progress as progress_bar

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.seeding import SampleNoise, per_sample_noise
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.spacing import default_t_end
from oms_lightning.errors import UserError
from oms_lightning.steps import spacing_times
from oms_lightning.schedule import ModelSchedule


def solve(model_schedule: ModelSchedule, denoisers: Sequence[Callable], x: Tensor, noise: VPSchedule,
          sample_noise: SampleNoise | None = None) -> Tensor:
    """Integrate from x at the schedule's first time to its last, NFE j using denoisers[j]; `sample_noise` feeds a
    stochastic solver."""
    ts = torch.tensor(model_schedule.times, dtype=torch.float64)
    c = model_schedule.correction
    return get_solver(model_schedule.solver).run(
        denoisers, x, ts, noise, model_schedule.orders, noise=sample_noise,
        coefficients=None if c is None else [list(row) for row in c.coefficients],
        feature_set=None if c is None else c.feature_set)


def check_correction_weights(zoo, model_schedule: ModelSchedule) -> None:
    """IIA coefficients apply only to the weights they were fitted on (their members' zoo fingerprint)."""
    c = model_schedule.correction
    if c is not None and c.weights != zoo.fingerprint(model_schedule.member_names):
        raise UserError(f"the IIA coefficients of this schedule were fitted on other weights of "
                        f"{', '.join(model_schedule.member_names)} ({c.weights}, the zoo has "
                        f"{zoo.fingerprint(model_schedule.member_names)}): refit them with fit_coefficients.py")


def single_member_schedule(member: str, solver: str, steps: int, noise: VPSchedule, order: int | None = None,
                           spacing: str = "logsnr_uniform", t_end: float | None = None,
                           ays=None) -> ModelSchedule:
    """The ordinary sampler as a schedule: one member everywhere, `steps` steps of a spacing (a standard one, or
    `ays` with the σ levels of its steps file, see `oms_lightning.steps`).

    `order` is the NFEs per step of a variable-order solver (singlestep DPM-Solver, 1–3; default 1); the other
    solvers take their registry NFEs per step (multistep/DDIM 1, Heun 2) and refuse another order.
    """
    spec = get_solver(solver)
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    nfe_per_step = spec.uniform_nfe_per_step(order)
    t_end = default_t_end(steps * nfe_per_step) if t_end is None else t_end
    times = spacing_times(spacing, steps, noise, t_end, ays=ays)
    return ModelSchedule.single(member, times, solver=solver, orders=nfe_per_step, meta={"spacing": spacing})


@torch.inference_mode()
def generate(zoo, model_schedule: ModelSchedule, n: int, seed: int = 0, batch_size: int = 256,
             progress: bool = False, first_index: int = 0) -> Tensor:
    """Images first_index … first_index+n−1 of this seed in [-1, 1] (float32, CPU).

    Sample i starts from per_sample_noise(i, seed), so it is the same image whatever the batch size, device count
    or order of evaluation — schedules compared against each other see the same noise.
    """
    if n < 1:
        raise UserError(f"number of samples must be positive, got {n}")
    model_schedule.validate(zoo.names, t_min=zoo.schedule.t_min)
    check_correction_weights(zoo, model_schedule)
    denoisers = zoo.denoisers_for(model_schedule)
    stochastic = get_solver(model_schedule.solver).stochastic
    out = []
    starts = range(first_index, first_index + n, batch_size)
    for start in progress_bar(starts, desc=f"sampling {n} ({model_schedule.nfe} NFE)", disable=not progress,
                              leave=False):
        indices = range(start, min(start + batch_size, first_index + n))
        x = per_sample_noise(zoo.image_shape, indices, seed, dtype=zoo.dtype, device=zoo.device)
        # a stochastic solver's noise too is drawn per sample: image i never depends on the batch it is in
        sample_noise = SampleNoise(indices, seed) if stochastic else None
        out.append(solve(model_schedule, denoisers, x, zoo.schedule, sample_noise).clamp(-1, 1).float().cpu())
    return torch.cat(out)
