"""Multi-decoder U-Net (Zhang et al., CVPR 2024; PAPERS.md §4): one shared encoder, one decoder per time stage.

The time interval is split into stages by sorted interior boundaries: with boundaries [t1, t2] the stages are
[0, t1], (t1, t2], (t2, 1] (stage 0 = lowest noise; a time exactly at a boundary belongs to the lower stage).
The time embedding, the down path and the middle block are shared; each stage has its own up path and output head,
with its own width, so capacity goes where it is needed (the paper: widest decoder at low noise, narrowest at high
noise).

`MultiDecoderUNet.forward(x, t)` routes every sample to the decoder of its own t, so a batch with mixed times equals
the samples one by one and a decoder gets gradient only from samples of its stage. `StagePath` is one stage's
network (shared encoder + that decoder, parameters shared with the parent, not copied): a zoo member valid only in
its stage's time range, and the thing to profile for that stage's latency.

The building blocks are the zoo U-Net's (`nets/unet.py`); with one stage and decoder width = encoder width this is
exactly `UNet` (same modules, same maths; see `unet_state_dict_to_multidecoder`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from oms_lightning.diffusion.stages import stage_index, validate_boundaries
from oms_lightning.nets.unet import down_path, run_down_path, run_up_path, sinusoidal_embedding, up_path

__all__ = ["MultiDecoderUNet", "StagePath", "SharedEncoder", "StageDecoder", "MULTIDECODER_PRESETS",
           "multidecoder_preset", "unet_state_dict_to_multidecoder"]


class SharedEncoder(nn.Module):
    """Time embedding, input head, down path and middle block of the DDPM U-Net (shared by every stage).

    forward returns (emb, h, skips): the time embedding, the middle block's output and the skip features in the
    order the down path made them (the decoder pops them from the end, as UNet.forward does).
    """

    def __init__(self, image_channels: int, image_size: int, channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], num_heads: int, dropout: float,
                 time_scale: float):
        super().__init__()
        self.channels, self.time_scale = channels, time_scale
        self.emb_dim = emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.head = nn.Conv2d(image_channels, channels, 3, padding=1)
        # skip widths as channel multipliers, so that every decoder can scale them to its own width
        self.down, self.downsample, self.mid, self.skip_mults = down_path(
            image_size, channels, channel_mult, num_res_blocks, emb_dim, dropout, attention_resolutions, num_heads)

    def embed_time(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.time_embed(sinusoidal_embedding(t * self.time_scale, self.channels).to(dtype))

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        emb = self.embed_time(t, x.dtype)
        h, skips = run_down_path(self.down, self.downsample, self.mid, self.head(x), emb)
        return emb, h, skips


def _project(c_in: int, c_out: int) -> nn.Module:
    """1×1 conv from the encoder's width to a decoder's (identity when they agree, so no parameters are added)."""
    return nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()


class StageDecoder(nn.Module):
    """One stage's up path and output head, `channels` wide (level widths channels × channel_mult).

    Middle features and skip connections come at the encoder's width and are projected to this decoder's width by
    1×1 convolutions before use; otherwise the up path is UNet's (one skip concatenated per block).
    """

    def __init__(self, encoder: SharedEncoder, image_channels: int, image_size: int, channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int],
                 num_heads: int, dropout: float):
        super().__init__()
        enc_ch, emb_dim = encoder.channels, encoder.emb_dim
        self.channels = channels
        self.mid_proj = _project(enc_ch * channel_mult[-1], channels * channel_mult[-1])
        self.skip_proj = nn.ModuleList(_project(enc_ch * m, channels * m) for m in encoder.skip_mults)

        self.up, self.upsample, self.tail = up_path(
            [channels * m for m in channel_mult], [channels * m for m in encoder.skip_mults],
            channels * channel_mult[-1], image_size // 2 ** (len(channel_mult) - 1), image_channels, num_res_blocks,
            emb_dim, dropout, attention_resolutions, num_heads)

    def forward(self, emb: Tensor, h: Tensor, skips: list[Tensor]) -> Tensor:
        skips = [proj(s) for proj, s in zip(self.skip_proj, skips)]
        return run_up_path(self.up, self.upsample, self.tail, self.mid_proj(h), skips, emb)


class MultiDecoderUNet(nn.Module):
    """ε-prediction multi-decoder U-Net: forward(x, t) with t ∈ [0, 1] of shape (B,) (or a scalar) returns ε̂.

    `boundaries` are the sorted interior stage boundaries (len = stages − 1) and `decoder_channels` the base width
    of each stage's decoder, stage 0 = lowest noise. The other arguments are UNet's and shape the shared encoder
    (and, with each decoder's own width, the decoders).
    """

    def __init__(self, image_channels: int = 3, image_size: int = 32, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), num_heads: int = 1, dropout: float = 0.1,
                 time_scale: float = 1000.0, boundaries: Sequence[float] = (0.442, 0.631),
                 decoder_channels: Sequence[int] = (192, 128, 16)):
        super().__init__()
        if len(decoder_channels) < 1 or any(int(c) != c or c < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be positive integers, one per stage; got {list(decoder_channels)}")
        self.boundaries = validate_boundaries(boundaries, stages=len(decoder_channels))
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.encoder = SharedEncoder(image_channels, image_size, channels, channel_mult, num_res_blocks,
                                     attention_resolutions, num_heads, dropout, time_scale)
        self.decoders = nn.ModuleList(
            StageDecoder(self.encoder, image_channels, image_size, c, channel_mult, num_res_blocks,
                         attention_resolutions, num_heads, dropout) for c in self.decoder_channels)

    @property
    def num_stages(self) -> int:
        return len(self.decoders)

    def stage_of(self, t) -> Tensor:
        """Stage index (LongTensor, t's shape) of each time; see `diffusion.stages.stage_index` for the rule."""
        return stage_index(t, self.boundaries)

    def stage_ranges(self) -> list[tuple[float, float]]:
        """(lo, hi) per stage: stage 0 is [0, t1], stage k > 0 is (t_k, t_{k+1}], the last ends at 1."""
        edges = [0.0, *self.boundaries, 1.0]
        return list(zip(edges[:-1], edges[1:]))

    def stage_path(self, stage: int, allow_outside_range: bool = False) -> "StagePath":
        return StagePath(self, stage, allow_outside_range=allow_outside_range)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb, h, skips = self.encoder(x, t)
        stages = self.stage_of(t)
        out = torch.zeros_like(x)
        for s, decoder in enumerate(self.decoders):
            # Gather this stage's samples, decode them, scatter back: a decoder never sees another stage's samples,
            # so it gets no gradient from them (and none at all when its stage is absent from the batch).
            idx = torch.nonzero(stages == s).squeeze(1)
            if idx.numel() == 0:
                continue
            eps = decoder(emb[idx], h[idx], [skip[idx] for skip in skips])
            out = out.index_copy(0, idx, eps)
        return out


class StagePath(nn.Module):
    """One stage's network: the parent's shared encoder followed by that stage's decoder (the same modules).

    A standalone ε-net forward(x, t), valid only for t in the stage's range; times outside it raise a ValueError
    unless `allow_outside_range` (e.g. for latency profiling with arbitrary times). Its parameters are exactly the
    parameters this stage uses, so counting them gives the per-stage model size.
    """

    def __init__(self, parent: MultiDecoderUNet, stage: int, allow_outside_range: bool = False):
        super().__init__()
        if not 0 <= stage < parent.num_stages:
            raise ValueError(f"stage {stage} does not exist; the network has stages 0..{parent.num_stages - 1}")
        self.stage, self.allow_outside_range = stage, allow_outside_range
        self.boundaries = parent.boundaries
        self.t_range = parent.stage_ranges()[stage]
        self.encoder = parent.encoder            # registered here too: same Parameter objects, not copies
        self.decoder = parent.decoders[stage]

    def contains(self, t) -> Tensor:
        """Boolean mask: which times belong to this stage (and lie in [0, 1])."""
        t = torch.as_tensor(t)
        return (stage_index(t, self.boundaries) == self.stage) & (t >= 0) & (t <= 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if not self.allow_outside_range and not bool(self.contains(t).all()):
            lo, hi = self.t_range
            opening = "[" if self.stage == 0 else "("
            bad = t[~self.contains(t)]
            raise ValueError(f"stage {self.stage} is valid for t in {opening}{lo}, {hi}] only; got t = "
                             f"{bad[:5].tolist()}{' …' if bad.numel() > 5 else ''} (pass allow_outside_range=True "
                             f"to evaluate it anyway, e.g. for profiling)")
        emb, h, skips = self.encoder(x, t)
        return self.decoder(emb, h, skips)


# --------------------------------------------------------------------------------------------------- presets
# Full constructor arguments (plain dicts, so they can sit in a checkpoint's hyperparameters).
MULTIDECODER_PRESETS: dict[str, dict] = {
    # Digits 8×8×1. Encoder = configs/model/small.yaml's 8×8 arch; decoders 44 / 32 / 12 wide (wide at low noise,
    # narrow at high noise), sized for cost parity: per sample a stage path costs 1.63x / 1.00x / 0.43x the FLOPs of
    # UNet `small` (1.02x averaged over the stages, equally or by time length). Boundaries from
    # cluster_stages(digits train split, alpha=0.9, n_images=256, n_times=201, seed=0).
    "digits": {"image_channels": 1, "image_size": 8, "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
               "attention_resolutions": [], "num_heads": 1, "dropout": 0.1,
               "boundaries": [0.215, 0.8], "decoder_channels": [44, 32, 12]},
    # The paper's CIFAR-10 setting (PAPERS.md §4): encoder 128, decoders 192 / 128 / 16, stages [0, .442],
    # (.442, .631], (.631, 1], on DDPM's CIFAR-10 blocks (the paper's own base is NCSN++, hence other totals).
    "cifar10_paper": {"image_channels": 3, "image_size": 32, "channels": 128, "channel_mult": [1, 2, 2, 2],
                      "num_res_blocks": 2, "attention_resolutions": [16], "num_heads": 1, "dropout": 0.1,
                      "boundaries": [0.442, 0.631], "decoder_channels": [192, 128, 16]},
}


def multidecoder_preset(name: str, **overrides) -> dict:
    """A copy of a preset's constructor arguments with overrides applied (e.g. boundaries from a clustering)."""
    if name not in MULTIDECODER_PRESETS:
        raise ValueError(f"unknown multi-decoder preset {name!r}; choose one of {sorted(MULTIDECODER_PRESETS)}")
    unknown = set(overrides) - set(MULTIDECODER_PRESETS[name]) - {"time_scale"}
    if unknown:
        raise ValueError(f"unknown MultiDecoderUNet arguments {sorted(unknown)}")
    return {**{k: (list(v) if isinstance(v, list) else v) for k, v in MULTIDECODER_PRESETS[name].items()},
            **overrides}


def unet_state_dict_to_multidecoder(state_dict: dict, stage: int = 0) -> dict:
    """Rename a UNet state dict to a MultiDecoderUNet's keys, its up path going to decoder `stage`.

    Valid when that decoder has the encoder's width (no projections): then the stage path computes exactly the UNet.
    Useful to initialise every decoder from one trained UNet, and to test that the two agree.
    """
    decoder_parts = ("up.", "upsample.", "tail.")
    return {(f"decoders.{stage}.{k}" if k.startswith(decoder_parts) else f"encoder.{k}"): v
            for k, v in state_dict.items()}
