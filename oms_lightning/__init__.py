"""oms-lightning: diffusion samplers that are faster at equal quality (model schedules, timesteps, coefficients)."""
import os as _os

from omegaconf import OmegaConf as _OmegaConf

# `${pid:}` in the configs' run folder names: two runs started in the same second get two folders
_OmegaConf.register_new_resolver("pid", _os.getpid, replace=True)
