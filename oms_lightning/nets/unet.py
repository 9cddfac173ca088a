"""The zoo's U-Net: the DDPM architecture (Ho et al. 2020, appendix B), configurable in width and depth.

Residual blocks with a timestep embedding, self-attention at chosen resolutions, nearest-neighbour upsampling
and strided-convolution downsampling. With `channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
attention_resolutions=(16,)` on 32×32 RGB it is DDPM's CIFAR-10 network (35.7M parameters).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """DDPM's 32 groups at 128+ channels; narrow nets keep ≥ 4 channels per group (1-channel groups would be
    instance norm, which erases each channel's mean — e.g. an image's background level)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer position encoding of a (B,) time tensor (Vaswani et al. 2017), as DDPM uses for the step."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels (DDPM uses one head), computed by scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads c) h w -> three b heads (h w) c",
                            three=3, heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b heads (h w) c -> b (heads c) h w", h=height))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks of one resolution, each optionally followed by attention."""

    def __init__(self, channels: Sequence[int], emb_dim: int, dropout: float, attention: bool, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, emb_dim, dropout)
                                    for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.attn = nn.ModuleList(AttentionBlock(c, num_heads) if attention else nn.Identity() for c in channels[1:])


class UNet(nn.Module):
    """ε-prediction U-Net: forward(x, t) with t ∈ (0, 1] of shape (B,) returns ε̂ of x's shape.

    `time_scale` maps continuous time onto DDPM's step index range before the sinusoidal embedding.
    """

    def __init__(self, image_channels: int = 3, image_size: int = 32, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), num_heads: int = 1, dropout: float = 0.1,
                 time_scale: float = 1000.0):
        super().__init__()
        self.channels, self.time_scale = channels, time_scale
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.head = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.down, self.downsample, self.mid, skip_mults = down_path(
            image_size, channels, channel_mult, num_res_blocks, emb_dim, dropout, attention_resolutions, num_heads)
        widths, skips = [channels * m for m in channel_mult], [channels * m for m in skip_mults]
        c, res = widths[-1], image_size // 2 ** (len(channel_mult) - 1)
        self.up, self.upsample, self.tail = up_path(widths, skips, c, res, image_channels, num_res_blocks, emb_dim,
                                                    dropout, attention_resolutions, num_heads)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(sinusoidal_embedding(t * self.time_scale, self.channels).to(x.dtype))
        h, hs = run_down_path(self.down, self.downsample, self.mid, self.head(x), emb)
        return run_up_path(self.up, self.upsample, self.tail, h, hs, emb)


def down_path(image_size: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int, emb_dim: int,
              dropout: float, attention_resolutions: Sequence[int],
              num_heads: int) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList, list[int]]:
    """The encoder half (down, downsample, mid) from `channels` at full resolution, and the skip connections'
    widths as multiples of `channels` in the order they are made (a decoder of another width scales them)."""
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"image size {image_size} is not divisible by 2^{len(channel_mult) - 1} "
                         f"(channel_mult {list(channel_mult)} downsamples {len(channel_mult) - 1} times)")
    down, downsample, skip_mults = nn.ModuleList(), nn.ModuleList(), [1]
    c, res = channels, image_size
    for i, m in enumerate(channel_mult):
        w = channels * m
        down.append(Level([c] + [w] * num_res_blocks, emb_dim, dropout, res in attention_resolutions, num_heads))
        c = w
        skip_mults += [m] * num_res_blocks
        if i < len(channel_mult) - 1:
            downsample.append(Downsample(c))
            skip_mults.append(m)
            res //= 2
    mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), AttentionBlock(c, num_heads),
                         ResBlock(c, c, emb_dim, dropout)])
    return down, downsample, mid, skip_mults


def run_down_path(down: nn.ModuleList, downsample: nn.ModuleList, mid: nn.ModuleList, h: Tensor,
                  emb: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Forward through `down_path`'s modules: (the middle block's output, every skip feature in order)."""
    skips = [h]
    for i, level in enumerate(down):
        for block, attn in zip(level.blocks, level.attn):
            h = attn(block(h, emb))
            skips.append(h)
        if i < len(downsample):
            h = downsample[i](h)
            skips.append(h)
    return mid[2](mid[1](mid[0](h, emb)), emb), skips


def up_path(widths: Sequence[int], skips: Sequence[int], c: int, res: int, image_channels: int, num_res_blocks: int,
            emb_dim: int, dropout: float, attention_resolutions: Sequence[int],
            num_heads: int) -> tuple[nn.ModuleList, nn.ModuleList, nn.Sequential]:
    """The decoder half (up, upsample, tail) from c channels at resolution res to the image: level widths
    `widths` reversed, each block also fed one skip connection of the widths `skips` (consumed from the end)."""
    skips = list(skips)
    up, upsample = nn.ModuleList(), nn.ModuleList()
    for i, w in reversed(list(enumerate(widths))):
        level = Level([c] + [w] * (num_res_blocks + 1), emb_dim, dropout, res in attention_resolutions, num_heads)
        # Each up block also receives one skip connection concatenated to its input.
        level.blocks = nn.ModuleList(ResBlock(c_in + skips.pop(), w, emb_dim, dropout)
                                     for c_in in [c] + [w] * num_res_blocks)
        up.append(level)
        c = w
        if i > 0:
            upsample.append(Upsample(c))
            res *= 2
    return up, upsample, nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, image_channels, 3, padding=1))


def run_up_path(up: nn.ModuleList, upsample: nn.ModuleList, tail: nn.Module, h: Tensor, skips: list[Tensor],
                emb: Tensor) -> Tensor:
    """Forward through `up_path`'s modules, popping one skip per block."""
    for i, level in enumerate(up):
        for block, attn in zip(level.blocks, level.attn):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        if i < len(upsample):
            h = upsample[i](h)
    return tail(h)
