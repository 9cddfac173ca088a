"""Multi-decoder U-Net: per-sample routing, gradient isolation between stages, stage paths, presets."""
import pytest
import torch

from oms_lightning.diffusion.stages import StageError
from oms_lightning.nets import UNet
from oms_lightning.nets.multidecoder import MULTIDECODER_PRESETS, MultiDecoderUNet, multidecoder_preset, \
    unet_state_dict_to_multidecoder

BOUNDARIES = (0.3, 0.7)
# Attention at 4×4 and three different decoder widths (wider / equal / narrower than the encoder's 8).
TINY = dict(image_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), dropout=0.0, boundaries=BOUNDARIES, decoder_channels=(12, 8, 4))
# Two samples in each stage, including both boundaries (which belong to the lower stage).
MIXED_T = torch.tensor([0.05, 0.3, 0.31, 0.7, 0.71, 1.0], dtype=torch.float64)
MIXED_STAGES = [0, 0, 1, 1, 2, 2]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny nets: see conftest.one_thread


def count(params):
    return sum(p.numel() for p in params)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return MultiDecoderUNet(**TINY).double().eval()


def test_mixed_batch_equals_samples_one_by_one(net):
    x = torch.randn(len(MIXED_T), 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        batched = net(x, MIXED_T)
        single = torch.cat([net(x[i:i + 1], MIXED_T[i:i + 1]) for i in range(len(x))])
    assert batched.shape == x.shape
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


def test_each_sample_uses_its_own_stage_decoder(net):
    x = torch.randn(len(MIXED_T), 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        routed = net(x, MIXED_T)
        for stage in range(3):
            path = net.stage_path(stage, allow_outside_range=True)
            rows = [i for i, s in enumerate(MIXED_STAGES) if s == stage]
            torch.testing.assert_close(routed[rows], path(x[rows], MIXED_T[rows]), rtol=0, atol=1e-12)
            others = [i for i in range(len(x)) if i not in rows]
            assert not torch.allclose(routed[others], path(x[others], MIXED_T[others]))


def test_decoder_gets_no_gradient_from_samples_outside_its_stage(net):
    x = torch.randn(len(MIXED_T), 1, 8, 8, dtype=torch.float64)
    stage_of_row = torch.tensor(MIXED_STAGES)

    def decoder_grads(rows_in_loss, t=MIXED_T):
        net.zero_grad(set_to_none=True)
        (net(x, t)[rows_in_loss] ** 2).sum().backward()
        return [[p.grad for p in d.parameters()] for d in net.decoders]

    # A loss on stage-2 samples only: decoders 0 and 1 get nothing (None or exact zeros), decoder 2 does.
    grads = decoder_grads(stage_of_row == 2)
    for stage in (0, 1):
        assert all(g is None or not g.any() for g in grads[stage])
    assert any(g is not None and g.any() for g in grads[2])

    # The whole mixed batch gives decoder 0 exactly the gradient of its own samples (loss is a sum over samples).
    full = decoder_grads(torch.ones(len(x), dtype=torch.bool))[0]
    own = decoder_grads(stage_of_row == 0)[0]
    for g_full, g_own in zip(full, own):
        torch.testing.assert_close(g_full, g_own, rtol=1e-10, atol=1e-12)

    # A batch with no stage-1 sample never touches decoder 1.
    net.zero_grad(set_to_none=True)
    keep = stage_of_row != 1
    (net(x[keep], MIXED_T[keep]) ** 2).sum().backward()
    assert all(p.grad is None for p in net.decoders[1].parameters())
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_stage_path_shares_parameters_and_matches_routed_forward(net):
    path = net.stage_path(1)
    expected = {id(p) for p in net.encoder.parameters()} | {id(p) for p in net.decoders[1].parameters()}
    assert {id(p) for p in path.parameters()} == expected
    assert count(path.parameters()) == count(net.encoder.parameters()) + count(net.decoders[1].parameters())
    assert path.t_range == (0.3, 0.7)

    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.31, 0.5, 0.7], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(path(x, t), net(x, t), rtol=0, atol=1e-12)
        before = path(x, t)
        net.decoders[1].tail[-1].bias.add_(1.0)      # an edit to the parent shows in the path: shared, not copied
        torch.testing.assert_close(path(x, t), before + 1.0)


def test_stage_path_refuses_times_outside_its_range(net):
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"stage 1 is valid for t in \(0.3, 0.7\] only.*allow_outside_range"):
        net.stage_path(1)(x, torch.tensor([0.5, 0.3], dtype=torch.float64))      # 0.3 belongs to stage 0
    with pytest.raises(ValueError, match=r"stage 0 is valid for t in \[0.0, 0.3\]"):
        net.stage_path(0)(x, torch.tensor(0.9))
    assert net.stage_path(0)(x, torch.tensor(0.0)).shape == x.shape
    assert net.stage_path(2, allow_outside_range=True)(x, torch.tensor(0.1)).shape == x.shape
    with pytest.raises(ValueError, match="stage 3 does not exist"):
        net.stage_path(3)


