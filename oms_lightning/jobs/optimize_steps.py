"""`python optimize_steps.py model=M solver=S steps=N`: Align Your Steps for one zoo member and one solver.

member's weights → σ-space denoiser → `ays.optimize` (KLUB coordinate search, quality early stop on its own seed,
10 → 20 → 40 refinement) → the steps file `checkpoints/<data>/steps/<member>-<fingerprint>-<solver>.json` that
`spacing=ays` reads → plot.png (KLUB and quality per sweep, the schedule against the standard spacings) and
summary.json (AYS against every standard spacing at the same solver and NFE, on fresh seeds, through
`oms_lightning.evaluation`).

The optimiser's state is written after every sweep (`<steps file>.partial.json`), so a killed run resumes where it
stopped and loses at most the sweep it was in.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from oms_lightning.progress import job_log, progress as progress_bar

from oms_lightning.diffusion import ays
from oms_lightning.diffusion.ays_steps import (AYS, ays_levels, ays_sigmas, load_steps, save_steps, steps_path,
                                              times_from_sigmas)
from oms_lightning.diffusion.solvers import get_solver
from oms_lightning.diffusion.spacing import SPACINGS, default_t_end, timesteps
from oms_lightning.errors import UserError
from oms_lightning.evaluation import Evaluation, check_fresh_seeds, compare
from oms_lightning.io import atomic_path, atomic_write_text
from oms_lightning.metrics import SampleMetrics, sample_metrics_for, search_evaluator_for
from oms_lightning.samplers import single_member_schedule
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule
from oms_lightning.zoo import Zoo, resolve_device


log = job_log("optimize_steps")


# ----------------------------------------------------------------------------------------------- settings
def check_settings(cfg: DictConfig) -> dict:
    """The run's settings as plain data, refused before any work when wrong."""
    if cfg.get("model") is None:
        raise UserError("give the member to optimise for: model=<member> (e.g. model=small)")
    spec = get_solver(str(cfg.solver))
    nfe_per_step = spec.uniform_nfe_per_step(cfg.order)
    o = cfg.optimize_steps
    for key, value, least in (("steps", cfg.steps, 2), ("optimize_steps.n_mc", o.n_mc, 2),
                              ("optimize_steps.refinements", o.refinements, 0),
                              ("optimize_steps.max_sweeps", o.max_sweeps, 1),
                              ("optimize_steps.patience", o.patience, 1),
                              ("optimize_steps.quality.n", o.quality.n, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key} must be an integer >= {least}, got {value!r}")
    if o.init not in ("best", "edm"):
        raise UserError(f"optimize_steps.init must be best (the standard spacing of lowest KLUB) or edm (the "
                        f"paper's EDM rho=7 start), got {o.init!r}")
    if not isinstance(cfg.c, (int, float)) or isinstance(cfg.c, bool) or not cfg.c > 0 or not math.isfinite(cfg.c):
        raise UserError(f"c (the data's scale) must be a positive number, got {cfg.c!r}")
    t_end = default_t_end(cfg.steps * nfe_per_step) if cfg.t_end is None else float(cfg.t_end)
    seeds = check_fresh_seeds(o.evaluation.seeds, {"the quality early stop": int(o.quality.seed)})
    levels = [cfg.steps * 2**k for k in range(o.refinements + 1)]
    bad = [n for n in o.evaluation.steps if not isinstance(n, int) or n < 1]
    if bad:
        raise UserError(f"optimize_steps.evaluation.steps must be positive step counts (or [] for no comparison), "
                        f"got {list(o.evaluation.steps)}")
    return {"member": str(cfg.model.name), "solver": spec.name, "order": cfg.order, "nfe_per_step": nfe_per_step,
            "steps": int(cfg.steps), "levels": levels, "c": float(cfg.c), "t_end": t_end, "seed": int(cfg.seed),
            "n_mc": int(o.n_mc), "refinements": int(o.refinements), "n_candidates": int(o.n_candidates),
            "max_sweeps": int(o.max_sweeps), "patience": int(o.patience), "init": str(o.init),
            "quality": {"metric": "fid", "n": int(o.quality.n), "seed": int(o.quality.seed)},
            "eval_seeds": seeds}


def partial_path(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.json")


# The settings that change the optimiser's path: a resume or reuse under other values would mix two runs.
PATH_SETTINGS = ("solver", "order", "steps", "c", "t_end", "seed", "n_mc", "refinements", "n_candidates",
                 "max_sweeps", "patience", "quality", "init")


def same_path_settings(a: dict, b: dict) -> list[str]:
    return [k for k in PATH_SETTINGS if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------------------------- the job
def optimize_steps(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    settings = check_settings(cfg)
    device = resolve_device(str(cfg.device))
    member, data_name = settings["member"], str(cfg.data.name)
    zoo = Zoo.load(cfg.paths.checkpoints, data_name, names=[member], device=device)
    fingerprint = zoo.fingerprint()
    path = steps_path(cfg.paths.checkpoints, data_name, member, fingerprint, settings["solver"])
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    metrics = sample_metrics_for(cfg.data, cfg.paths.checkpoints, device)
    schedule_of = schedule_maker(member, settings, zoo)
    payload = finished_file(path, member, fingerprint, settings, bool(cfg.fresh))
    if payload is None:
        payload = run_optimizer(cfg, settings, zoo, metrics, schedule_of, path, fingerprint)
    else:
        log(f"{path} already holds this optimisation (same weights and settings): reusing it (fresh=true redoes it)")

    plot(payload, zoo, run_dir / "plot.png")
    summary = evaluate(cfg, settings, zoo, metrics, schedule_of, payload)
    summary.update(steps_file=str(path), plot=str(run_dir / "plot.png"),
                   wall_seconds_total=round(time.perf_counter() - started, 1))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    report(summary, run_dir)
    return summary


def schedule_maker(member: str, settings: dict, zoo: Zoo):
    """σ-space schedule → the member's sampler with this solver on the schedule's VP times."""
    def schedule_of(sigmas) -> ModelSchedule:
        times = times_from_sigmas(sigmas, zoo.noise_schedule)
        return ModelSchedule.single(member, times, solver=settings["solver"], orders=settings["nfe_per_step"],
                                    meta={"spacing": AYS})
    return schedule_of


def finished_file(path: Path, member: str, fingerprint: str, settings: dict, fresh: bool) -> dict | None:
    """The finished steps file of this member, solver and settings, if any (and not `fresh`)."""
    if fresh or not path.is_file():
        return None
    try:
        payload = load_steps(path, member, fingerprint, settings["solver"])
    except UserError as e:
        log(f"{e.args[0].split(';')[0]}: optimising again, the file will be replaced")
        return None
    return payload if not same_path_settings(payload.get("settings", {}), settings) else None


def run_optimizer(cfg: DictConfig, settings: dict, zoo: Zoo, metrics: SampleMetrics, schedule_of,
                  path: Path, fingerprint: str) -> dict:
    """ays.optimize with the member's denoiser, its training data and FID as the quality; state after every sweep."""
    o = cfg.optimize_steps
    noise = zoo.noise_schedule
    sigma_min = ays.sigma_of_t(noise, settings["t_end"]).item()
    sigma_max = ays.sigma_of_t(noise, 1.0).item()
    data = metrics.train.to(zoo.device, zoo.dtype)
    quality_fid = search_evaluator_for(metrics, cfg.data, cfg.paths.checkpoints)   # never the reported split
    saved = resume_state(partial_path(path), settings, bool(cfg.fresh))
    state = saved["state"] if saved else None
    if saved:
        settings["init_spacing"] = saved["settings"].get("init_spacing")

    def quality(sigmas) -> float:
        images = generate(zoo, schedule_of(sigmas), settings["quality"]["n"], seed=settings["quality"]["seed"],
                          batch_size=int(o.quality.batch_size))
        return quality_fid.fid(images, settings["quality"]["seed"]).value

    from oms_lightning.tracking import make_logger

    logger = make_logger(cfg.logger, name=f"ays-{settings['member']}-{settings['solver']}-{settings['steps']}",
                         group=f"optimize_steps-{cfg.data.name}", config=OmegaConf.to_container(cfg, resolve=True))
    total = (settings["max_sweeps"] + 1) * len(settings["levels"])   # sweep 0 of each level is its start
    bar = progress_bar(total=total, desc="AYS sweeps", unit="sweep")
    since = [time.perf_counter()]                     # when the last recorded sweep ended

    def on_sweep(snapshot: ays.OptimizeResult) -> None:
        atomic_write_text(partial_path(path), json.dumps({"settings": settings, "state": snapshot.to_dict()}) + "\n")
        done = sum(len(lv.sweeps) for lv in snapshot.levels)
        if done == bar.n:                             # the last call only marks the run finished: no new sweep
            return
        level, now = snapshot.levels[-1], time.perf_counter()
        last = level.sweeps[-1]
        bar.update(done - bar.n)
        bar.set_postfix(steps=level.steps, klub=f"{last.klub:.4g}", fid=f"{last.quality:.3f}")
        bar.write(f"[optimize_steps] {level.steps} steps, sweep {last.sweep}: KLUB {last.klub:.5g}, "
                  f"FID {last.quality:.3f} ({now - since[0]:.0f} s)")
        since[0] = now
        if logger:
            logger.log_metrics({"ays/klub": last.klub, "ays/quality_fid": last.quality, "ays/steps": level.steps,
                                "ays/sweep": last.sweep}, step=done)

    started = time.perf_counter()
    if state is not None:
        done = sum(len(lv["sweeps"]) for lv in state["levels"])
        log(f"resuming the interrupted optimisation ({done} sweeps done) from {partial_path(path)}")
        bar.update(done)
    log(f"member {settings['member']!r}, solver {settings['solver']}, {settings['levels']} steps, σ from "
        f"{sigma_max:.4g} to {sigma_min:.4g} (t_end {settings['t_end']}), {settings['n_mc']} Monte-Carlo samples "
        f"from {len(data)} training images, quality FID of {settings['quality']['n']} images (seed "
        f"{settings['quality']['seed']})")
    denoiser = ays.sigma_denoiser(zoo.denoiser(settings["member"]), noise)
    init = None
    if state is None:
        init, settings["init_spacing"] = initial_sigmas(denoiser, data, sigma_min, sigma_max, settings,
                                                        int(o.batch_size), zoo)
    result = ays.optimize(
        denoiser, data, sigma_min, sigma_max, init=init,
        steps=settings["steps"], c=settings["c"], n_mc=settings["n_mc"], seed=settings["seed"], quality_fn=quality,
        on_sweep=on_sweep, state=state, refinements=settings["refinements"],
        n_candidates=settings["n_candidates"], max_sweeps=settings["max_sweeps"], patience=settings["patience"],
        batch_size=int(o.batch_size), device=zoo.device)
    bar.close()
    payload = steps_payload(result, settings, fingerprint, zoo, data, str(cfg.data.name), int(o.batch_size))
    payload["optimize_seconds"] = round(time.perf_counter() - started, 1)  # of this run (a resumed one: its part)
    save_steps(path, payload)
    partial_path(path).unlink(missing_ok=True)
    if logger:
        logger.experiment.summary.update({"ays/steps_file": str(path)})
        logger.finalize("success")
    log(f"steps written to {path}")
    return payload


def resume_state(partial: Path, settings: dict, fresh: bool) -> dict | None:
    """The saved {"state", "settings"} of an interrupted run with the same settings; refused with a fix when they
    differ."""
    if fresh or not partial.is_file():
        return None
    try:
        saved = json.loads(partial.read_text())
        state, old = saved["state"], saved["settings"]
        ays.OptimizeResult.from_dict(state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the interrupted run's state {partial} is unreadable ({type(e).__name__}); delete it or "
                        f"pass fresh=true to start over") from None
    diff = same_path_settings(old, settings)
    if diff:
        raise UserError(f"an interrupted optimisation of this member and solver ({partial}) used other settings ("
                        + ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                        + "); rerun with its settings to resume it, or pass fresh=true to start over")
    return saved


def steps_payload(result: ays.OptimizeResult, settings: dict, fingerprint: str, zoo: Zoo, data, data_name: str,
                  batch_size: int) -> dict:
    """The steps file: every level's chosen σ and t, its sweeps, and the KLUB of the standard spacings at the same
    step count (same Monte-Carlo draw as the sweeps' records, so the numbers compare)."""
    noise = zoo.noise_schedule
    denoiser = ays.sigma_denoiser(zoo.denoiser(settings["member"]), noise)
    levels = []
    for lv in result.levels:
        standard = standard_klubs(denoiser, data, lv.steps, lv.sigmas, settings, batch_size, zoo)
        levels.append({"steps": lv.steps, "sigmas": lv.sigmas.tolist(),
                       "times": times_from_sigmas(lv.sigmas, noise), "chosen_sweep": lv.chosen_sweep,
                       "sweeps": [vars(sw) for sw in lv.sweeps], "klub_standard_spacings": standard})
    return {"member": settings["member"], "fingerprint": fingerprint, "solver": settings["solver"],
            "data": data_name, "noise": noise.to_dict(), "settings": settings, "levels": levels}


def standard_klubs(denoiser, data, steps: int, ends, settings: dict, batch_size: int, zoo: Zoo) -> dict[str, float]:
    """KLUB of every standard spacing with these ends, on the record draw (the one every sweep's KLUB uses)."""
    return {sp: ays.klub(denoiser, data, standard_sigmas(sp, steps, ends, zoo.noise_schedule), settings["c"],
                         settings["n_mc"], ays.record_seed(settings["seed"]), batch_size, zoo.device).total
            for sp in SPACINGS}


def initial_sigmas(denoiser, data, sigma_min: float, sigma_max: float, settings: dict, batch_size: int,
                   zoo: Zoo) -> tuple[torch.Tensor, str]:
    """The starting schedule: the paper's EDM ρ = 7 (`init=edm`), or the standard spacing of lowest KLUB
    (`init=best`, our default: on the digits members logSNR-uniform starts several times lower than EDM, and a
    coordinate search with a quality early stop may stop before it gets there)."""
    ends = ays.edm_sigmas(sigma_min, sigma_max, settings["steps"])
    if settings["init"] == "edm":
        return ends, "karras"
    scores = standard_klubs(denoiser, data, settings["steps"], ends, settings, batch_size, zoo)
    best = min(scores, key=scores.get)
    log("starting schedule: " + ", ".join(f"{sp} KLUB {v:.4g}" for sp, v in scores.items()) + f" -> {best}")
    return standard_sigmas(best, settings["steps"], ends, zoo.noise_schedule), best


def standard_sigmas(spacing: str, steps: int, ends, noise) -> torch.Tensor:
    """A standard spacing's σ-schedule with the same ends as `ends` (AYS keeps both ends fixed)."""
    t_end = ays.t_of_sigma(noise, ends[-1]).item()
    return ays.validate_sigmas(ays.sigma_of_t(noise, timesteps(spacing, steps, noise, t_end=t_end)))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg: DictConfig, settings: dict, zoo: Zoo, metrics: SampleMetrics, schedule_of,
             payload: dict) -> dict:
    """AYS against every standard spacing, same member, solver, NFE and ends, paired on the fresh seeds."""
    e = cfg.optimize_steps.evaluation
    comparisons, noise_floor = [], None
    if e.steps:  # `evaluation.steps=[]` skips the comparison
        evaluation = Evaluation(zoo, metrics, settings["eval_seeds"], int(e.n), int(e.batch_size), progress=log)
        noise_floor = metrics.noise_floor(int(e.n), seed=settings["eval_seeds"][0])
    for steps in e.steps:
        ays_schedule = schedule_of(ays_sigmas(ays_levels(payload), int(steps)))
        t_end = ays_schedule.times[-1]
        rows = {}
        for sp in SPACINGS:
            standard = single_member_schedule(settings["member"], settings["solver"], int(steps), zoo.noise_schedule,
                                              order=settings["order"], spacing=sp, t_end=t_end)
            c = compare(evaluation, {AYS: ays_schedule, sp: standard}, reference=sp, noise_floor=noise_floor)
            rows[sp] = {"ays": c["contenders"][AYS], sp: c["contenders"][sp],
                        "disagreements": c["disagreements"][AYS]}
        comparisons.append({"steps": int(steps), "nfe": ays_schedule.nfe, "t_end": t_end,
                            "ays_schedule": ays_schedule.times, "vs": rows})
    return {"member": settings["member"], "solver": settings["solver"], "settings": settings,
            "optimize_seconds": payload.get("optimize_seconds"),
            "seeds": settings["eval_seeds"], "n": int(e.n), "noise_floor": noise_floor, "comparisons": comparisons,
            "chosen": [{"steps": lv["steps"], "chosen_sweep": lv["chosen_sweep"],
                        "klub": next(sw["klub"] for sw in lv["sweeps"] if sw["sweep"] == lv["chosen_sweep"]),
                        "klub_standard_spacings": lv["klub_standard_spacings"]} for lv in payload["levels"]]}


def report(summary: dict, run_dir: Path) -> None:
    for lv in summary["chosen"]:
        std = ", ".join(f"{k} {v:.4g}" for k, v in lv["klub_standard_spacings"].items())
        print(f"{lv['steps']} steps: KLUB {lv['klub']:.4g} (sweep {lv['chosen_sweep']}); standard spacings: {std}")
    if not summary["comparisons"]:
        print("no comparison (optimize_steps.evaluation.steps is empty)")
    for comp in summary["comparisons"]:
        print(f"\n{summary['solver']} with {summary['member']}, {comp['nfe']} NFE, FID over seeds {summary['seeds']} "
              f"× {summary['n']} (noise floor {summary['noise_floor']['fid']:.3f}):")
        for sp, row in comp["vs"].items():
            a, b = row["ays"]["fid"], row[sp]["fid"]
            print(f"  ays {a['mean']:.3f} vs {sp} {b['mean']:.3f}: diff {a['diff']:+.3f} "
                  f"[{a['diff_ci'][0]:+.3f}, {a['diff_ci'][1]:+.3f}] -> {a['verdict']}"
                  + (f" ({'; '.join(row['disagreements'])})" if row["disagreements"] else ""))
    print(f"\n  steps file: {summary['steps_file']}\n  plot:       {summary['plot']}\n"
          f"  summary:    {run_dir / 'summary.json'}")


# ----------------------------------------------------------------------------------------------- plot
def plot(payload: dict, zoo: Zoo, out: Path) -> None:
    """Left: KLUB and quality per sweep of every level. Right: the chosen schedules' log σ against the step
    fraction, with the standard spacings of the first level's step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    ax_q = ax_k.twinx()
    x0 = 0
    for lv in payload["levels"]:
        xs = [x0 + sw["sweep"] for sw in lv["sweeps"]]
        ax_k.plot(xs, [sw["klub"] for sw in lv["sweeps"]], "o-", color="tab:blue", ms=3)
        ax_q.plot(xs, [sw["quality"] for sw in lv["sweeps"]], "s--", color="tab:red", ms=3)
        ax_k.axvline(x0 + lv["chosen_sweep"], color="grey", lw=0.5)
        ax_k.annotate(f"{lv['steps']} steps", (x0, ax_k.get_ylim()[1]), fontsize=7, va="top")
        x0 = xs[-1] + 1
    ax_k.set_yscale("log")
    ax_k.set_xlabel("sweep (levels in turn; grey: chosen)")
    ax_k.set_ylabel("KLUB", color="tab:blue")
    ax_q.set_ylabel("quality (FID, own seed)", color="tab:red")
    first = payload["levels"][0]
    ends = torch.tensor(first["sigmas"], dtype=torch.float64)
    for sp in SPACINGS:
        s = standard_sigmas(sp, first["steps"], ends, zoo.noise_schedule)
        ax_s.plot(torch.linspace(0, 1, len(s)), s.log(), ".:", label=sp, alpha=0.7)
    for lv in payload["levels"]:
        s = torch.tensor(lv["sigmas"])
        ax_s.plot(torch.linspace(0, 1, len(s)), s.log(), "o-", ms=3, label=f"ays {lv['steps']}")
    ax_s.set_xlabel("step / steps")
    ax_s.set_ylabel("log σ  (σ = σ_t/α_t)")
    ax_s.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
