import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")   # tests never touch the network
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def cli_env(**extra: str) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **extra}


def run_cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python <entry>.py <args>` from the repository root, as a user types it (W&B off, one thread)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def compose():
    """compose(config_name, overrides) → the config Hydra would build for `python <entry>.py <overrides>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(name: str, overrides: list[str] = ()):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides))

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny nets and data: on a shared, busy 2-core machine two OpenMP threads spin-wait on each
    other and made such modules ~20x slower than one thread. Use with `pytestmark = pytest.mark.usefixtures(...)`;
    restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The embedded digits data module, set up once per test session."""
    from oms_lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=128)
    dm.setup("fit")
    return dm


# --- a fake zoo of untrained 8x8 members in the true on-disk format (tests never need trained weights) ---
DATA = {"name": "digits", "image_size": 8, "channels": 1}
TINY = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0}
SMALL = {**TINY, "channels": 16}
BIG = {**TINY, "channels": 128}  # (128/8)^2 = 256x the FLOPs of TINY


def write_member(root, name, net_kwargs=SMALL, data=DATA, noise=None, seed=0, step=100, data_name="digits"):
    from oms_lightning.zoo import save_member
    from oms_lightning.diffusion.noise_schedule import VPSchedule
    from oms_lightning.nets import UNet

    torch.manual_seed(seed)
    net = UNet(image_channels=data["channels"], image_size=data["image_size"], **net_kwargs)
    return save_member(root / data_name / f"{name}.ckpt", name=name, net_kwargs=net_kwargs,
                       noise=noise or VPSchedule().to_dict(), data=data, state_dict=net.state_dict(),
                       meta={"global_step": step})


# --- model schedules shared by test_schedule.py, test_schedule_file.py and test_schedule_slots.py ---
SCHEDULE_ZOO = ["large", "small", "tiny"]          # sorted, as a zoo lists its members
SCHEDULE_TIMES = [1.0, 0.5, 0.2, 0.001]


@pytest.fixture
def sched():
    from oms_lightning.schedule import ModelSchedule

    return ModelSchedule.from_times_and_members(
        SCHEDULE_TIMES, [["small", "small"], ["large"], ["tiny", "large", "large"]], meta={"fid": 3.5})


def random_schedule(rng):
    from oms_lightning.schedule import ModelSchedule

    k = rng.randint(1, 8)
    ts = sorted((rng.uniform(1e-3, 1.0) for _ in range(k - 1)), reverse=True)
    times = [1.0] + ts + [1e-3]
    solver = rng.choice(["dpm_solver", "dpm_solver++", "ddim", "heun"])
    n = {"dpm_solver": None, "dpm_solver++": 1, "ddim": 1, "heun": 2}[solver]
    members = [[rng.choice(SCHEDULE_ZOO) for _ in range(n or rng.randint(1, 3))] for _ in range(k)]
    return ModelSchedule.from_times_and_members(times, members, solver)


def corrected_schedule(coefficients=((0.1,), (0.0,), (-0.2,))):
    """(plain, the same with IIA coefficients) of a 3-step DDIM schedule."""
    from oms_lightning.schedule import ModelSchedule

    plain = ModelSchedule.from_times_and_members([1.0, 0.6, 0.3, 0.01], ["a", "b", "a"], solver="ddim")
    return plain, plain.with_correction("eps", coefficients, weights="w123")