def test_stage_of_puts_boundaries_in_the_lower_stage(net):
    assert net.stage_of(MIXED_T).tolist() == MIXED_STAGES
    assert net.stage_of(torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float32)).tolist() == [0, 0, 1, 2]
    assert net.stage_of(torch.nextafter(torch.tensor(0.3), torch.tensor(1.0))).item() == 1
    assert net.stage_of(torch.tensor(0.5)).dtype == torch.int64
    assert net.stage_ranges() == [(0.0, 0.3), (0.3, 0.7), (0.7, 1.0)]


def test_one_stage_at_the_encoder_width_is_exactly_the_unet():
    arch = {k: v for k, v in TINY.items() if k not in ("boundaries", "decoder_channels")}
    unet = UNet(**arch).eval()
    single = MultiDecoderUNet(**arch, boundaries=(), decoder_channels=(8,)).eval()
    single.load_state_dict(unet_state_dict_to_multidecoder(unet.state_dict()))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 0.5, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(single(x, t), unet(x, t), rtol=0, atol=0)


def test_digits_preset_matches_small_unet_in_its_middle_stage():
    small = UNet(image_channels=1, image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=())
    net = MultiDecoderUNet(**multidecoder_preset("digits"))
    sizes = [count(net.stage_path(s).parameters()) for s in range(3)]
    assert sizes[1] == count(small.parameters())           # encoder = small's, decoder at small's width
    assert sizes[0] > sizes[1] > sizes[2]
    x = torch.randn(3, 1, 8, 8)
    assert net.eval()(x, torch.tensor([0.1, 0.5, 0.9])).shape == x.shape


def test_cifar10_paper_preset_sizes():
    with torch.device("meta"):
        net = MultiDecoderUNet(**MULTIDECODER_PRESETS["cifar10_paper"])
    sizes = [count(net.stage_path(s).parameters()) for s in range(3)]
    # Stage 1 (decoder 128 = encoder) is DDPM's CIFAR-10 network exactly; stage 0 is wider, stage 2 narrower.
    assert sizes == [63_592_643, 35_746_307, 13_997_427]
    assert count(net.parameters()) == 86_512_953
    assert net.stage_ranges() == [(0.0, 0.442), (0.442, 0.631), (0.631, 1.0)]


def test_bad_stage_settings_are_refused():
    with pytest.raises(StageError, match="3 stages need 2 interior boundaries"):
        MultiDecoderUNet(**{**TINY, "boundaries": (0.5,)})
    with pytest.raises(StageError, match="strictly increasing"):
        MultiDecoderUNet(**{**TINY, "boundaries": (0.7, 0.3)})
    with pytest.raises(ValueError, match="decoder_channels must be positive integers"):
        MultiDecoderUNet(**{**TINY, "decoder_channels": (8, 0, 4)})
    with pytest.raises(ValueError, match="unknown multi-decoder preset"):
        multidecoder_preset("huge")
