"""Training one zoo member: the Lightning module (`module.py`: ε-prediction DDPM objective in continuous VP time),
its callbacks (`callbacks.py`: EMA, kill-safe checkpoints) and the whole run (`member.py`: paths, resume, trainer,
the member file) that `train.py` and the search's missing-member training share."""
from oms_lightning.training.callbacks import EMA, AtomicCheckpointIO
from oms_lightning.training.member import ensure_zoo, train_member
from oms_lightning.training.module import DiffusionModule, module_from_config

__all__ = ["EMA", "AtomicCheckpointIO", "DiffusionModule", "ensure_zoo", "module_from_config", "train_member"]
