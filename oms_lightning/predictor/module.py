"""PredictorModule: trains the schedule predictor on schedule/FID records with a pairwise ranking loss.

OMS-DPM (Liu et al. 2023, §4.2): the predictor only has to *order* schedules like their FID, so the default loss is
a pairwise hinge: for every pair in a batch with FID_i + threshold < FID_j (i is clearly better), pay
relu(margin − (s_j − s_i)). Pairs closer than `fid_threshold` are ignored (FID noise; the paper uses 0.25 on
CIFAR-10 FIDs — use a scale that fits your FIDs). Validation reports Kendall's τ and Spearman's ρ over the whole
validation split (50/50 by default, fixed by a seed), which also selects the best checkpoint. That τ is therefore
optimistic; an optional third, test split (`test_fraction`) is never seen during training or selection and gives
the τ to report.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import stats
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.progress import lightning_quiet
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import schedule_from_dict

from .encoding import MAX_ORDER, EncodedSchedules, ScheduleEncoder
from .network import SchedulePredictor

LOSSES = ("hinge", "mse")


# ---------------------------------------------------------------------------------------------------- losses
def pairwise_hinge_loss(scores: Tensor, fids: Tensor, margin: float = 1.0, threshold: float = 0.25) -> Tensor:
    """Mean over pairs (i, j) with fids[i] + threshold < fids[j] of relu(margin − (scores[j] − scores[i])).

    Vectorised over the B×B pairs; 0 (with a graph) when no pair qualifies.
    """
    fids = fids.to(scores.dtype)
    valid = (fids[:, None] + threshold) < fids[None, :]               # valid[i, j]: i clearly better than j
    losses = F.relu(margin - (scores[None, :] - scores[:, None]))     # [i, j] = relu(m − (s_j − s_i))
    valid_f = valid.to(scores.dtype)
    return (losses * valid_f).sum() / valid_f.sum().clamp(min=1.0)


def standardised_mse_loss(scores: Tensor, fids: Tensor) -> Tensor:
    """MSE to the batch-standardised FIDs ((fid − mean) / std over the batch)."""
    fids = fids.to(scores.dtype)
    target = (fids - fids.mean()) / fids.std(unbiased=False).clamp(min=1e-8)
    return F.mse_loss(scores, target)


def rank_metrics(scores: np.ndarray, fids: np.ndarray) -> dict[str, float]:
    """Kendall's τ and Spearman's ρ between predicted scores and true FIDs (NaN when undefined)."""
    scores, fids = np.asarray(scores, dtype=np.float64), np.asarray(fids, dtype=np.float64)
    if len(scores) < 2 or np.ptp(scores) == 0 or np.ptp(fids) == 0:
        return {"kendall_tau": float("nan"), "spearman": float("nan")}
    return {"kendall_tau": float(stats.kendalltau(scores, fids).statistic),
            "spearman": float(stats.spearmanr(scores, fids).statistic)}


def rank_metrics_near(scores: Sequence[float], fids: Sequence[float], costs: Sequence[float | None], budget: float,
                      tolerance: float = 0.1) -> dict[str, float | int]:
    """`rank_metrics` among the records whose cost lies within budget ± tolerance·budget, plus their count "n".

    The search only compares schedules near one budget, so the global τ (dominated by "more NFEs is better")
    overstates how well the predictor orders the candidates that matter. Records without a cost (None) are left
    out; τ and ρ are NaN when fewer than 2 records remain.
    """
    if not _finite_number(budget) or budget <= 0:
        raise UserError(f"budget must be a finite number > 0, got {budget!r}")
    if not _finite_number(tolerance) or tolerance < 0:
        raise UserError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not len(scores) == len(fids) == len(costs):
        raise UserError(f"scores, fids and costs must have one entry per record, "
                        f"got {len(scores)}, {len(fids)} and {len(costs)}")
    cost = np.array([np.nan if c is None else c for c in costs], dtype=np.float64)
    near = np.abs(cost - budget) <= tolerance * budget  # NaN (no cost) compares False: left out
    metrics: dict[str, float | int] = dict(rank_metrics(np.asarray(scores, dtype=np.float64)[near],
                                                        np.asarray(fids, dtype=np.float64)[near]))
    metrics["n"] = int(near.sum())
    return metrics


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------------- module
class PredictorModule(L.LightningModule):
    """The OMS-DPM predictor as a LightningModule; hyperparameters are plain containers (weights_only=True loads).

    Batches are (EncodedSchedules, fid tensor (B,)). `predict_scores` scores ModelSchedules for the search.
    """

    def __init__(self, members: Sequence[str], noise: Mapping | VPSchedule | None = None, max_steps: int = 30,
                 member_dim: int = 32, order_dim: int = 16, time_dim: int = 64, hidden: int = 128,
                 head_hidden: int = 200, loss: str = "hinge", margin: float = 1.0, fid_threshold: float = 0.25,
                 lr: float = 1e-3, weight_decay: float = 0.0, solvers: Sequence[str] | None = None,
                 features: Sequence[str] | None = None):
        super().__init__()
        if isinstance(noise, VPSchedule):
            noise = noise.to_dict()
        noise = dict(noise) if noise is not None else VPSchedule().to_dict()
        if loss not in LOSSES:
            raise UserError(f"unknown predictor loss {loss!r}; choose one of {', '.join(LOSSES)}")
        for name, value, ok in (("margin", margin, margin > 0), ("fid_threshold", fid_threshold, fid_threshold >= 0),
                                ("lr", lr, lr > 0), ("weight_decay", weight_decay, weight_decay >= 0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise UserError(f"predictor {name} must be a finite number "
                                f"{'>= 0' if name in ('fid_threshold', 'weight_decay') else '> 0'}, got {value!r}")
        self.encoder = ScheduleEncoder(members, noise, max_steps, solvers, features)
        self.save_hyperparameters({
            "members": list(self.encoder.members), "noise": noise, "max_steps": int(max_steps),
            "member_dim": member_dim, "order_dim": order_dim, "time_dim": time_dim, "hidden": hidden,
            "head_hidden": head_hidden, "loss": loss, "margin": float(margin), "fid_threshold": float(fid_threshold),
            "lr": float(lr), "weight_decay": float(weight_decay), "solvers": list(self.encoder.solvers),
            "features": list(self.encoder.features),
        })
        self.net = SchedulePredictor(len(self.encoder.members), MAX_ORDER, member_dim, order_dim, time_dim, hidden,
                                     head_hidden, num_solvers=len(self.encoder.solvers),
                                     num_features=len(self.encoder.features))
        self._val_scores: list[Tensor] = []
        self._val_fids: list[Tensor] = []

    def num_parameters(self) -> int:
        return self.net.num_parameters()

    def forward(self, batch: EncodedSchedules) -> Tensor:
        return self.net(batch)

    def loss_fn(self, scores: Tensor, fids: Tensor) -> Tensor:
        if self.hparams.loss == "hinge":
            return pairwise_hinge_loss(scores, fids, self.hparams.margin, self.hparams.fid_threshold)
        return standardised_mse_loss(scores, fids)

    # --- training / validation ---
    def training_step(self, batch: tuple[EncodedSchedules, Tensor], batch_idx: int) -> Tensor:
        enc, fids = batch
        loss = self.loss_fn(self(enc), fids)
        self.log("train/loss", loss, batch_size=len(enc))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_scores, self._val_fids = [], []

    def validation_step(self, batch: tuple[EncodedSchedules, Tensor], batch_idx: int) -> None:
        enc, fids = batch
        scores = self(enc)
        self.log("val/loss", self.loss_fn(scores, fids), batch_size=len(enc), sync_dist=True)
        self._val_scores.append(scores.detach().float())
        self._val_fids.append(fids.detach().float())

    def _gather_split(self, x: Tensor) -> Tensor:
        """Every rank's values, in the order of the whole validation split.

        Ranks hold different counts in general, so each pads to the largest with NaN before `all_gather`. With
        Lightning's DistributedSampler (shuffle=False) rank r holds items r, r+W, …, and the last ranks repeat the
        first items to even out the counts: interleaving the ranks and keeping the first N items gives the split
        exactly once, in order. Every rank gets the same result, so every rank computes the same τ.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1:
            return x
        n = torch.tensor([x.numel()], device=x.device)
        sizes = self.all_gather(n).flatten()
        m = int(sizes.max())
        padded = torch.full((m,), float("nan"), device=x.device, dtype=x.dtype)
        padded[: x.numel()] = x
        gathered = self.all_gather(padded).reshape(world, m)
        total = self._val_split_size()
        if bool((sizes == m).all()) and total is not None and 0 <= world * m - total < world:
            return gathered.T.reshape(-1)[:total]
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)])

    def _val_split_size(self) -> int | None:
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and len(loaders) == 1 else loaders
        try:
            return len(loader.dataset)
        except (AttributeError, TypeError):
            return None

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        scores = self._gather_split(torch.cat(self._val_scores))
        fids = self._gather_split(torch.cat(self._val_fids))
        self._val_scores, self._val_fids = [], []
        metrics = rank_metrics(scores.cpu().numpy(), fids.cpu().numpy())
        # Computed on the gathered split, identical on every rank: no further reduction needed.
        self.log("val/kendall_tau", metrics["kendall_tau"], prog_bar=True)
        self.log("val/spearman", metrics["spearman"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- search-time scoring ---
    @torch.no_grad()
    def predict_scores(self, schedules: Sequence[ModelSchedule], batch_size: int = 4096) -> np.ndarray:
        """One score per schedule (lower = better), float64; eval mode, no grad; the training mode is restored."""
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        schedules = list(schedules)
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, len(schedules), batch_size):
                enc = self.encoder.encode(schedules[i: i + batch_size]).to(self.device)
                out.append(self.net(enc).double().cpu())
            return torch.cat(out).numpy() if out else np.zeros(0)
        finally:
            self.train(was_training)


# ---------------------------------------------------------------------------------------------------- data
def _parse_record(i: int, record: Any) -> tuple[ModelSchedule, float]:
    if isinstance(record, Mapping):
        if "schedule" not in record or "fid" not in record:
            raise UserError(f"record {i} needs keys 'schedule' and 'fid', got {sorted(map(str, record))}")
        schedule, fid = record["schedule"], record["fid"]
    elif isinstance(record, (tuple, list)) and len(record) == 2:
        schedule, fid = record
    else:
        raise UserError(f"record {i} must be a dict with 'schedule' and 'fid' or a (ModelSchedule, fid) pair, "
                        f"got {type(record).__name__}")
    if isinstance(schedule, Mapping):
        try:
            schedule = schedule_from_dict(schedule, source=f"record {i}")
        except UserError as e:
            raise UserError(str(e)) from None
    if not isinstance(schedule, ModelSchedule):
        raise UserError(f"record {i}: 'schedule' must be a ModelSchedule or its schedule_to_dict(), "
                        f"got {type(schedule).__name__}")
    if not _finite_number(fid):
        raise UserError(f"record {i}: fid must be a finite number, got {fid!r}")
    return schedule, float(fid)


def _record_compute(i: int, record: Any, schedule: ModelSchedule) -> tuple[int, float | None]:
    """(NFE, cost) of a record: its "nfe"/"cost" keys when present, else the schedule's NFE and no cost.

    Only the trivial baselines of the test report use them, so a record without a cost is not an error.
    """
    nfe, cost = schedule.nfe, None
    if isinstance(record, Mapping):
        nfe = record.get("nfe", nfe)
        cost = record.get("cost")
    if not _finite_number(nfe):
        raise UserError(f"record {i}: nfe must be a finite number, got {nfe!r}")
    if cost is not None and not _finite_number(cost):
        raise UserError(f"record {i}: cost must be a finite number or absent, got {cost!r}")
    return int(nfe), (None if cost is None else float(cost))


class ScheduleFIDDataset(Dataset):
    """Encoded schedules with their FIDs; item i is (EncodedSchedules of length 1, fid scalar tensor)."""

    def __init__(self, encoded: EncodedSchedules, fids: Tensor):
        if len(encoded) != len(fids):
            raise ValueError(f"{len(encoded)} schedules but {len(fids)} FIDs")
        self.encoded, self.fids = encoded, fids

    def __len__(self) -> int:
        return len(self.fids)

    def __getitem__(self, i: int) -> tuple[EncodedSchedules, Tensor]:
        return self.encoded[i], self.fids[i]


def collate_schedule_fid(items: Sequence[tuple[EncodedSchedules, Tensor]]) -> tuple[EncodedSchedules, Tensor]:
    """Concatenate items into one padded batch and a (B,) FID tensor."""
    return EncodedSchedules.cat([e for e, _ in items]), torch.stack([f.reshape(()) for _, f in items])


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not _finite_number(value) or not 0.0 <= value < 1.0:
            raise UserError(f"{name} must lie in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"val_fraction + test_fraction must be < 1 to leave records to train on, "
                        f"got {val_fraction} + {test_fraction}")


def _split_indices(n: int, val_fraction: float, test_fraction: float,
                   split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (val, test, train) indices: consecutive cuts of one permutation of range(n) by `split_seed`."""
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    if n_test == 0:
        n_val = min(n_val, n - 1)  # as before test splits existed: rounding never empties the training split
    elif n_val + n_test > n - 1:
        raise UserError(f"val_fraction={val_fraction} and test_fraction={test_fraction} of {n} records leave "
                        f"{n - n_val - n_test} to train on; use smaller fractions or more records")
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test]), np.sort(perm[n_val + n_test:])


class ScheduleFIDDataModule(L.LightningDataModule):
    """Schedule/FID records split into train / validation / test by `split_seed`.

    A record is a dict with at least "schedule" (`schedule_to_dict(schedule)` or a ModelSchedule) and "fid", or a
    (ModelSchedule, fid) pair; a dict's "nfe" and "cost" are kept (`nfes`, `costs`) for the test report. One
    permutation of the record order by `split_seed` is cut into [val | test | train], so the same records and seed
    always give the same split, and adding a test split leaves the validation split unchanged. Validation (50% by
    default, as the paper) selects the checkpoint; test (0% by default) is only for reporting. Index arrays
    (`train_indices`, `val_indices`, `test_indices`) are sorted and refer to the order of `records`.
    """

    def __init__(self, records: Sequence[Mapping | tuple], encoder: ScheduleEncoder, val_fraction: float = 0.5,
                 split_seed: int = 0, batch_size: int = 512, val_batch_size: int | None = None, num_workers: int = 0,
                 test_fraction: float = 0.0):
        super().__init__()
        _check_fractions(val_fraction, test_fraction)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        records = list(records)
        parsed = [_parse_record(i, r) for i, r in enumerate(records)]
        if len(parsed) < 2:
            raise UserError(f"need at least 2 schedule/FID records to train a predictor, got {len(parsed)}")
        self.schedules = [s for s, _ in parsed]
        self.fids = torch.tensor([f for _, f in parsed], dtype=torch.float32)
        self.fid_values = [f for _, f in parsed]  # full precision for reports: float32 could tie close FIDs
        compute = [_record_compute(i, r, s) for i, (r, s) in enumerate(zip(records, self.schedules))]
        self.nfes = [n for n, _ in compute]
        self.costs = [c for _, c in compute]
        self.encoder = encoder
        self.val_indices, self.test_indices, self.train_indices = _split_indices(
            len(parsed), val_fraction, test_fraction, split_seed)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size or batch_size, num_workers
        self.encoded = encoder.encode(self.schedules)  # fails early on unknown members / too many steps
        self.train_dataset = self._subset(self.train_indices)
        self.val_dataset = self._subset(self.val_indices) if len(self.val_indices) else None
        self.test_dataset = self._subset(self.test_indices) if len(self.test_indices) else None

    def _subset(self, idx: np.ndarray) -> ScheduleFIDDataset:
        t = torch.as_tensor(idx, dtype=torch.long)
        return ScheduleFIDDataset(self.encoded[t], self.fids[t])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True,
                          collate_fn=collate_schedule_fid, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=collate_schedule_fid, num_workers=self.num_workers)


# ---------------------------------------------------------------------------------------------------- convenience
def fit_predictor(records: Sequence[Mapping | tuple], members: Sequence[str], noise: Mapping | VPSchedule,
                  max_steps: int, trainer_kwargs: Mapping | None = None, *, val_fraction: float = 0.5,
                  test_fraction: float = 0.0, split_seed: int = 0, batch_size: int = 512, seed: int | None = 0,
                  **module_kwargs) -> tuple[PredictorModule, dict]:
    """Train a PredictorModule on `records` with a plain `lightning.Trainer`; the best-τ weights are restored.

    `trainer_kwargs` go to the Trainer (defaults: 100 epochs, no logger, no progress bar); its "callbacks" are kept
    and a ModelCheckpoint on val/kendall_tau (mode max) is added. Without "default_root_dir" the checkpoint goes to
    a temporary directory that is removed after the best weights are loaded. Returns the module (eval mode) and
    JSON-serialisable metrics of the returned weights (τ/ρ are NaN where undefined):

    - "kendall_tau", "spearman": with test_fraction > 0 on the test split, never on the split that selected the
      checkpoint; with test_fraction = 0 (no test split) on the validation split, as before, hence optimistic.
    - "kendall_tau_val", "spearman_val": on the validation split (the one that selected the checkpoint).
    - "n_train", "n_val", "n_test", "best_model_path".
    - with test_fraction > 0 only: "test" = {"kendall_tau", "spearman", "n", "kendall_tau_neg_nfe",
      "kendall_tau_neg_cost"}, the last two the τ of the trivial rankings "more NFEs / more cost is better"
      against the same FIDs (None when a test record has no cost), i.e. what the predictor must beat; and
      "test_predictions" = {"index", "score", "fid", "cost", "nfe"}, one list entry per test record (index into
      `records`), so that callers can compute more, e.g. `rank_metrics_near` per budget.
    """
    if seed is not None:
        L.seed_everything(seed, verbose=False)
    module = PredictorModule(members, noise, max_steps, **module_kwargs)
    dm = ScheduleFIDDataModule(records, module.encoder, val_fraction, split_seed, batch_size,
                               test_fraction=test_fraction)
    best_path = _train(module, dm, trainer_kwargs)
    module.eval()
    val = _split_rank_metrics(module, dm, dm.val_indices)
    metrics: dict[str, Any] = {**val, "kendall_tau_val": val["kendall_tau"], "spearman_val": val["spearman"],
                               "best_model_path": best_path or None, "n_train": len(dm.train_indices),
                               "n_val": len(dm.val_indices), "n_test": len(dm.test_indices)}
    if test_fraction > 0:
        predictions = _split_predictions(module, dm, dm.test_indices)
        metrics["test"] = _test_report(predictions)
        metrics["test_predictions"] = predictions
        metrics["kendall_tau"] = metrics["test"]["kendall_tau"]
        metrics["spearman"] = metrics["test"]["spearman"]
    return module, metrics


def _train(module: PredictorModule, dm: ScheduleFIDDataModule, trainer_kwargs: Mapping | None) -> str | None:
    """Fit, load the best-τ checkpoint's weights into `module`, return its path (None when it was temporary)."""
    kwargs: dict[str, Any] = {"max_epochs": 100, "logger": False, "enable_progress_bar": False,
                              "enable_model_summary": False, "num_sanity_val_steps": 0}
    kwargs.update(dict(trainer_kwargs or {}))
    callbacks = list(kwargs.pop("callbacks", None) or [])
    tmp = None
    if "default_root_dir" not in kwargs:
        tmp = tempfile.mkdtemp(prefix="oms_predictor_")
        kwargs["default_root_dir"] = tmp
    checkpoint = None
    if dm.val_dataset is not None:
        checkpoint = ModelCheckpoint(monitor="val/kendall_tau", mode="max", save_top_k=1, filename="predictor-best")
        callbacks.append(checkpoint)
    try:
        with lightning_quiet():
            trainer = L.Trainer(callbacks=callbacks, **kwargs)
            trainer.fit(module, datamodule=dm)
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            best_path = None
    return best_path or None


def _split_predictions(module: PredictorModule, dm: ScheduleFIDDataModule, idx: np.ndarray) -> dict[str, list]:
    """Plain lists (JSON-serialisable) of the records at `idx`: index, predicted score, fid, cost, nfe."""
    scores = module.predict_scores([dm.schedules[i] for i in idx])
    return {"index": [int(i) for i in idx], "score": [float(x) for x in scores],
            "fid": [dm.fid_values[i] for i in idx], "cost": [dm.costs[i] for i in idx],
            "nfe": [dm.nfes[i] for i in idx]}


def _split_rank_metrics(module: PredictorModule, dm: ScheduleFIDDataModule, idx: np.ndarray) -> dict[str, float]:
    p = _split_predictions(module, dm, idx)
    return rank_metrics(np.array(p["score"]), np.array(p["fid"]))


def _test_report(p: Mapping[str, list]) -> dict[str, Any]:
    """The predictor's τ/ρ on the test split next to the τ of ranking by compute alone (more is better)."""
    fids = np.array(p["fid"], dtype=np.float64)
    report: dict[str, Any] = {**rank_metrics(np.array(p["score"], dtype=np.float64), fids), "n": len(fids)}
    report["kendall_tau_neg_nfe"] = rank_metrics(-np.array(p["nfe"], dtype=np.float64), fids)["kendall_tau"]
    have_cost = all(c is not None for c in p["cost"])
    report["kendall_tau_neg_cost"] = (rank_metrics(-np.array(p["cost"], dtype=np.float64), fids)["kendall_tau"]
                                      if have_cost else None)
    return report
