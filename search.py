"""Search a model schedule under a time budget: python search.py [budget=MS] [-m budget=A,B,C]"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="search", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.search import run  # imported late so `--help` and config errors answer fast

    run(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
