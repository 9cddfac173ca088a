"""Networks of the zoo. Size presets live in `configs/model/`, keyed by image resolution.

`build_net` is the one builder: a member file's or a module's `net` dict names its architecture under `network`
(`unet`, the default, which older member files imply; or `multidecoder`), so checkpoint loading, training and the
zoo build any architecture without knowing it.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from oms_lightning.errors import UserError
from oms_lightning.nets.multidecoder import MultiDecoderUNet, StagePath
from oms_lightning.nets.unet import UNet

__all__ = ["NETWORKS", "MultiDecoderUNet", "StagePath", "UNet", "build_net", "build_preset", "preset_for",
           "preset_net"]

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "multidecoder": MultiDecoderUNet}


def preset_for(model_cfg: Mapping[str, Any], image_size: int) -> dict:
    """The architecture of a size preset at this resolution (`model_cfg["arch"][image_size]`) as a plain dict."""
    arch = model_cfg["arch"]
    # YAML keys may load as int or str depending on how the config was built.
    for key in (image_size, str(image_size)):
        if key in arch:
            spec = arch[key]
            spec = dict(spec.items()) if hasattr(spec, "items") else spec
            return {k: (list(v) if not isinstance(v, (int, float, str)) else v) for k, v in spec.items()}
    sizes = sorted(int(k) for k in arch)
    raise UserError(f"model preset {model_cfg['name']!r} has no architecture for {image_size}x{image_size} images "
                    f"(it defines {sizes}); add one under arch: in configs/model/{model_cfg['name']}.yaml")


def build_net(net: Mapping[str, Any], image_size: int, image_channels: int) -> nn.Module:
    """The network a `net` dict describes: `network` (default unet) picks the class, the rest are its arguments."""
    kwargs = dict(net)
    kind = kwargs.pop("network", "unet")
    if kind not in NETWORKS:
        raise UserError(f"unknown network architecture {kind!r}; known: {', '.join(NETWORKS)} (a member file from a "
                        f"newer oms-lightning, or a typo in the model preset's `network`)")
    try:
        return NETWORKS[kind](image_channels=image_channels, image_size=image_size, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {kind} architecture {kwargs}: {e}") from None


def preset_net(model_cfg: Mapping[str, Any], image_size: int) -> dict:
    """The `net` dict of a size preset at this resolution: its architecture, dropout and, when it is not a plain
    U-Net, its `network` (plain U-Nets keep the dict older member files and checkpoints have). A multi-decoder
    preset's `boundaries` are the config's (None: train.py reads them from the stages file)."""
    net = {**preset_for(model_cfg, image_size), "dropout": float(model_cfg["dropout"])}
    network = model_cfg.get("network", "unet")
    if network != "unet":
        net["network"] = str(network)
    if network == "multidecoder":
        boundaries = model_cfg.get("boundaries")
        net["boundaries"] = None if boundaries is None else [float(b) for b in boundaries]
    return net


def build_preset(model_cfg: Mapping[str, Any], image_size: int, image_channels: int, **overrides) -> nn.Module:
    """The network of a size preset (`configs/model/<name>.yaml`) at this resolution, e.g. boundaries=[...]."""
    return build_net({**preset_net(model_cfg, image_size), **overrides}, image_size, image_channels)
