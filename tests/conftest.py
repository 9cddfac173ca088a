import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")   # tests never touch the network
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def compose():
    """compose(config_name, overrides) → the config Hydra would build for `python <entry>.py <overrides>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(name: str, overrides: list[str] = ()):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides))

    return _compose
