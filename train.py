"""Train one zoo member: python train.py model=small [data=digits] [experiment=cifar10_paper] [ckpt_path=last]"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.train import train  # imported late so `--help` and config errors answer fast

    train(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
