"""A ModelSchedule on a zoo: the bridge between schedules (which member per NFE, which times) and the pure maths of
`oms_lightning.diffusion` — running it (`generate`: per-sample seeds, batching) and fitting its IIA coefficients
(`fit_schedule`, what `fit_coefficients.py` and the search's IIA share)."""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from oms_lightning.diffusion import iia
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.seeding import SampleNoise, per_sample_noise
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.errors import UserError
from oms_lightning.progress import progress as progress_bar
from oms_lightning.schedule import ModelSchedule

if TYPE_CHECKING:
    from oms_lightning.zoo import Zoo


def log_iia(msg: str) -> None:
    print(f"[iia] {msg}", flush=True)


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


@torch.inference_mode()
def generate(zoo, model_schedule: ModelSchedule, n: int, seed: int = 0, batch_size: int = 256,
             progress: bool = False, first_index: int = 0) -> Tensor:
    """Images first_index … first_index+n−1 of this seed in [-1, 1] (float32, CPU).

    Sample i starts from per_sample_noise(i, seed), so it is the same image whatever the batch size, device count
    or order of evaluation — schedules compared against each other see the same noise.
    """
    if n < 1:
        raise UserError(f"number of samples must be positive, got {n}")
    model_schedule.validate(zoo.names, t_min=zoo.noise_schedule.t_min)
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
        out.append(solve(model_schedule, denoisers, x, zoo.noise_schedule, sample_noise).clamp(-1, 1).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- IIA on a schedule
def fine_reference_for(zoo: Zoo, plain: ModelSchedule, reference_member: str | None):
    """What IIA's fine sub-steps evaluate: the reference member, else each step's own members, with a multi-decoder
    stage member's routed net in its place (the sub-steps run between NFE times, possibly outside its stage)."""
    from oms_lightning.zoo import split_member_name   # late: the zoo times its members with `generate`

    if reference_member:
        return zoo.denoiser(reference_member)
    staged = any(split_member_name(m)[1] is not None for m in plain.member_names)
    return zoo.routed_denoisers_for(plain) if staged else None


def with_coefficients(plain: ModelSchedule, fit: iia.IIAFit, zoo: Zoo, settings: dict) -> ModelSchedule:
    """The plain schedule carrying the fitted coefficients and its members' weights fingerprint. The plain meta
    moves under "plain": numbers measured for the plain sampler (a search winner's FID, cost) are not the IIA's."""
    corrected = plain.with_correction(fit.feature_set, fit.coefficients, zoo.fingerprint(plain.member_names))
    return dataclasses.replace(corrected, meta={
        "plain": plain.meta, "iia": {"feature_set": fit.feature_set, "sub_steps": fit.sub_steps,
                                     "calibration": settings["calibration"],
                                     "reference_member": settings["reference_member"]}})


def fit_schedule(zoo: Zoo, plain: ModelSchedule, calibration: dict, sub_steps: int = 10,
                 feature_set: str | None = None) -> ModelSchedule | None:
    """`plain` carrying IIA coefficients (its solver's first feature set unless given) fitted on `calibration`
    noise ({n, held_out, seed}), or None when its solver has no IIA features: what `search.iia=rerank` applies to
    the search's top candidates."""
    from oms_lightning.zoo import split_member_name   # late: the zoo times its members with `generate`

    spec = get_solver(plain.solver)
    if not spec.feature_sets or any(split_member_name(m)[0] not in zoo for m in plain.member_names):
        return None   # (a stage member's fine reference needs its routed member in the zoo)
    settings = {"feature_set": feature_set or spec.feature_sets[0], "sub_steps": int(sub_steps),
                "calibration": dict(calibration), "reference_member": None}
    x_fit, x_held = calibration_noise(zoo, settings["calibration"])
    fit, _ = run_fit(zoo, plain.plain(), settings, x_fit, x_held, fine_reference_for(zoo, plain, None))
    return with_coefficients(plain.plain(), fit, zoo, settings)


def calibration_noise(zoo: Zoo, calibration: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples 0..n−1 of the calibration seed (the fit batch) and n..n+h−1 (the held-out batch): the same
    per-sample noise `generate` draws, so sample i of this seed is one image whatever the batch."""
    n, held, seed = calibration["n"], calibration["held_out"], calibration["seed"]

    def noise(indices: range) -> torch.Tensor:
        return per_sample_noise(zoo.image_shape, indices, seed, dtype=zoo.dtype, device=zoo.device)

    return noise(range(n)), noise(range(n, n + held))


def run_fit(zoo: Zoo, plain: ModelSchedule, settings: dict, x_fit, x_held, reference) -> tuple[iia.IIAFit, float]:
    """iia.fit_coefficients on the calibration noise; one log line per fitted step."""
    log_iia(f"fitting IIA {settings['feature_set']} for {plain.compact()}: {len(plain)} steps, {settings['sub_steps']} "
        f"fine sub-steps each, on {len(x_fit)} samples ({len(x_held)} held out, seed "
        f"{settings['calibration']['seed']}), fine reference from "
        + (f"member {settings['reference_member']}" if settings["reference_member"] else "each step's own members"))
    started = time.perf_counter()
    with warnings.catch_warnings(), progress_bar(total=len(plain), desc="IIA fit", unit="step", leave=False) as bar:
        # a singular or ill-conditioned step falls back to a ridge; the per-step lines below say so (`fallback`)
        warnings.simplefilter("ignore", iia.IIAFitWarning)
        fit = iia.fit_coefficients(plain.solver, zoo.denoisers_for(plain), schedule_times(plain), plain.orders,
                                   zoo.noise_schedule, x_fit, x_held, settings["feature_set"], settings["sub_steps"],
                                   reference=reference, on_step=lambda i, step: bar.update())
    seconds = time.perf_counter() - started
    for i, step in enumerate(fit.steps):
        log_iia(step_line(i, step, fit.features))
    log_iia(f"fitted in {seconds:.1f} s")
    return fit, seconds


def schedule_times(schedule: ModelSchedule) -> torch.Tensor:
    return torch.tensor(schedule.times, dtype=torch.float64)


def step_line(i: int, step: iia.StepFit, features: list[str]) -> str:
    coefficients = ", ".join(f"{name} {c:+.4f}" for name, c in zip(features, step.coefficients))
    held = (f"; held-out {step.held_before:.4g} → {step.held_after:.4g}" if step.held_before is not None else "")
    condition = "-" if step.condition is None else f"{step.condition:.3g}"
    fallback = " (singular: ridge fallback)" if step.fallback else ""
    return (f"step {i}: {coefficients}; residual {step.fit_before:.4g} → {step.fit_after:.4g}{held}; "
            f"condition {condition}, ridge {step.ridge:g}{fallback}")
