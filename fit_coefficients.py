"""IIA coefficients for a sampler: python fit_coefficients.py model=small solver=dpm_solver++ steps=10  |
schedule=PATH.json"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="fit_coefficients", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.fit_coefficients import fit_coefficients  # late: `--help` and config errors answer fast

    fit_coefficients(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
