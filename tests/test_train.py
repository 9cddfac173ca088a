"""Training: overfit, train.py end to end, resume (step + EMA), experiment configs, DDP, failure paths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, ROOT, run_cli
from oms_lightning.zoo import load_member
from oms_lightning.errors import UserError

SMOKE = ["experiment=digits_smoke"]


def train_cfg(compose, tmp_path, *overrides):
    return compose("train", [*SMOKE, f"paths.checkpoints={tmp_path}", *overrides])


def test_tiny_model_overfits_a_batch(compose):
    from oms_lightning.data import DigitsDataModule
    from oms_lightning.training import module_from_config

    torch.manual_seed(0)
    cfg = compose("train", ["model=tiny", "model.dropout=0.0"])
    module = module_from_config(cfg, "digits", 8, 1)
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(module.net.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))  # the same t and ε every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_train_py_end_to_end_writes_member_and_grid(tmp_path):
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    member = tmp_path / "digits" / "tiny.ckpt"
    assert member.is_file() and (tmp_path / "digits" / "tiny.png").is_file()
    assert (tmp_path / "digits" / "tiny" / "last.ckpt").is_file()
    assert str(member) in r.stdout
    m = load_member(member)
    assert m.name == "tiny" and m.data["image_size"] == 8 and m.meta["global_step"] == 6
    # the member holds the EMA weights, which the training checkpoint stores as its state_dict
    last = torch.load(tmp_path / "digits" / "tiny" / "last.ckpt", weights_only=True)
    for k, v in m.net.state_dict().items():
        assert torch.equal(v, last["state_dict"][f"net.{k}"]), k
    assert any(not torch.equal(last["state_dict"][k], last["current_model_state"][k])
               for k in last["state_dict"]), "EMA and raw weights should differ"


def test_resume_continues_at_saved_step_with_saved_ema(compose, tmp_path):
    from oms_lightning.jobs.train import train

    first = train(train_cfg(compose, tmp_path))
    run_dir = tmp_path / "digits" / "tiny"
    saved = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6

    # Nothing left to train: the restored EMA average becomes the member unchanged.
    again = train(train_cfg(compose, tmp_path, "ckpt_path=last"))
    member = load_member(again["member"])
    for k, v in member.net.state_dict().items():
        assert torch.equal(v, saved["state_dict"][f"net.{k}"]), k

    # Extending the run continues from step 6 (not from 0) with the optimizer state restored.
    longer = train(train_cfg(compose, tmp_path, "ckpt_path=last", "trainer.max_steps=9"))
    assert longer["global_step"] == 9 and first["global_step"] == 6
    resumed = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 9


def test_fresh_start_refuses_to_clobber_an_existing_run(compose, tmp_path):
    from oms_lightning.jobs.train import train

    train(train_cfg(compose, tmp_path))
    with pytest.raises(UserError, match="ckpt_path=last"):
        train(train_cfg(compose, tmp_path))
    assert train(train_cfg(compose, tmp_path, "overwrite=true"))["global_step"] == 6


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_config_composes(compose, experiment):
    from oms_lightning.config import validate_train_config
    from oms_lightning.nets import build_preset

    cfg = compose("train", [f"experiment={experiment}"])
    validate_train_config(cfg)
    with torch.device("meta"):
        build_preset(cfg.model, int(cfg.data.image_size), int(cfg.data.channels))


def test_paper_recipe_is_exact(compose):
    cfg = compose("train", ["experiment=cifar10_paper"])
    assert cfg.data.name == "cifar10" and cfg.model.name == "large"
    assert cfg.data.module.batch_size == 128 and cfg.trainer.max_steps == 800_000
    assert cfg.optim.lr == 2e-4 and cfg.trainer.gradient_clip_val == 1.0 and cfg.ema.decay == 0.9999
    assert cfg.model.dropout == 0.1 and cfg.diffusion.kind == "linear"
    assert (cfg.diffusion.beta_min, cfg.diffusion.beta_max) == (0.1, 20.0)  # β 1e-4 → 0.02 over 1000 steps


# --- failure paths: one clear message, non-zero exit, nothing half-written ---

@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "invalid value optim.lr=-1"),
    ("trainer.max_steps=abc", "invalid value trainer.max_steps='abc'"),
    ("ema.decay=1.5", "invalid value ema.decay=1.5"),
    ("trainer.accelerator=gpu", "CUDA"),
    ("ckpt_path=last", "no checkpoint to resume"),
    ("sampling.solver=nope", "invalid value sampling.solver='nope': unknown solver 'nope'; choose one of: ddim,"),
])
def test_bad_values_are_refused_before_training(compose, tmp_path, override, message):
    from oms_lightning.jobs.train import train

    if override == "trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(train_cfg(compose, tmp_path, override))
    assert not (tmp_path / "digits" / "tiny.ckpt").exists()


# --- the sample grid's solver comes from sampling.solver through the solver registry ---

def tiny_module(compose, *overrides):
    from oms_lightning.training import module_from_config

    return module_from_config(compose("train", ["model=tiny", "sampling.steps=3", *overrides]), "digits", 8, 1)


def count_forwards(module) -> list:
    calls = []
    module.net.register_forward_hook(lambda net, args, out: calls.append(args[1][0].item()))
    return calls


def test_sample_grid_uses_the_configured_solver(compose):
    torch.manual_seed(0)
    modules = {name: tiny_module(compose, f"sampling.solver={name}", *extra) for name, extra in
               [("ddim", []), ("heun", []), ("dpm_solver", ["sampling.order=3"]), ("dpm_solver++", [])]}
    weights = modules["ddim"].state_dict()
    images, nfes = {}, {}
    for name, m in modules.items():
        m.load_state_dict(weights)                    # one untrained net: only the solver differs
        calls = count_forwards(m)
        images[name], nfes[name] = m.sample(4), len(calls)
        assert images[name].shape == (4, 1, 8, 8) and images[name].abs().max() <= 1
    assert nfes == {"ddim": 3, "heun": 6, "dpm_solver": 9, "dpm_solver++": 3}
    assert not torch.allclose(images["ddim"], images["heun"])
    assert not torch.allclose(images["ddim"], images["dpm_solver++"])
    assert torch.equal(modules["heun"].sample(4), images["heun"])          # same noise every grid


def test_default_sample_grid_is_dpm_solver_pp_2m(compose):
    from oms_lightning.diffusion.denoiser import EpsDenoiser
    from oms_lightning.diffusion.seeding import per_sample_noise
    from oms_lightning.diffusion.solvers import dpm_solver_pp
    from oms_lightning.diffusion.spacing import timesteps

    m = tiny_module(compose)
    assert m.sampling["solver"] == "dpm_solver++"
    m.net.eval()
    with torch.no_grad():
        want = dpm_solver_pp(EpsDenoiser(m.net, m.noise_schedule), per_sample_noise((1, 8, 8), range(4), 0),
                             timesteps("logsnr_uniform", 3, m.noise_schedule), m.noise_schedule, order=2)
    assert torch.equal(m.sample(4), want.clamp(-1, 1))


@pytest.mark.parametrize("overrides, message", [
    (["sampling.solver=nope"], r"invalid value sampling.solver='nope': unknown solver 'nope'; choose one of: ddim, "
                               r"ddim_eta1, dpm_solver, dpm_solver\+\+, dpm_solver\+\+3m, heun"),
    (["sampling.solver=dpm_solver_pp"], r"did you mean 'dpm_solver\+\+'"),
    (["sampling.solver=dpm_solver", "sampling.order=4"], "invalid value sampling.order=4: dpm_solver allows 1–3"),
])
def test_bad_sampling_solver_fails_at_construction(compose, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_module(compose, *overrides)


def test_unwritable_checkpoint_folder(compose, tmp_path):
    from oms_lightning.jobs.train import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        train(train_cfg(compose, blocker))


@pytest.mark.parametrize("content, message", [
    (b"garbage, not a zip", "corrupt"),
    ("foreign", "not a Lightning training checkpoint"),
])
def test_corrupt_or_foreign_checkpoint_on_resume(compose, tmp_path, content, message):
    from oms_lightning.jobs.train import train

    bad = tmp_path / "bad.ckpt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(UserError, match=message):
        train(train_cfg(compose, tmp_path, f"ckpt_path={bad}"))


def test_checkpoint_of_another_member_is_refused(compose, tmp_path):
    from oms_lightning.jobs.train import train

    train(train_cfg(compose, tmp_path))
    other = tmp_path / "digits" / "tiny" / "last.ckpt"
    with pytest.raises(UserError, match="belongs to another run"):
        train(train_cfg(compose, tmp_path, "model=small", f"ckpt_path={other}"))


def test_cli_errors_are_one_line_with_exit_code(tmp_path):
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path}", "optim.lr=0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: invalid value optim.lr=0")
    assert "Traceback" not in r.stderr
    r = run_cli("train.py", "model=huge")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unknown model 'huge'; choose one of: large, medium, multistage, small, tiny (configs/model/)"]
    assert not any(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu",
                "trainer.devices=2", "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_member(tmp_path / "digits" / "tiny.ckpt")
    assert m.meta["global_step"] == 6


@pytest.mark.slow
def test_offline_wandb_run_is_resumed_into_the_same_run(tmp_path):
    """Without a key W&B runs offline (no network); the resumed training logs into the same run id."""
    wandb_dir = tmp_path / "wandb"
    common = [*SMOKE, f"paths.checkpoints={tmp_path}", "logger=wandb", f"logger.save_dir={wandb_dir}",
              "hydra.run.dir=" + str(tmp_path / "hydra")]
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no_netrc")}
    first = subprocess.run([sys.executable, "train.py", *common], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "anonymous setting" not in first.stdout + first.stderr   # no deprecation warning on every run
    run_id = (tmp_path / "digits" / "tiny" / "wandb_run_id.txt").read_text().strip()
    runs = list(wandb_dir.rglob(f"offline-run-*-{run_id}"))
    assert runs, list(wandb_dir.rglob("*"))[:20]
    again = subprocess.run([sys.executable, "train.py", *common, "ckpt_path=last", "trainer.max_steps=9"], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list(wandb_dir.rglob(f"offline-run-*-{run_id}"))) == 2  # one folder per session, same run id
    assert set(wandb_dir.rglob("offline-run-*")) == set(wandb_dir.rglob(f"offline-run-*-{run_id}"))


def test_a_run_shorter_than_one_validation_interval_validates_at_its_end(compose):
    from oms_lightning.config import shorten_validation_interval, validate_train_config

    cfg = compose("train", ["trainer.max_steps=50"])
    assert shorten_validation_interval(cfg) and cfg.trainer.val_check_interval == 50
    validate_train_config(cfg)  # the newcomer's first command no longer fails
    longer = compose("train", ["trainer.max_steps=700"])
    assert not shorten_validation_interval(longer)
    with pytest.raises(UserError, match="multiple of"):
        validate_train_config(longer)  # an explicit, inconsistent interval is still refused
