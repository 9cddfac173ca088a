"""The search's settings, checked before any work: budgets (in ms per batch or in NFEs of a member, `6xmedium`),
the evaluation seeds and the refinement's races."""
from __future__ import annotations

import re

from omegaconf import DictConfig

from oms_lightning.errors import UserError
from oms_lightning.evaluation import check_fresh_seeds
from oms_lightning.progress import job_log
from oms_lightning.samplers import fitting_nfes
from oms_lightning.search.dataset import check_device_settings

log = job_log("search")


def resolve_budgets(cfg: DictConfig, latency: dict[str, float]) -> list[float]:
    """Budgets in seconds per batch: `budgets=[...]` (one predictor, a frontier) or `budget=` (default:
    `default_budget_nfe` NFEs of the costliest member); each in ms per batch or in NFEs of a member (`6xmedium`,
    see `resolve_budget`)."""
    if cfg.get("budgets"):
        return sorted(resolve_budget(b, latency) for b in cfg.budgets)
    if cfg.budget is None:
        return [resolve_budget(f"{cfg.default_budget_nfe}x{max(latency, key=latency.get)}", latency)]
    return [resolve_budget(cfg.budget, latency)]


_NFE_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[x×]\s*(\S+)\s*$")


def resolve_budget(value, latency: dict[str, float]) -> float:
    """A budget in seconds per batch from milliseconds per batch (`900`) or from NFEs of a member (`6xmedium`: six
    forward passes of `medium`, converted through this profile, so it means the same on a busy machine: the
    profile's *ratios* hold under load while its absolute times do not)."""
    unit = _NFE_UNIT.match(str(value)) if isinstance(value, str) else None
    if unit:
        count, member = float(unit.group(1)), unit.group(2)
        if member not in latency:
            raise UserError(f"budget={value!r}: {member!r} is not a zoo member; use NFEs of one of "
                            f"{', '.join(sorted(latency))} (e.g. budget=6x{max(latency, key=latency.get)})")
        budget = count * latency[member]
    else:
        try:
            budget = float(value) / 1000.0
        except (TypeError, ValueError):
            raise UserError(f"budget={value!r} is neither milliseconds per batch (900) nor NFEs of a member "
                            f"(6x{max(latency, key=latency.get)})") from None
    cheapest = min(latency, key=latency.get)
    if not budget >= latency[cheapest]:
        raise UserError(f"budget {1000 * budget:.1f} ms is below the cheapest valid schedule: one NFE of "
                        f"{cheapest!r} costs {1000 * latency[cheapest]:.1f} ms per batch on this device; "
                        f"use budget >= {1000 * latency[cheapest]:.1f} (or budget=1x{cheapest})")
    return budget


def budget_in_nfes(budget: float, latency: dict[str, float]) -> dict:
    """The budget in NFEs of the costliest member: the form that survives a busy machine, beside the milliseconds."""
    member = max(latency, key=latency.get)
    return {"member": member, "nfe": round(budget / latency[member], 3), "spec": f"{budget / latency[member]:.3g}x{member}"}


def check_evaluation_settings(cfg: DictConfig) -> list[int]:
    """Refuse bad `search.evaluation` settings before hours of work; returns the evaluation seeds."""
    e = cfg.search.evaluation
    fitting_nfes(1.0, 1.0, e.baseline_nfes)  # raises on anything but all | largest | a positive integer
    for key, value, least in (("n", e.n, 2), ("timing_rounds", e.timing_rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"invalid value search.evaluation.{key}={value!r}: expected an integer >= {least}")
    if not isinstance(e.equal_quality_max_budgets, (int, float)) or e.equal_quality_max_budgets <= 0:
        raise UserError(f"invalid value search.evaluation.equal_quality_max_budgets={e.equal_quality_max_budgets!r}: "
                        f"expected a positive multiple of the budget")
    margin = e.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UserError(f"invalid value search.evaluation.margin={margin!r}: expected a fraction of the baseline's "
                        f"FID in [0, 1) (the non-inferiority margin; 0.02 = 2 %)")
    check_refine_settings(cfg.search.refine, int(cfg.search.rerank.n_samples))
    check_device_settings(cfg.search.dataset)
    anchors = cfg.search.dataset.iia_anchors
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
        raise UserError(f"invalid value search.dataset.iia_anchors={anchors!r}: expected an integer >= 0 (how many "
                        f"dataset anchors also get IIA coefficients)")
    if cfg.search.iia not in ("none", "rerank"):
        raise UserError(f"search.iia={cfg.search.iia!r}: choose none or rerank (fit IIA coefficients for the top "
                        f"candidates before the re-rank)")
    used = {"the schedule→FID dataset": cfg.search.dataset.sample_seed,
            "the re-rank and baseline choice": cfg.search.rerank.seed}
    if cfg.search.iia == "rerank" or cfg.search.ablation or anchors:
        used["the IIA calibration"] = cfg.search.iia_calibration.seed
    return check_fresh_seeds(e.seeds, used)


def check_refine_settings(rf: DictConfig, n_select: int) -> None:
    """Refuse bad `search.refine` settings: counts are non-negative integers, rungs increasing sample counts, keep
    and cheapest_share fractions."""
    def integer(key: str, least: int) -> None:
        v = rf.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise UserError(f"invalid value search.refine.{key}={v!r}: expected an integer >= {least}")

    for key, least in (("evaluations", 0), ("width", 1), ("per_round", 1), ("segments", 0), ("seed_samplers", 1),
                       ("probes", 0), ("probe_pairs", 1), ("confirm", 0), ("confirm_top", 1)):
        integer(key, least)
    rungs = list(rf.rungs)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in rungs) or rungs != sorted(set(rungs)):
        raise UserError(f"invalid value search.refine.rungs={rungs}: expected increasing sample counts >= 2 (those "
                        f"at or above search.rerank.n_samples={n_select}, the last rung, are skipped)")
    for key, low_open in (("keep", True), ("cheapest_share", False)):
        v = rf.get(key)
        number = not isinstance(v, bool) and isinstance(v, (int, float))
        if not number or v > 1 or v < 0 or (low_open and v == 0):
            raise UserError(f"invalid value search.refine.{key}={v!r}: expected a fraction in "
                            f"{'(0, 1]' if low_open else '[0, 1]'}")
