"""Issue 11: a kill never costs a training run or a finished stage, concurrent runs are safe, a normal run prints
each event once. Kills are real processes and SIGKILL; a second filesystem is simulated with another TMPDIR."""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import CONFIGS, ROOT, SMALL, TINY, cli_env, run_cli, write_member
from oms_lightning.errors import UserError

SMOKE = ["experiment=digits_smoke"]


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def staged(folder) -> list:
    """Files under a fake $TMPDIR (torch itself creates an empty inductor cache folder there on import)."""
    return [p for p in folder.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------- 1. kill-safe saves
SAVER = textwrap.dedent("""
    import sys, torch
    from oms_lightning.training.callbacks import AtomicCheckpointIO
    io, target = AtomicCheckpointIO(), sys.argv[1]
    step = 0
    while True:  # big enough that a kill often lands mid-write
        io.save_checkpoint({"step": step, "w": torch.full((1_000_000,), float(step))}, target)
        step += 1
        print(step, flush=True)
""")


def test_a_checkpoint_save_killed_at_any_moment_leaves_the_previous_one_whole(tmp_path):
    target, other_fs = tmp_path / "run" / "last.ckpt", tmp_path / "tmpfs"
    other_fs.mkdir()
    for kill in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env=cli_env(TMPDIR=str(other_fs)))
        for _ in range(2 + kill):  # let it complete a few saves, then kill it in the middle of the next ones
            proc.stdout.readline()
        time.sleep(0.013 * kill)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(target, weights_only=True)  # never torn: the old file or the new one
        assert torch.all(ckpt["w"] == float(ckpt["step"]))
        assert staged(other_fs) == [], "nothing may be staged under $TMPDIR (another filesystem)"
        assert len(list(target.parent.glob(".last.ckpt.*.tmp"))) <= kill + 1  # at most one per interrupted write
    from oms_lightning.io import remove_orphans

    remove_orphans(target.parent, "last.ckpt")
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_next_to_them_not_under_tmpdir(tmp_path):
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path / 'ck'}", TMPDIR=str(other_fs))
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "ck" / "digits" / "tiny" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert staged(other_fs) == []


