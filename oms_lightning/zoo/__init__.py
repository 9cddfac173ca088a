"""The zoo: named members loaded from `<root>/<data>/<member>.ckpt`, their measured latency, a schedule's cost.

    zoo = Zoo.load("checkpoints", "digits", ["small", "large"], device="cuda")
    profile = load_or_profile(zoo, "checkpoints/digits/latency.json", batch_size=256)
    denoisers = zoo.denoisers_for(schedule)      # one EpsDenoiser per NFE, for the solvers
    cost = profile.cost(schedule)                # seconds per batch (OMS-DPM's cost model)

What lives where:
    members     `Zoo` (named members in sorted order, stage members of multi-decoder nets, weight digests and
                fingerprints, denoisers per NFE, time-range checks), `train_command` (advice for missing members)
    checkpoint  member checkpoint files (`Member`, `save_member`, `load_member`) and checks on Lightning
                training checkpoints
    ranges      valid time ranges of members (`MemberRanges`), member names of multi-decoder stages
    latency     `LatencyProfile`: measured seconds per forward pass, its file format and the cost model
    profiler    measuring latency (`profile_latency`), its cache file (`load_or_profile`), wall-clock timing of
                whole schedules (`time_schedules`, `cost_model_error`)
    devices     device resolution and checks, what a latency was measured on (device, threads, dtype)
"""
from oms_lightning.zoo.checkpoint import MEMBER_FORMAT, Member, check_training_checkpoint, load_member, save_member
from oms_lightning.zoo.devices import device_description, resolve_device
from oms_lightning.zoo.latency import MAX_SPREAD, PROFILE_FORMAT, LatencyProfile
from oms_lightning.zoo.members import DATA_FIELDS, MODEL_PRESETS, Zoo, stage_member, train_command
from oms_lightning.zoo.profiler import (PROFILE_TIME, cost_model_error, latency_path, load_or_profile,
                                        machine_speed_change, profile_latency, time_schedules)
from oms_lightning.zoo.ranges import FULL, STAGE_MARK, MemberRanges, split_member_name

__all__ = [
    "DATA_FIELDS", "FULL", "MAX_SPREAD", "MEMBER_FORMAT", "MODEL_PRESETS", "PROFILE_FORMAT", "PROFILE_TIME",
    "STAGE_MARK", "LatencyProfile", "Member", "MemberRanges", "Zoo", "check_training_checkpoint",
    "cost_model_error", "device_description", "latency_path", "load_member", "load_or_profile",
    "machine_speed_change", "profile_latency", "resolve_device", "save_member", "split_member_name",
    "stage_member", "time_schedules", "train_command",
]
