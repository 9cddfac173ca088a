"""DiffusionModule: trains one ε-prediction U-Net of the zoo (DDPM objective, continuous-time VP).

EMA is not implemented here: Lightning's weight-averaging callback (`oms_lightning.training.callbacks.EMA`) swaps
the EMA weights in for validation and sampling, stores them as the checkpoint's `state_dict` and restores both
copies on resume.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from oms_lightning.diffusion.ays_steps import AYS
from oms_lightning.diffusion.denoiser import EpsDenoiser
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.seeding import SampleNoise, per_sample_noise
from oms_lightning.diffusion.solvers import SolverError, get_solver
from oms_lightning.diffusion.spacing import SPACINGS, timesteps
from oms_lightning.errors import UserError
from oms_lightning.nets import build_net

# `sampling` of configs/train.yaml; a checkpoint's saved hparams may predate a key (e.g. order).
DEFAULT_SAMPLING = {"solver": "dpm_solver++", "steps": 20, "order": None, "spacing": "logsnr_uniform", "grid_size": 64,
                    "seed": 0}


def check_sampling(sampling: dict) -> int:
    """NFEs per step of the sample grids; UserError at construction (not at the first validation) for a
    solver the registry does not know or an order it cannot take."""
    try:
        spec = get_solver(sampling["solver"])
    except SolverError as e:
        raise UserError(f"invalid value sampling.solver={sampling['solver']!r}: {e}") from None
    if sampling["spacing"] == AYS:
        raise UserError("sampling.spacing=ays cannot serve training grids: an AYS schedule is optimised for a trained "
                        "member's weights, which change while training. Train, then run optimize_steps.py and "
                        "sample.py spacing=ays")
    if sampling["spacing"] not in SPACINGS:
        raise UserError(f"invalid value sampling.spacing={sampling['spacing']!r}: choose one of {', '.join(SPACINGS)}")
    try:
        return spec.uniform_nfe_per_step(sampling["order"])
    except SolverError as e:
        raise UserError(f"invalid value sampling.order={sampling['order']!r}: {e}") from None


class DiffusionModule(L.LightningModule):
    """ε-prediction diffusion model: loss E‖ε̂(α_t x₀ + σ_t ε, t) − ε‖², t ~ U(t_min, 1) (Ho et al. 2020, eq. 14).

    All constructor arguments are plain containers so that checkpoints load with `weights_only=True`.
    """

    def __init__(self, net: dict, noise: dict, optim: dict, data: dict, model_name: str,
                 sampling: dict | None = None, channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(net, data["image_size"], data["channels"])
        self.noise_schedule = VPSchedule.from_dict(noise)
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.sample_nfe_per_step = check_sampling(self.sampling)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
        else:  # one image at mid-noise: Lightning's model summary counts real FLOPs and sizes per layer with it
            self.example_input_array = (torch.zeros(1, *self.image_shape), torch.full((1,), 0.5))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.hparams.data
        return (d["channels"], d["image_size"], d["image_size"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # --- objective ---
    def diffusion_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.per_sample_loss(x0, generator)[0].mean()

    def per_sample_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(‖ε̂ − ε‖² / dim per sample, the t drawn for each sample)."""
        t_min = self.noise_schedule.t_min
        t = t_min + (1 - t_min) * torch.rand(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        alpha, sigma = (self.noise_schedule.alpha(t).view(-1, 1, 1, 1), self.noise_schedule.sigma(t).view(-1, 1, 1, 1))
        x_t = (alpha * x0 + sigma * eps).contiguous(memory_format=self.memory_format)
        return F.mse_loss(self.net(x_t, t).float(), eps, reduction="none").flatten(1).mean(1), t

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        per_sample, t = self.per_sample_loss(batch)
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        if hasattr(self.net, "stage_of"):  # a multi-decoder net: each decoder's loss on its own stage
            stages = self.net.stage_of(t)
            for k in range(self.net.num_stages):
                if (stages == k).any():
                    self.log(f"train/loss_stage{k}", per_sample[stages == k].mean())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        # Same t and ε for a batch at every validation, so successive validation losses are comparable.
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        self.log("val/loss", self.diffusion_loss(batch, generator), prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Only on logging steps: the norm is a pass over every gradient, noticeable for small nets on CPU.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        cfg = self.hparams.optim
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                     weight_decay=cfg["weight_decay"])
        warmup = max(1, cfg["warmup_steps"])
        # Linear warm-up as in DDPM's recipe, then constant.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling (uses whatever weights are loaded: EMA during validation and after fit) ---
    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, seed: int | None = None) -> Tensor:
        """n images in [-1, 1] with `sampling.solver` (registry name) on `sampling.spacing` steps; sample i always
        has the same noise."""
        steps = steps or self.sampling["steps"]
        solver = get_solver(self.sampling["solver"])
        seed = self.sampling["seed"] if seed is None else seed
        x = per_sample_noise(self.image_shape, range(n), seed, dtype=torch.float32, device=self.device)
        ts = timesteps(self.sampling["spacing"], steps, self.noise_schedule)
        was_training = self.net.training
        self.net.eval()
        try:
            x0 = solver.run(EpsDenoiser(self.net, self.noise_schedule), x, ts, self.noise_schedule,
                            [self.sample_nfe_per_step] * steps, noise=SampleNoise(range(n), seed))
        finally:
            self.net.train(was_training)
        return x0.clamp(-1, 1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        grid_size = self.sampling["grid_size"]
        if grid_size <= 0:
            return
        from oms_lightning.images import log_grid  # local import: keeps the module importable without PIL

        log_grid(self.sample(grid_size), self.trainer, name="samples", step=self.global_step)


def module_from_config(cfg: Any, data_name: str, image_size: int, channels: int) -> DiffusionModule:
    """Build the module from the composed Hydra config (resolving the size preset for this resolution)."""
    from omegaconf import OmegaConf

    from oms_lightning.nets import preset_net

    net = preset_net(cfg.model, image_size)
    if net.get("network") == "multidecoder":
        net["boundaries"] = stage_boundaries(cfg, data_name, len(net["decoder_channels"]))
    return DiffusionModule(
        net=net,
        noise=OmegaConf.to_container(cfg.diffusion, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        data={"name": data_name, "image_size": image_size, "channels": channels},
        model_name=str(cfg.model.name),
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True),
        channels_last=bool(cfg.perf.channels_last),
        compile=bool(cfg.perf.compile),
    )


def stage_boundaries(cfg: Any, data_name: str, stages: int) -> list[float]:
    """A multi-decoder preset's stage boundaries: `model.boundaries` if given, else the stages file that
    cluster_stages.py wrote for this data (checked against the stage count and the noise schedule)."""
    from omegaconf import OmegaConf

    from oms_lightning.diffusion.stages import validate_boundaries

    if cfg.model.get("boundaries") is not None:
        return list(validate_boundaries(list(cfg.model.boundaries), stages=stages, t_min=float(cfg.diffusion.t_min)))
    from oms_lightning.diffusion.stages_file import load_stages, stages_path

    noise = OmegaConf.to_container(cfg.diffusion, resolve=True)
    return list(load_stages(stages_path(cfg.paths.checkpoints, data_name), stages=stages, noise=noise))
