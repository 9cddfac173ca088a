"""`python fit_coefficients.py model=M solver=S steps=N | schedule=PATH.json`: IIA coefficients for one sampler.

IIA (Zhang, Kenta, Kleijn, ICLR 2024; PAPERS.md §3) keeps the networks and the times and fits, per step, a few
coefficients in front of the step's gradient terms so that the coarse step matches a fine integration.

the plain schedule (one member with a spacing, exactly as sample.py builds it, or any schedule file, e.g. a
mixed-member search result) → calibration noise (samples 0..n−1 of the calibration seed to fit on, n..n+h−1 held
out) → `iia.fit_coefficients` (step by step, on the states the corrected sampler visits, against M fine sub-steps)
→ into paths.run_dir:
  schedule.json  the v2 schedule carrying the coefficients and the weights fingerprint of its members:
                 sample.py (any `sampling.generate`) applies it, and refuses it once a member is retrained;
  fit.json       per step: coefficients, condition number, chosen ridge, residual before / after on the fit and the
                 held-out batch; the held-out error of the plain and the IIA sampler against a `fine_steps`
                 reference from the same noise; the fit's seconds;
  summary.json   IIA against the plain sampler, paired on fresh seeds through `oms_lightning.evaluation`
                 (`evaluation.n=0` skips it), and the wall-time overhead of the corrected sampler (goal ≤ 1.03);
  grid.png       IIA samples (grid_plain.png: the plain sampler on the same noise).
The paper's warning stands: a lower local error need not mean a better FID — the comparison is the verdict.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from oms_lightning.diffusion import iia
from oms_lightning.diffusion.solvers import SOLVER_REGISTRY, SolverSpec, get_solver
from oms_lightning.errors import UserError
from oms_lightning.evaluation import Evaluation, check_fresh_seeds, compare
from oms_lightning.images import save_grid
from oms_lightning.io import atomic_write_text
from oms_lightning.jobs.common import load_zoo_and_schedule, member_name
from oms_lightning.metrics import sample_metrics_for
from oms_lightning.progress import job_log
from oms_lightning.sampling import (calibration_noise, fine_reference_for, generate, run_fit, schedule_times,
                                    with_coefficients)
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import save_schedule
from oms_lightning.zoo import resolve_device, split_member_name, time_schedules, Zoo

OVERHEAD_GOAL = 1.03   # IIA costs no extra NFE: the corrected sampler should be within 3 % of the plain one's time
GRID_SAMPLES = 64


log = job_log("fit_coefficients")


# ----------------------------------------------------------------------------------------------- settings
def choose_feature_set(spec: SolverSpec, requested) -> str:
    """The requested IIA feature set, checked against the solver (the registry's error), or the solver's first."""
    if requested is not None:
        spec.feature_names(str(requested))
        return str(requested)
    if not spec.feature_sets:
        with_features = ", ".join(n for n, s in SOLVER_REGISTRY.items() if s.feature_sets)
        raise UserError(f"{spec.name} has no IIA feature sets, so there is nothing to fit; solvers with IIA "
                        f"features: {with_features}")
    return spec.feature_sets[0]


def _count(key: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{key} must be an integer >= {least}, got {value!r}")
    return value


def check_settings(cfg: DictConfig) -> dict:
    """The run's settings as plain data, refused before any work when wrong. With schedule=, the solver and the
    feature set are checked once the file is read (`load_plain_schedule`)."""
    member = member_name(cfg)
    if (member is None) == (cfg.schedule is None):
        raise UserError("give exactly one of model=<member> (one member for every step) or schedule=PATH.json")
    solver = feature_set = None
    if member is not None:
        spec = get_solver(str(cfg.solver))
        feature_set = choose_feature_set(spec, cfg.feature_set)
        _count("steps", cfg.steps, 1)
        spec.uniform_nfe_per_step(cfg.order)
        solver = spec.name
    f = cfg.fit_coefficients
    for key, value, least in (("sub_steps", cfg.sub_steps, 1), ("fine_steps", cfg.fine_steps, 1),
                              ("fit_coefficients.calibration.n", f.calibration.n, 2),
                              ("fit_coefficients.calibration.held_out", f.calibration.held_out, 2),
                              ("fit_coefficients.calibration.seed", f.calibration.seed, 0),
                              ("fit_coefficients.timing.batch_size", f.timing.batch_size, 1),
                              ("fit_coefficients.timing.rounds", f.timing.rounds, 1),
                              ("fit_coefficients.evaluation.n", f.evaluation.n, 0),
                              ("fit_coefficients.evaluation.batch_size", f.evaluation.batch_size, 1)):
        _count(key, value, least)
    if f.evaluation.n == 1:
        raise UserError("fit_coefficients.evaluation.n must be 0 (no FID comparison) or >= 2 samples per seed")
    calibration = {"n": int(f.calibration.n), "held_out": int(f.calibration.held_out),
                   "seed": int(f.calibration.seed)}
    # the evaluation seeds make the comparison and the grid: never the noise the coefficients were fitted on
    seeds = check_fresh_seeds(f.evaluation.seeds, {"the calibration noise": calibration["seed"]})
    reference = cfg.reference_member
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise UserError(f"reference_member must be a zoo member name or null, got {reference!r}")
    return {"member": member, "schedule_file": None if cfg.schedule is None else str(cfg.schedule),
            "solver": solver, "feature_set": feature_set, "sub_steps": int(cfg.sub_steps),
            "fine_steps": int(cfg.fine_steps), "reference_member": reference, "calibration": calibration,
            "eval_seeds": seeds, "eval_n": int(f.evaluation.n)}


# ----------------------------------------------------------------------------------------------- the job
def fit_coefficients(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    settings = check_settings(cfg)
    zoo, plain = load_plain_schedule(cfg, settings, resolve_device(str(cfg.device)))
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    reference = fine_reference_for(zoo, plain, settings["reference_member"])
    x_fit, x_held = calibration_noise(zoo, settings["calibration"])
    fit, fit_seconds = run_fit(zoo, plain, settings, x_fit, x_held, reference)
    corrected = with_coefficients(plain, fit, zoo, settings)
    save_schedule(corrected, run_dir / "schedule.json")

    held_out = held_out_errors(zoo, plain, fit, x_held, settings["fine_steps"], reference)
    fit_payload = fit_record(fit, plain, corrected, zoo, settings, fit_seconds, held_out)
    atomic_write_text(run_dir / "fit.json", json.dumps(fit_payload, indent=2, allow_nan=False) + "\n")

    grids = write_grids(zoo, plain, corrected, settings["eval_seeds"][0], run_dir)
    summary = {"schedule": corrected.compact(), "plain_schedule": plain.compact(), "nfe": plain.nfe,
               "solver": plain.solver, "members": plain.member_names, "feature_set": fit.feature_set,
               "features": fit.features, "settings": settings, "fit_seconds": fit_payload["fit_seconds"],
               "held_out_error": held_out,
               "overhead": overhead(zoo, plain, corrected, cfg.fit_coefficients.timing),
               "comparison": evaluate(cfg, settings, zoo, plain, corrected),
               "files": {"schedule": str(run_dir / "schedule.json"), "fit": str(run_dir / "fit.json"), **grids}}
    summary["wall_seconds_total"] = round(time.perf_counter() - started, 1)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    track(cfg, fit, summary)
    report(summary, fit, run_dir)
    return summary


def load_plain_schedule(cfg: DictConfig, settings: dict, device) -> tuple[Zoo, ModelSchedule]:
    """sample.py's schedule (one member with a spacing, or the file) without coefficients, and a zoo holding its
    members and the reference member; the solver and feature set are settled into `settings`."""
    zoo, loaded = load_zoo_and_schedule(cfg, device)
    if loaded.correction is not None:
        log(f"{settings['schedule_file']} carries IIA coefficients ({loaded.correction.feature_set}): they are "
            f"refitted from its plain schedule")
    plain = loaded.plain()
    settings["solver"] = plain.solver
    settings["feature_set"] = choose_feature_set(get_solver(plain.solver), cfg.feature_set)
    settings["schedule"] = plain.compact()
    reference = settings["reference_member"]
    routed = {split_member_name(m)[0] for m in plain.member_names}       # stage members' references run routed
    missing = sorted(({reference} if reference is not None else routed) - set(zoo.names))
    if missing:
        zoo = Zoo.load(cfg.paths.checkpoints, str(cfg.data.name), names=[*zoo.names, *missing], device=device)
    if reference is not None and zoo.time_range(reference) != (0.0, 1.0):
        raise UserError(f"reference_member={reference!r} may run only at t in {zoo.time_range(reference)} (a "
                        f"multi-decoder stage), but the fine reference runs over every step; use its routed member "
                        f"or a plain member")
    return zoo, plain


@torch.no_grad()
def held_out_errors(zoo: Zoo, plain: ModelSchedule, fit: iia.IIAFit, x_held, fine_steps: int, reference) -> dict:
    """Mean ‖x_N − x_ref‖² of the plain and the IIA sampler from the held-out noise, x_ref a fine_steps
    integration of it (`iia.fine_solution`; computed once for both, where two `iia.sampler_error` calls would
    integrate it twice). The held-out batch also chose the ridges: a mild optimism for IIA."""
    spec, denoisers, ts = get_solver(plain.solver), zoo.denoisers_for(plain), schedule_times(plain)
    fine = iia.fine_solution(spec, denoisers, ts, plain.orders, zoo.noise_schedule, x_held, fine_steps=fine_steps,
                             reference=reference)
    errors = {}
    for name, coefficients in (("plain", None), ("iia", fit.coefficients)):
        out = spec.run(denoisers, x_held, ts, zoo.noise_schedule, plain.orders, coefficients=coefficients,
                       feature_set=fit.feature_set)
        errors[name] = iia.mean_sq_error(out, fine)
    ratio = errors["iia"] / errors["plain"] if errors["plain"] > 0 else None
    return {**errors, "ratio": ratio, "fine_steps": fine_steps, "n": len(x_held)}


def fit_record(fit: iia.IIAFit, plain: ModelSchedule, corrected: ModelSchedule, zoo: Zoo, settings: dict,
               fit_seconds: float, held_out: dict) -> dict:
    """fit.json: the fit (per step: coefficients, condition number, ridge, residuals) and what it was made from."""
    reference = settings["reference_member"]
    return {**fit.to_dict(), "schedule": plain.compact(), "weights": corrected.correction.weights,
            "reference_member": reference, "reference_weights": zoo.fingerprint([reference]) if reference else None,
            "calibration": settings["calibration"], "fit_seconds": round(fit_seconds, 2), "held_out_error": held_out}


def write_grids(zoo: Zoo, plain: ModelSchedule, corrected: ModelSchedule, seed: int, run_dir: Path) -> dict:
    """IIA samples and the plain sampler's from the same noise (the first evaluation seed), for the eye."""
    paths = {"grid": run_dir / "grid.png", "grid_plain": run_dir / "grid_plain.png"}
    for (name, path), schedule in zip(paths.items(), (corrected, plain)):
        save_grid(generate(zoo, schedule, GRID_SAMPLES, seed=seed, batch_size=GRID_SAMPLES), path)
    return {name: str(path) for name, path in paths.items()}


def overhead(zoo: Zoo, plain: ModelSchedule, corrected: ModelSchedule, timing: DictConfig) -> dict:
    """Wall time of the corrected sampler over the plain one's, one batch each, interleaved rounds
    (`zoo.time_schedules`): the features and the correction line are the only extra work (no extra NFE)."""
    plain_time, iia_time = time_schedules(zoo, [plain, corrected], batch_size=int(timing.batch_size),
                                          rounds=int(timing.rounds))
    ratio = iia_time["wall_seconds"] / plain_time["wall_seconds"]
    return {"plain_seconds": plain_time["wall_seconds"], "iia_seconds": iia_time["wall_seconds"], "ratio": ratio,
            "goal": OVERHEAD_GOAL, "within_goal": ratio <= OVERHEAD_GOAL,
            "spread": max(plain_time["wall_spread"], iia_time["wall_spread"]),
            "batch_size": int(timing.batch_size), "rounds": int(timing.rounds)}


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg: DictConfig, settings: dict, zoo: Zoo, plain: ModelSchedule, corrected: ModelSchedule) -> dict | None:
    """IIA against the plain sampler (same members, times and noise), paired on the fresh evaluation seeds."""
    e = cfg.fit_coefficients.evaluation
    if not settings["eval_n"]:
        return None
    metrics = sample_metrics_for(cfg.data, cfg.paths.checkpoints, zoo.device)
    evaluation = Evaluation(zoo, metrics, settings["eval_seeds"], settings["eval_n"], int(e.batch_size),
                            progress=log)
    noise_floor = metrics.noise_floor(settings["eval_n"], seed=settings["eval_seeds"][0])
    return compare(evaluation, {"iia": corrected, "plain": plain}, reference="plain", noise_floor=noise_floor)


