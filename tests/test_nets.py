"""U-Net: output shapes of every preset at every resolution, the DDPM parameter count, clear preset errors."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIGS
from oms_lightning.errors import UserError
from oms_lightning.nets import UNet, build_preset, preset_for

PRESETS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
STAGES = {"multistage": {"boundaries": [0.3, 0.7]}}   # a multi-decoder preset takes them from its stages file


def preset(name):
    return OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size,channels", [(8, 1), (32, 3)])
def test_every_preset_maps_images_to_same_shape(name, size, channels):
    net = build_preset(preset(name), size, channels, **STAGES.get(name, {})).eval()
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.5, 1e-4]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_large_on_cifar10_is_ddpm_35_7m_network():
    with torch.device("meta"):
        net = build_preset(preset("large"), 32, 3)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


def test_presets_grow_in_size_on_digits():
    counts = []
    for name in ["tiny", "small", "medium", "large"]:
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in build_preset(preset(name), 8, 1).parameters()))
    assert counts == sorted(counts) and counts[-1] > 8 * counts[0]


def test_time_conditioning_changes_the_output():
    net = UNet(image_channels=1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), dropout=0.0).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0.1])), net(x, torch.tensor([0.9])))


def test_missing_resolution_names_the_ones_defined():
    with pytest.raises(UserError, match=r"no architecture for 64x64.*\[8, 14, 16, 28, 32\]"):
        preset_for(preset("small"), 64)


def test_indivisible_size_and_heads_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(image_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attention heads"):
        UNet(image_channels=1, image_size=8, channels=16, channel_mult=(1,), attention_resolutions=(8,), num_heads=3)