def test_atomic_files_are_fsynced_and_readable_by_others(tmp_path):
    from oms_lightning.io import atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o044 == 0o044 & ~os.umask(os.umask(0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---------------------------------------------------------------------- 2./3. resume, no-op resume
def test_a_no_op_resume_leaves_the_member_file_and_the_zoo_fingerprint_alone(compose, tmp_path):
    from oms_lightning.jobs.train import train
    from oms_lightning.zoo import Zoo

    cfg = lambda *o: compose("train", [*SMOKE, f"paths.checkpoints={tmp_path}", *o])  # noqa: E731
    train(cfg())
    member = tmp_path / "digits" / "tiny.ckpt"
    before, fp = md5(member), Zoo.load(tmp_path, "digits", ["tiny"]).fingerprint()
    again = train(cfg("ckpt_path=last"))
    assert again["member_unchanged"] and again["steps_run"] == 0
    assert md5(member) == before and Zoo.load(tmp_path, "digits", ["tiny"]).fingerprint() == fp
    longer = train(cfg("ckpt_path=last", "trainer.max_steps=9"))
    assert longer["steps_run"] == 3 and not longer["member_unchanged"] and md5(member) != before


def test_train_refuses_to_replace_a_member_whose_training_folder_is_gone(compose, tmp_path):
    from oms_lightning.jobs.train import train

    write_member(tmp_path, "tiny", TINY)
    before = md5(tmp_path / "digits" / "tiny.ckpt")
    with pytest.raises(UserError, match="already a trained zoo member.*overwrite=true"):
        train(compose("train", [*SMOKE, f"paths.checkpoints={tmp_path}"]))
    assert md5(tmp_path / "digits" / "tiny.ckpt") == before


@pytest.mark.slow
def test_search_resumes_a_member_training_that_was_killed(tmp_path):
    """A search killed while it trains a missing member continues that training on the next run (periodic
    checkpoints), instead of stopping with advice it cannot follow."""
    from hydra import compose, initialize_config_dir

    from oms_lightning.training import ensure_zoo

    steps = ["trainer.max_steps=3000", "checkpoint_every=10", "trainer.val_check_interval=3000",
             "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen([sys.executable, "train.py", "model=tiny", "logger=none", f"paths.checkpoints={tmp_path}",
                             *steps], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    last = tmp_path / "digits" / "tiny" / "last.ckpt"
    wait_for(last.is_file, 240, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 10 <= killed_at < 3000 and not (tmp_path / "digits" / "tiny.ckpt").exists()

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("search", overrides=[f"paths.checkpoints={tmp_path}", "zoo.members=[tiny]", "logger=none",
                                 f"search.zoo_train_steps={killed_at + 20}", "search.zoo_checkpoint_every=10"])
        ensure_zoo(cfg)
    assert torch.load(last, weights_only=True)["global_step"] == killed_at + 20  # continued, not restarted
    assert (tmp_path / "digits" / "tiny.ckpt").is_file()


# ---------------------------------------------------------------------- 4. concurrency
HOLDER = textwrap.dedent("""
    import sys, time
    from oms_lightning.io import file_lock
    with file_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_file_lock_makes_a_second_process_wait_and_a_killed_holder_releases_it(tmp_path):
    from oms_lightning.io import file_lock

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "60"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    waited = []
    killer = subprocess.Popen(["sleep", "1"])
    killer.wait()
    holder.send_signal(signal.SIGKILL)  # the kernel drops a dead process's lock: no stale lock file blocks anyone
    start = time.monotonic()
    with file_lock(lock, waiting=waited.append):
        assert time.monotonic() - start < 30
    holder.wait()
    assert waited == [] or waited[0].startswith("pid ")


def test_run_folders_are_unique_per_process(compose):
    from omegaconf import OmegaConf

    resolved = OmegaConf.create({"dir": "x_${pid:}"})
    assert resolved.dir == f"x_{os.getpid()}"
    for config in ("train", "search", "sample"):
        text = (ROOT / "configs" / f"{config}.yaml").read_text()
        assert "${now:%Y-%m-%d_%H-%M-%S}_${pid:}" in text, config


# ---------------------------------------------------------------------- 6. smaller defects
def test_an_unsafe_pickle_is_refused_as_unsafe_not_with_torchs_advice(tmp_path):
    from oms_lightning.zoo import load_member

    path = tmp_path / "evil.ckpt"
    torch.save({"format": "x", "payload": argparse.Namespace(code="would run on load")}, path)
    with pytest.raises(UserError) as e:
        load_member(path)
    assert "refused as unsafe" in str(e.value) and "weights_only set to False" not in str(e.value)


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path):
    out = tmp_path / "out"
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path}", "optim.lr=0", f"hydra.run.dir={out}")
    assert r.returncode == 2 and not out.exists()


def test_a_normal_training_run_prints_each_event_once_and_no_warning_a_user_cannot_act_on(tmp_path):
    r = run_cli("train.py", *SMOKE, f"paths.checkpoints={tmp_path}", "trainer.log_every_n_steps=50")
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert text.count("GPU available") == 1 and text.count("Trainable params") == 1
    for noise in ("LeafSpec", "flops_per_batch", "litlogger", "logging interval", "anonymous", "Warning"):
        assert noise not in text, noise


def test_a_torn_line_is_reported_once_however_often_the_store_is_read(tmp_path, caplog):
    from oms_lightning.predictor.records import RecordStore

    store = RecordStore(tmp_path / "s.jsonl", "zoo", {"n": 1})
    store.append({"key": "a", "fid": 1.0})
    with open(store.path, "ab") as f:
        f.write(b'{"key": "b", "fi')
    for _ in range(3):
        assert len(RecordStore(store.path, "zoo", {"n": 1})) == 1
    assert caplog.text.count("torn last line") == 1


# ---------------------------------------------------------------------- 5. kill during the search
KILL_AT_EVOLUTION = textwrap.dedent("""
    import os, runpy, signal, sys
    from oms_lightning.search import callback
    callback.SearchCallback.search = lambda self, predictor: os.kill(os.getpid(), signal.SIGKILL)
    sys.argv = ["search.py", *sys.argv[1:]]
    runpy.run_path("search.py", run_name="__main__")
""")


@pytest.mark.slow
def test_a_search_killed_during_evolution_keeps_its_predictor(tmp_path):
    from test_search import run_search, tiny_search_args

    write_member(tmp_path, "tiny", TINY)
    write_member(tmp_path, "small", SMALL, seed=1)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_EVOLUTION, *tiny_search_args(tmp_path), "budget=60"],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "training the predictor" in killed.stdout
    cache = tmp_path / "digits" / "search"
    assert list(cache.glob("predictor-*.ckpt")) and list(cache.glob("predictor-*.json"))
    store = next(cache.glob("records-*.jsonl"))
    lines = store.read_text().count("\n")
    r = run_search(tmp_path, "budget=60")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing predictor" in r.stdout and "training the predictor" not in r.stdout
    assert store.read_text().count("\n") == lines  # the schedule→FID dataset was not regenerated


@pytest.mark.slow
def test_two_searches_on_one_cache_share_the_work_and_keep_their_own_outputs(tmp_path):
    from test_search import search_command

    write_member(tmp_path, "tiny", TINY)
    write_member(tmp_path, "small", SMALL, seed=1)
    # a budget in NFEs of a member: two searches profiling at once on a busy box made 60 ms less than one NFE of tiny
    procs = [subprocess.Popen(search_command(tmp_path, "budget=4xtiny", f"hydra.run.dir={tmp_path}/run{i}"), cwd=ROOT,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert sum("training the predictor" in out for out, _ in outs) == 1  # the other one waited and reused it
    for store in (tmp_path / "digits" / "search").glob("*.jsonl"):
        keys = [json.loads(line)["key"] for line in store.read_text().splitlines()[1:]]
        assert len(keys) == len(set(keys)), f"{store.name}: a schedule was evaluated twice"
    assert all((tmp_path / f"run{i}" / "summary.json").is_file() for i in range(2))
