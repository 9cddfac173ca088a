"""The one place that declares a winner: paired comparisons on fresh seeds, with intervals and a verdict.

Every claim "sampler A beats sampler B" in this project goes through `compare`:

* each contender generates `n` images for each evaluation seed from the *same* per-sample noise (image i of
  seed s starts from noise (s, i) whatever the contender), and each set is scored by `SampleMetrics`: FID against
  the training split, KID against the held-out validation split, a pixel-space Fréchet distance (a second metric
  of another nature) and the copy rate (memorisation check);
* per metric, the contender's mean over seeds comes with a 95 % t-interval, and its **paired** difference to the
  reference contender (same seed, same noise) with a 95 % t-interval over seeds (Student's t with
  len(seeds) − 1 degrees of freedom: FIDs of one seed are one draw each, so seeds are the independent units);
* the verdict per metric is `better` (interval entirely below 0 for a lower-is-better metric), `worse` (entirely
  above) or `tie` (it contains 0). Metrics whose verdicts point in opposite directions are flagged, never hidden;
* a noise floor — the same metrics between two disjoint sets of real images — is printed next to every
  comparison, so a reader sees how large a difference chance alone makes.

The strongest single-model baselines it compares against are built in `oms_lightning.samplers` (one member alone).

Seeds used to *select* anything (the top-k re-rank, the baseline choice) must never be evaluation seeds:
`check_fresh_seeds` refuses an overlap, because the minimum of noisy numbers is optimistic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from oms_lightning.errors import UserError
from oms_lightning.metrics import LOWER_IS_BETTER, METRICS
from oms_lightning.predictor.records import schedule_key
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import schedule_to_dict

PRIMARY = "fid"
CONFIDENCE = 0.95
VERDICTS = ("better", "tie", "worse")



# ----------------------------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over independent values (one per seed)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise UserError(f"an interval needs at least 2 seeds, got {v.size}; set evaluation.seeds to >= 2 seeds")
    mean = float(v.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, df=v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, lower_is_better: bool = True) -> str:
    """`better` / `worse` when the interval of (contender − reference) excludes 0, else `tie`."""
    if low <= 0.0 <= high:
        return "tie"
    below = high < 0.0
    return "better" if below == lower_is_better else "worse"


def non_inferiority(contender: Sequence[float], reference: Sequence[float], margin: float,
                    confidence: float = CONFIDENCE) -> dict:
    """Is the contender not worse than the reference by more than `margin` (lower is better)? The paired
    differences over seeds (contender − reference) get a one-sided `confidence` upper bound (Student's t, len − 1
    degrees of freedom); non-inferiority holds when that bound stays below the margin."""
    d = np.subtract(np.asarray(contender, dtype=np.float64), np.asarray(reference, dtype=np.float64))
    if d.size < 2:
        raise UserError(f"a non-inferiority test needs at least 2 seeds, got {d.size}")
    if not math.isfinite(margin) or margin < 0:
        raise UserError(f"the non-inferiority margin must be a finite number >= 0, got {margin!r}")
    mean = float(d.mean())
    upper = mean + float(stats.t.ppf(confidence, df=d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return {"diff": mean, "upper": upper, "margin": float(margin), "confidence": confidence,
            "holds": bool(upper < margin)}


def check_fresh_seeds(eval_seeds: Iterable[int], used: Mapping[str, int]) -> list[int]:
    """The evaluation seeds as ints; UserError unless there are ≥ 2 distinct non-negative ones (an interval needs
    two) and none of them also served to build or select something."""
    try:
        seeds = [int(s) for s in eval_seeds]
    except (TypeError, ValueError):
        raise UserError(f"evaluation seeds must be a list of integers, got {eval_seeds!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"evaluation seeds must be at least 2 distinct non-negative integers (an interval needs "
                        f"two), got {seeds}")
    clash = {what: s for what, s in used.items() if s in seeds}
    if clash:
        raise UserError(f"evaluation seeds {seeds} overlap the seed(s) used for {', '.join(clash)} "
                        f"({clash}); choose fresh evaluation seeds (a number chosen as the best on one seed is "
                        f"optimistic on that seed)")
    return seeds


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Evaluation:
    """Scores schedules on the evaluation seeds: metric → one value per seed, memoised by schedule identity.

    With `store(seed)` → a RecordStore (bound to the zoo and to the metric settings of that seed and n), every
    (schedule, seed) score is appended as soon as it is measured, so an interrupted or repeated run re-scores
    nothing it already has.
    """

    zoo: object
    metrics: object                       # SampleMetrics
    seeds: list[int]
    n: int
    batch_size: int = 256
    progress: Callable[[str], None] | None = None
    store: Callable[[int], object] | None = None
    _cache: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)
    _stored: dict[int, tuple[object, dict]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if len(self.seeds) < 2:
            raise UserError(f"evaluation needs at least 2 seeds for an interval, got {self.seeds}")
        if int(self.n) < 2:
            raise UserError(f"evaluation needs at least 2 samples per seed, got n={self.n}")

    def _score_seed(self, schedule: ModelSchedule, key: str, seed: int) -> dict:
        if self.store is not None and seed not in self._stored:
            st = self.store(seed)
            self._stored[seed] = (st, {r["key"]: r for r in st.records()})
        st, done = self._stored.get(seed, (None, {}))
        if key in done and all(m in done[key].get("metrics", {}) for m in METRICS):
            return done[key]["metrics"]
        images = generate(self.zoo, schedule, self.n, seed=seed, batch_size=self.batch_size)
        scores = {m: float(v) for m, v in self.metrics.score(images, seed).items() if m in METRICS}
        if st is not None:
            record = {"schedule": schedule_to_dict(schedule), "key": key, "nfe": schedule.nfe, "fid": scores["fid"],
                      "n": int(self.n), "seed": int(seed), "metrics": scores}
            st.append(record)
            done[key] = record
        return scores

    def score(self, schedule: ModelSchedule) -> dict[str, list[float]]:
        key = schedule_key(schedule)
        if key not in self._cache:
            if self.progress:
                self.progress(f"evaluating {schedule.compact()} on seeds {self.seeds} × {self.n} samples")
            per_seed = [self._score_seed(schedule, key, s) for s in self.seeds]
            self._cache[key] = {m: [float(r[m]) for r in per_seed] for m in METRICS}
        return self._cache[key]

    def mean(self, schedule: ModelSchedule, metric: str = PRIMARY) -> float:
        return float(np.mean(self.score(schedule)[metric]))


def summarise_contender(values: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]] | None,
                        confidence: float = CONFIDENCE) -> dict:
    """Per metric: per-seed values, mean and interval; against a reference also the paired difference and verdict."""
    out = {}
    for m in METRICS:
        mean, lo, hi = t_interval(values[m], confidence)
        row = {"per_seed": list(values[m]), "mean": mean, "ci": [lo, hi]}
        if reference is not None:
            d_mean, d_lo, d_hi = t_interval(np.subtract(values[m], reference[m]), confidence)
            row.update(diff=d_mean, diff_ci=[d_lo, d_hi], verdict=verdict(d_lo, d_hi, LOWER_IS_BETTER[m]))
        out[m] = row
    return out


def disagreements(summary: Mapping[str, dict]) -> list[str]:
    """Metrics whose verdict is the opposite of the primary metric's (better vs worse), or decided where it ties."""
    primary = summary[PRIMARY].get("verdict")
    flagged = []
    for m, row in summary.items():
        v = row.get("verdict")
        if m == PRIMARY or v is None or m == "copy_rate":
            continue
        if {primary, v} == {"better", "worse"} or (primary == "tie" and v != "tie"):
            flagged.append(f"{m} says {v} where {PRIMARY} says {primary}")
    return flagged


def compare(evaluation: Evaluation, contenders: Mapping[str, ModelSchedule], reference: str,
            noise_floor: Mapping[str, float] | None = None, confidence: float = CONFIDENCE) -> dict:
    """Score every contender on the same seeds and noise; each non-reference one gets paired intervals and verdicts.

    Returns {"seeds", "n", "reference", "noise_floor", "contenders": {name: {metric: {...}}}, "disagreements":
    {name: [...]}}. The verdict of contender X reads "X is better / worse than the reference, or ties".
    """
    if reference not in contenders:
        raise UserError(f"reference contender {reference!r} is not among {sorted(contenders)}")
    ref_values = evaluation.score(contenders[reference])
    rows, flags = {}, {}
    for name, schedule in contenders.items():
        is_ref = name == reference
        rows[name] = summarise_contender(evaluation.score(schedule), None if is_ref else ref_values, confidence)
        if not is_ref:
            flags[name] = disagreements(rows[name])
    return {"seeds": list(evaluation.seeds), "n": int(evaluation.n), "reference": reference,
            "confidence": confidence, "noise_floor": dict(noise_floor or {}), "contenders": rows,
            "disagreements": flags}
