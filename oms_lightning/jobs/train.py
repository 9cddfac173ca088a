"""`python train.py model=M [data=D] [ckpt_path=last]`: train one zoo member (`training.member.train_member`: paths,
resume, trainer, the member file `checkpoints/<D>/<M>.ckpt` with its EMA weights and a sample grid)."""
from __future__ import annotations

from omegaconf import DictConfig

from oms_lightning.training import train_member


def train(cfg: DictConfig) -> dict:
    return train_member(cfg)
