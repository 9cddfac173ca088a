"""Sample from the zoo: python sample.py model=small steps=10 solver=dpm_solver++  |  schedule=PATH.json [fid=N]"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.sample import sample

    sample(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
