"""Training throughput (images/s) per U-Net preset: fp32 eager against the fast path, in the same process.

The fast path is what `perf.channels_last=true perf.compile=true trainer.precision=bf16-mixed` turns on:
bf16 autocast, channels_last memory format and torch.compile (each where the device supports it).

    python benchmarks/train_throughput.py --data digits                 # 8x8 presets, CPU
    python benchmarks/train_throughput.py --data cifar10 --models large  # the DDPM CIFAR-10 network (GPU)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_lightning.training import DiffusionModule  # noqa: E402
from oms_lightning.nets import preset_for  # noqa: E402

SHAPES = {"digits": (1, 8), "cifar10": (3, 32)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build(model: str, data: str, fast: bool, device: torch.device) -> DiffusionModule:
    channels, size = SHAPES[data]
    preset = OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml")
    noise = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train.yaml").diffusion)
    module = DiffusionModule(net={**preset_for(preset, size), "dropout": float(preset.dropout)}, noise=noise,
                             optim={"lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 1},
                             data={"name": data, "image_size": size, "channels": channels}, model_name=model,
                             channels_last=fast, compile=fast and args.compile)
    module.net.to(device, memory_format=torch.channels_last if fast else torch.contiguous_format)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(module: DiffusionModule, batch: torch.Tensor, fast: bool, steps: int, warmup: int) -> float:
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-4)
    dtype = torch.bfloat16 if fast else torch.float32
    device = batch.device

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=fast):
            loss = module.diffusion_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):  # includes compilation
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    channels, size = SHAPES[args.data]
    print(f"# python {' '.join(sys.argv)}\n# device: {device_name(device)}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; fast = bf16 autocast + channels_last"
          f"{' + torch.compile' if args.compile else ''}")
    print("| preset | params | fp32 eager img/s | fast img/s | speed-up |\n|---|---:|---:|---:|---:|")
    for model in args.models:
        rates = {}
        for fast in (False, True):
            torch.manual_seed(0)
            module = build(model, args.data, fast, device)
            batch = torch.randn(args.batch, channels, size, size, device=device)
            if fast:
                batch = batch.contiguous(memory_format=torch.channels_last)
            rates[fast] = images_per_second(module, batch, fast, args.steps, args.warmup)
        print(f"| {model} | {module.num_parameters() / 1e6:.2f}M | {rates[False]:.0f} | {rates[True]:.0f} | "
              f"{rates[True] / rates[False]:.2f}x |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SHAPES), default="digits")
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "medium", "large"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile in the fast path (default: on for CUDA, off for CPU)")
    parser.add_argument("--cpu", action="store_true", help="measure on CPU even when a GPU is present")
    args = parser.parse_args()
    if args.compile is None:
        args.compile = torch.cuda.is_available() and not args.cpu
    main()
