"""The model schedule (OMS-DPM): which zoo member runs at every network evaluation, and at which times.

    model.py   the `ModelSchedule` value (steps, members per NFE, IIA `Correction`), its checks and `schedule_key`
    file.py    the schedule on disk (tagged JSON, v1 plain / v2 with IIA coefficients)
    slots.py   the OMS-DPM reference code's integer-triplet encoding
"""
from oms_lightning.schedule.model import Correction, ModelSchedule, ScheduleError, Step, schedule_key

__all__ = ["Correction", "ModelSchedule", "ScheduleError", "Step", "schedule_key"]
