"""Stage boundaries for multi-decoder U-Nets: python cluster_stages.py data=digits stages=3"""
import sys
from pathlib import Path

import hydra

from oms_lightning.cli import check_config_groups, exit_on_user_error


@hydra.main(config_path="configs", config_name="cluster_stages", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from oms_lightning.jobs.cluster_stages import cluster_stages_job  # late: `--help` and config errors answer fast

    cluster_stages_job(cfg)


if __name__ == "__main__":
    check_config_groups(sys.argv[1:], Path(__file__).parent / "configs")
    main()
