"""Multi-decoder members in the zoo: one member file of either architecture through one builder, stage paths as
members with valid time ranges, schedules that run a stage outside its range refused with the step named."""
import dataclasses
import json

import pytest
import torch

from conftest import TINY, write_member
from oms_lightning.zoo import LatencyProfile, load_member, profile_latency, save_member, Zoo
from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.errors import UserError
from oms_lightning.nets import MultiDecoderUNet, UNet, build_net
from oms_lightning.sampling import generate
from oms_lightning.schedule import ModelSchedule, ScheduleError

DATA = {"name": "digits", "image_size": 8, "channels": 1}
MULTI = {"network": "multidecoder", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
         "attention_resolutions": [], "dropout": 0.0, "boundaries": [0.3, 0.7], "decoder_channels": [12, 8, 4]}


def write_multistage(root, name="multistage", seed=0):
    torch.manual_seed(seed)
    net = build_net(MULTI, 8, 1)
    return save_member(root / "digits" / f"{name}.ckpt", name=name, net_kwargs=MULTI, noise=VPSchedule().to_dict(),
                       data=DATA, state_dict=net.state_dict(), meta={"global_step": 10})


def test_one_builder_for_both_architectures_and_old_files():
    assert isinstance(build_net({"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                 "attention_resolutions": [], "dropout": 0.0}, 8, 1), UNet)   # no `network`: unet
    assert isinstance(build_net(MULTI, 8, 1), MultiDecoderUNet)
    with pytest.raises(UserError, match="unknown network architecture 'transformer'"):
        build_net({**MULTI, "network": "transformer"}, 8, 1)
    with pytest.raises(UserError, match="invalid multidecoder architecture"):
        build_net({**MULTI, "decoder_channels": [8, 8]}, 8, 1)        # 2 decoders for 3 stages


def test_member_files_of_both_architectures_round_trip_with_weights_only(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    path = write_multistage(tmp_path)
    m = load_member(path)                                             # torch.load(weights_only=True) inside
    assert isinstance(m.net, MultiDecoderUNet) and m.net.boundaries == (0.3, 0.7)
    assert isinstance(load_member(tmp_path / "digits" / "tiny.ckpt").net, UNet)


def test_a_multistage_file_expands_into_its_stage_members(tmp_path):
    write_member(tmp_path, "tiny", TINY)
    write_multistage(tmp_path)
    zoo = Zoo.load(tmp_path, "digits")
    assert zoo.names == ("multistage", "multistage.s0", "multistage.s1", "multistage.s2", "tiny")
    assert zoo.time_range("multistage.s1") == (0.3, 0.7) and zoo.time_range("multistage") == (0.0, 1.0)
    # the stage path shares the routed net's modules and agrees with it inside its stage
    assert zoo.net("multistage.s2").decoder is zoo.net("multistage").decoders[2]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.8, 0.9, 1.0])
    assert torch.allclose(zoo.net("multistage.s2")(x, t), zoo.net("multistage")(x, t))
    only = Zoo.load(tmp_path, "digits", ["multistage.s0"])
    assert only.names == ("multistage.s0",) and only.fingerprint() != Zoo.load(tmp_path, "digits",
                                                                                ["multistage.s1"]).fingerprint()
    with pytest.raises(UserError, match="not a multi-decoder network"):
        Zoo.load(tmp_path, "digits", ["tiny.s0"])
    profile = profile_latency(zoo, batch_size=4, warmup=1, repeats=2, rounds=1)   # stage paths profile too
    assert set(profile.latency) == set(zoo.names)


def test_the_routed_member_costs_each_nfe_the_latency_of_its_stage(tmp_path):
    write_multistage(tmp_path)
    write_member(tmp_path, "tiny", TINY)
    zoo = Zoo.load(tmp_path, "digits")
    profile = profile_latency(zoo, batch_size=4, warmup=1, repeats=2, rounds=1)
    assert set(profile.routed) == {"multistage"} and profile.routed["multistage"]["boundaries"] == [0.3, 0.7]
    assert len(profile.routed["multistage"]["latency"]) == 3 and profile.matches(zoo, 4, profile.device_name)
    assert LatencyProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile     # the file round-trips
    assert not dataclasses.replace(profile, routed={}, noise=None).matches(zoo, 4, profile.device_name)
    # by hand: stages cost 3, 2, 1 ms; DDIM evaluates at each step's start: t = 1.0 (stage 2), 0.5 (1), 0.3 (0 —
    # a boundary belongs to the lower stage), 0.1 (0); a plain member keeps its flat latency
    hand = dataclasses.replace(profile, latency={**profile.latency, "tiny": 0.5},
                               routed={"multistage": {"boundaries": [0.3, 0.7], "latency": [3.0, 2.0, 1.0]}})
    routed = ModelSchedule.from_times_and_members([1.0, 0.5, 0.3, 0.1, 1e-3], ["multistage"] * 3 + ["tiny"],
                                                  solver="ddim")
    assert hand.cost(routed) == pytest.approx(1.0 + 2.0 + 3.0 + 0.5)
    # Heun's corrector of a step from 0.8 to 0.5 runs at 0.5: stage 2 then stage 1
    heun = ModelSchedule.from_times_and_members([0.8, 0.5], [["multistage", "multistage"]], solver="heun")
    assert hand.cost(heun) == pytest.approx(1.0 + 2.0)
    with pytest.raises(ValueError, match="one positive latency per stage"):
        dataclasses.replace(hand, routed={"multistage": {"boundaries": [0.3, 0.7], "latency": [3.0, 2.0]}})


def test_a_schedule_running_a_stage_outside_its_range_is_refused_with_the_step_named(tmp_path):
    write_multistage(tmp_path)
    zoo = Zoo.load(tmp_path, "digits")
    good = ModelSchedule.from_times_and_members([1.0, 0.8, 0.5, 0.2, 1e-3],
                                                ["multistage.s2", "multistage.s2", "multistage.s1", "multistage.s0"],
                                                solver="ddim")
    assert generate(zoo, good, 2).shape == (2, 1, 8, 8)
    bad = ModelSchedule.from_times_and_members([1.0, 0.5, 1e-3], ["multistage.s2", "multistage.s2"], solver="ddim")
    with pytest.raises(ScheduleError, match=r"step 1 NFE 0 runs member 'multistage.s2' at t=0.5.*\(0.7, 1\]"):
        generate(zoo, bad, 2)
    # Heun's corrector evaluates at the step's end: a step from 0.8 to 0.5 needs stage 1 there, not stage 2
    heun = ModelSchedule.from_times_and_members([0.8, 0.5], [["multistage.s2", "multistage.s2"]], solver="heun")
    with pytest.raises(ScheduleError, match="step 0 NFE 1"):
        zoo.check_time_ranges(heun)
    assert zoo.out_of_range(ModelSchedule.from_times_and_members([0.8, 0.5], [["multistage.s2", "multistage.s1"]],
                                                                 solver="heun")) == []


@pytest.mark.slow
def test_train_multistage_from_the_stages_file_then_its_stages_join_the_zoo(compose, tmp_path):
    """train.py model=multistage reads checkpoints/<data>/stages.json, logs a loss per stage, and writes a member
    file whose stage paths the zoo loads; without a stages file the error names cluster_stages.py."""
    from oms_lightning.diffusion.stages_file import save_stages, stages_path
    from oms_lightning.jobs.train import train

    smoke = ["experiment=digits_smoke", "model=multistage", f"paths.checkpoints={tmp_path}"]
    with pytest.raises(UserError, match="cluster_stages.py"):
        train(compose("train", smoke))
    cfg = compose("train", smoke)
    from omegaconf import OmegaConf

    noise = OmegaConf.to_container(cfg.diffusion, resolve=True)
    save_stages(stages_path(tmp_path, "digits"), {"data": "digits", "stages": 3, "boundaries": [0.25, 0.75],
                                                   "noise": noise})
    summary = train(cfg)
    m = load_member(summary["member"])
    assert isinstance(m.net, MultiDecoderUNet) and m.net.boundaries == (0.25, 0.75)
    zoo = Zoo.load(tmp_path, "digits")
    assert zoo.names == ("multistage", "multistage.s0", "multistage.s1", "multistage.s2")


def test_the_single_member_ablation_of_a_winner_skips_stage_members_that_cannot_run_alone(tmp_path):
    from oms_lightning.samplers import same_steps_single_member

    write_multistage(tmp_path)
    write_member(tmp_path, "tiny", TINY)
    zoo = Zoo.load(tmp_path, "digits")
    winner = ModelSchedule.from_times_and_members([1.0, 0.8, 0.5, 0.2, 1e-3],
                                                  ["multistage.s2", "tiny", "multistage.s1", "multistage.s0"],
                                                  solver="ddim")
    seen = []

    def rerank(schedules):
        seen.extend(schedules)
        for s in schedules:
            zoo.check_time_ranges(s)              # what generating their samples would do
        return [{"fid": float(len(s.member_names[0]))} for s in schedules]

    fids = same_steps_single_member(winner, zoo, rerank)
    assert set(fids) == {"multistage", "tiny"} and fids["tiny"] == 4.0
    assert all(s.times == winner.times for s in seen)


def test_iia_fits_a_schedule_whose_stage_member_steps_across_a_boundary(tmp_path):
    """IIA's fine sub-steps run between NFE times: a stage member's reference is its routed net, never the stage
    path outside its range; without the routed member in the zoo the search gets no coefficients (None)."""
    from oms_lightning.sampling import fit_schedule

    write_multistage(tmp_path)
    zoo = Zoo.load(tmp_path, "digits")
    plain = ModelSchedule.from_times_and_members([1.0, 0.8, 0.5, 0.2, 1e-3],   # s2 runs at 0.8, its step ends at 0.5
                                                 ["multistage.s2", "multistage.s2", "multistage.s1", "multistage.s0"],
                                                 solver="ddim")
    calibration = {"n": 8, "held_out": 4, "seed": 1000}
    corrected = fit_schedule(zoo, plain, calibration, sub_steps=3)
    assert corrected is not None and corrected.plain() == plain and len(corrected.correction.coefficients) == 4
    assert generate(zoo, corrected, 2).shape == (2, 1, 8, 8)
    stages_only = Zoo.load(tmp_path, "digits", ["multistage.s0", "multistage.s1", "multistage.s2"])
    assert fit_schedule(stages_only, plain, calibration, sub_steps=3) is None
