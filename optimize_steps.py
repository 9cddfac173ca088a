"""Align Your Steps for a zoo member: python optimize_steps.py model=small solver=dpm_solver++ steps=10"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="optimize_steps", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.optimize_steps import optimize_steps  # late: `--help` and config errors answer fast

    optimize_steps(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
