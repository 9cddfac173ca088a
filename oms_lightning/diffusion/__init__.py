"""Diffusion mathematics: noise schedule, denoiser wrapper, timestep spacings, per-sample seeds, solvers."""
