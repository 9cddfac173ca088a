"""PredictorModule: trains the schedule predictor on schedule/FID records with a pairwise ranking loss.

OMS-DPM (Liu et al. 2023, §4.2): the predictor only has to *order* schedules like their FID, so the default loss is
a pairwise hinge: for every pair in a batch with FID_i + threshold < FID_j (i is clearly better), pay
relu(margin − (s_j − s_i)). Pairs closer than `fid_threshold` are ignored (FID noise; the paper uses 0.25 on
CIFAR-10 FIDs — use a scale that fits your FIDs). Validation reports Kendall's τ and Spearman's ρ over the whole
held-out split (50/50 by default, fixed by a seed).
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
from oms_lightning.schedule import ModelSchedule

from .encoding import DEFAULT_SOLVERS, MAX_ORDER, EncodedSchedules, ScheduleEncoder
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


# ---------------------------------------------------------------------------------------------------- module
class PredictorModule(L.LightningModule):
    """The OMS-DPM predictor as a LightningModule; hyperparameters are plain containers (weights_only=True loads).

    Batches are (EncodedSchedules, fid tensor (B,)). `predict_scores` scores ModelSchedules for the search.
    """

    def __init__(self, members: Sequence[str], noise: Mapping | VPSchedule | None = None, max_steps: int = 30,
                 member_dim: int = 32, order_dim: int = 16, time_dim: int = 64, hidden: int = 128,
                 head_hidden: int = 200, loss: str = "hinge", margin: float = 1.0, fid_threshold: float = 0.25,
                 lr: float = 1e-3, weight_decay: float = 0.0, solvers: Sequence[str] | None = None):
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
        self.encoder = ScheduleEncoder(members, noise, max_steps, solvers)
        self.save_hyperparameters({
            "members": list(self.encoder.members), "noise": noise, "max_steps": int(max_steps),
            "member_dim": member_dim, "order_dim": order_dim, "time_dim": time_dim, "hidden": hidden,
            "head_hidden": head_hidden, "loss": loss, "margin": float(margin), "fid_threshold": float(fid_threshold),
            "lr": float(lr), "weight_decay": float(weight_decay), "solvers": list(self.encoder.solvers),
        })
        self.net = SchedulePredictor(len(self.encoder.members), MAX_ORDER, member_dim, order_dim, time_dim, hidden,
                                     head_hidden, num_solvers=len(self.encoder.solvers))
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
            schedule = ModelSchedule.from_dict(schedule, source=f"record {i}")
        except UserError as e:
            raise UserError(str(e)) from None
    if not isinstance(schedule, ModelSchedule):
        raise UserError(f"record {i}: 'schedule' must be a ModelSchedule or its to_dict(), got {type(schedule).__name__}")
    if isinstance(fid, bool) or not isinstance(fid, (int, float, np.floating, np.integer)) or not math.isfinite(fid):
        raise UserError(f"record {i}: fid must be a finite number, got {fid!r}")
    return schedule, float(fid)


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


class ScheduleFIDDataModule(L.LightningDataModule):
    """Schedule/FID records split into train / held-out validation by `split_seed` (50/50 by default, as the paper).

    A record is a dict with at least "schedule" (ModelSchedule.to_dict() or a ModelSchedule) and "fid", or a
    (ModelSchedule, fid) pair. The split is a fixed permutation of the record order, so the same records and seed
    always give the same split.
    """

    def __init__(self, records: Sequence[Mapping | tuple], encoder: ScheduleEncoder, val_fraction: float = 0.5,
                 split_seed: int = 0, batch_size: int = 512, val_batch_size: int | None = None, num_workers: int = 0):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        parsed = [_parse_record(i, r) for i, r in enumerate(records)]
        if len(parsed) < 2:
            raise UserError(f"need at least 2 schedule/FID records to train a predictor, got {len(parsed)}")
        self.schedules = [s for s, _ in parsed]
        self.fids = torch.tensor([f for _, f in parsed], dtype=torch.float32)
        self.encoder = encoder
        n = len(parsed)
        n_val = int(round(n * val_fraction))
        n_val = min(n_val, n - 1)
        perm = np.random.default_rng(split_seed).permutation(n)
        self.val_indices = np.sort(perm[:n_val])
        self.train_indices = np.sort(perm[n_val:])
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size or batch_size, num_workers
        self.encoded = encoder.encode(self.schedules)  # fails early on unknown members / too many steps
        self.train_dataset = self._subset(self.train_indices)
        self.val_dataset = self._subset(self.val_indices) if n_val else None

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
                  split_seed: int = 0, batch_size: int = 512, seed: int | None = 0,
                  **module_kwargs) -> tuple[PredictorModule, dict]:
    """Train a PredictorModule on `records` with a plain `lightning.Trainer`; the best-τ weights are restored.

    `trainer_kwargs` go to the Trainer (defaults: 100 epochs, no logger, no progress bar); its "callbacks" are kept
    and a ModelCheckpoint on val/kendall_tau (mode max) is added. Without "default_root_dir" the checkpoint goes to
    a temporary directory that is removed after the best weights are loaded. Returns the module (eval mode) and
    {"kendall_tau", "spearman"} of the returned weights on the held-out split, plus "best_model_path",
    "n_train", "n_val".
    """
    if seed is not None:
        L.seed_everything(seed, verbose=False)
    module = PredictorModule(members, noise, max_steps, **module_kwargs)
    dm = ScheduleFIDDataModule(records, module.encoder, val_fraction, split_seed, batch_size)
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
    module.eval()
    metrics: dict[str, Any] = {"kendall_tau": float("nan"), "spearman": float("nan"),
                               "best_model_path": best_path or None,
                               "n_train": len(dm.train_indices), "n_val": len(dm.val_indices)}
    if dm.val_dataset is not None:
        with torch.no_grad():
            enc = dm.val_dataset.encoded.to(module.device)
            scores = torch.cat([module(enc[i: i + 4096]) for i in range(0, len(enc), 4096)]).double().cpu().numpy()
        metrics.update(rank_metrics(scores, dm.val_dataset.fids.numpy()))
    return module, metrics
