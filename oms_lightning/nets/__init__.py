"""Networks of the zoo. Size presets live in `configs/model/`, keyed by image resolution."""
from __future__ import annotations

from typing import Any, Mapping

from oms_lightning.errors import UserError
from oms_lightning.nets.unet import UNet

__all__ = ["UNet", "build_unet", "preset_for"]


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


def build_unet(model_cfg: Mapping[str, Any], image_size: int, image_channels: int) -> UNet:
    return UNet(image_channels=image_channels, image_size=image_size, dropout=float(model_cfg["dropout"]),
                **preset_for(model_cfg, image_size))