def track(cfg: DictConfig, fit: iia.IIAFit, summary: dict) -> None:
    """W&B (unless logger=none): per-step residuals and coefficients, the headline numbers as the run summary."""
    from oms_lightning.tracking import make_logger

    logger = make_logger(cfg.logger, name=f"iia-{'+'.join(summary['members'])}-{summary['solver']}-"
                                          f"{summary['nfe']}nfe-{summary['feature_set']}",
                         group=f"fit_coefficients-{cfg.data.name}", config=OmegaConf.to_container(cfg, resolve=True))
    if not logger:
        return
    for i, step in enumerate(fit.steps):
        values = {"fit_before": step.fit_before, "fit_after": step.fit_after, "held_before": step.held_before,
                  "held_after": step.held_after, "condition": step.condition, "ridge": step.ridge,
                  **{f"c_{name}": c for name, c in zip(fit.features, step.coefficients)}}
        logger.log_metrics({f"iia/{k}": v for k, v in values.items() if _finite(v)}, step=i)
    headline = {"iia/held_out_error_plain": summary["held_out_error"]["plain"],
                "iia/held_out_error_iia": summary["held_out_error"]["iia"],
                "iia/overhead_ratio": summary["overhead"]["ratio"], "iia/fit_seconds": summary["fit_seconds"]}
    if summary["comparison"]:
        for name, rows in summary["comparison"]["contenders"].items():
            headline[f"iia/fid_{name}"] = rows["fid"]["mean"]
        headline["iia/fid_verdict"] = summary["comparison"]["contenders"]["iia"]["fid"]["verdict"]
    logger.experiment.summary.update(headline)
    logger.finalize("success")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def report(summary: dict, fit: iia.IIAFit, run_dir: Path) -> None:
    h, o = summary["held_out_error"], summary["overhead"]
    ratio = f" (×{h['ratio']:.3f})" if h["ratio"] is not None else ""
    print(f"\n{summary['schedule']}\nfitted in {summary['fit_seconds']:.1f} s; held-out error against a "
          f"{h['fine_steps']}-step fine reference ({h['n']} samples): plain {h['plain']:.4g}, IIA {h['iia']:.4g}"
          f"{ratio}\nwall time per batch of {o['batch_size']}: IIA {1000 * o['iia_seconds']:.1f} ms, plain "
          f"{1000 * o['plain_seconds']:.1f} ms -> ×{o['ratio']:.3f} "
          f"({'within' if o['within_goal'] else 'ABOVE'} the ×{o['goal']} goal; spread {o['spread']:.0%})")
    c = summary["comparison"]
    if c is None:
        print("no FID comparison (fit_coefficients.evaluation.n=0)")
    else:
        a, b = c["contenders"]["iia"]["fid"], c["contenders"]["plain"]["fid"]
        flags = c["disagreements"]["iia"]
        print(f"FID over seeds {c['seeds']} × {c['n']} (noise floor {c['noise_floor']['fid']:.3f}): IIA "
              f"{a['mean']:.3f} vs plain {b['mean']:.3f}: diff {a['diff']:+.3f} [{a['diff_ci'][0]:+.3f}, "
              f"{a['diff_ci'][1]:+.3f}] -> {a['verdict']}" + (f" ({'; '.join(flags)})" if flags else ""))
    print("".join(f"\n  {name + ':':11s} {path}" for name, path in {**summary["files"],
                                                                  "summary": str(run_dir / "summary.json")}.items()))
