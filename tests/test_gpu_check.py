"""benchmarks/gpu_check.py, the one-shot GPU readiness check, at --tiny sizes on the CPU: it must keep running between
GPU loans. Every section prints measured numbers and the RESULTS.md block closes the output; nothing is downloaded."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NUM = r"[-+]?\d+(?:\.\d+)?"


def offline_env(tmp_path):
    """Any download attempt fails at once: proxies point at a closed port, torch hub at an empty folder."""
    dead = "http://127.0.0.1:9"
    return {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
            "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "", "no_proxy": "", "HF_HUB_OFFLINE": "1",
            "TORCH_HOME": str(tmp_path / "torch_home")}


def run_check(tmp_path, *args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_gpu_check_runs_on_cpu_and_prints_every_section(tmp_path):
    out_dir = tmp_path / "out"
    # digits forces the search's shape (auto picks by the FID probe's speed); the CIFAR FID path still runs (probe)
    r = run_check(tmp_path, "--tiny", "--device", "cpu", "--out", str(out_dir), "--search-data", "digits")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    out = r.stdout

    # a. training throughput: fp32 eager vs fast path, through benchmarks/train_throughput.py's functions
    assert re.search(rf"^\| tiny \| 0\.16M \| \d+ \| \d+ \| {NUM}x \|$", out, re.M), out[:3000]
    # b. latency profile with spreads, then the cost-model error of random schedules
    for member in ("micro", "mini"):
        assert re.search(rf"^\| {member} \| {NUM}M \| {NUM} \| {NUM} % \|$", out, re.M)
    assert re.search(rf"worst spread {NUM} % \((quiet|noisy)\)", out)
    assert re.search(rf"cost-model error .* over \d+ schedules: mean {NUM} %, median {NUM} %, max {NUM} %", out)
    # c. the CIFAR FID path (random PNGs, random-weight Inception) and a search through search.py's pipeline
    assert re.search(rf"reference statistics of \d+ images in {NUM} s; one 2048-d FID of 4 samples .* in {NUM} s",
                     out)
    assert re.search(rf"a CIFAR-shaped search here computes ≈ \d+ FIDs ≈ {NUM} s", out)
    assert "DIGITS-SHAPED (8x8x1) members ['micro', 'mini'], not CIFAR-shaped (--search-data digits)" in out
    assert re.search(rf"search result: budget {NUM} ms, winner .* verdict (tie|better|worse); wall {NUM} ms", out)
    assert re.search(rf"search wall time {NUM} s, [1-9]\d* FIDs computed", out)
    for section in ("train", "latency", "search"):
        assert re.search(rf"section {section} wall time {NUM} s", out)

    # d. the RESULTS.md block: device, torch, the command, every section's numbers; also written to the run folder
    block = out.split("RESULTS.md block", 1)[1]
    assert "## GPU check: CPU only" in block and f"torch {torch.__version__}" in block
    assert "Command: `python benchmarks/gpu_check.py --tiny --device cpu --out" in block
    assert re.search(rf"\*\*{NUM} s in all\*\* \(limit 240 s", block)
    assert "| preset | params | fp32 eager img/s | fast img/s | speed-up |" in block
    assert re.search(rf"\| 4 \| (micro|mini) {NUM} ms .* \| mean \*\*{NUM} %\*\*, median {NUM} %, max {NUM} %", block)
    assert re.search(rf"one FID of 4 samples \*\*{NUM} s\*\*", block)
    assert re.search(rf"^\| {NUM} \| .* \| (tie|better|worse).* \| \d+ \| {NUM} \|$", block, re.M)

    runs = list(out_dir.glob("run-*"))
    assert len(runs) == 1
    run = runs[0]
    assert (run / "RESULTS_gpu_check.md").read_text().strip() in out
    # the members, the private hub with the random Inception and the search's files all live in the run folder
    assert (run / "checkpoints" / "image_folder" / "micro.ckpt").is_file()
    assert (run / "checkpoints" / "digits" / "mini.ckpt").is_file()
    assert next((run / "torch_hub" / "checkpoints").glob("weights-inception-*.pth")).is_file()
    assert (run / "search_digits" / "summary.json").is_file()
    assert not (tmp_path / "torch_home").exists()  # the real torch hub cache was never consulted


def test_refuses_an_out_folder_inside_the_repository_checkpoints(tmp_path):
    r = run_check(tmp_path, "--tiny", "--device", "cpu", "--out", str(ROOT / "checkpoints" / "gpu_check"), timeout=120)
    assert r.returncode == 2 and "inside the repository's checkpoints/" in r.stderr
    assert not (ROOT / "checkpoints" / "gpu_check").exists()


def test_unknown_section_is_refused(tmp_path):
    r = run_check(tmp_path, "--tiny", "--sections", "train,fid", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "--sections" in r.stderr
