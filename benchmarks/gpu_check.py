"""One-shot GPU readiness check: run it when a GPU is lent (one GPU, no network, < 8 minutes).

    benchmarks/gpu_check.sh                              # = .venv/bin/python benchmarks/gpu_check.py --device auto
    python benchmarks/gpu_check.py --device cuda --out /tmp/gpu_check
    python benchmarks/gpu_check.py --tiny --device cpu   # tiny sizes, ~1-2 min on 2 CPU cores (the test suite's run)

Everything uses random weights and random data, so nothing is downloaded and nothing in the repository is touched
(all files go to a fresh folder under --out, by default a temporary one). Sections, each printing measured numbers
and its own wall time:

a. training throughput, fp32 eager against the fast path (bf16 autocast + channels_last + torch.compile where
   supported), for the 35.7M CIFAR-10 `large` U-Net on random 32x32 data — the functions of
   `benchmarks/train_throughput.py` (--tiny: the 8x8 digits `tiny` preset, a few steps, no torch.compile);
b. a zoo of CIFAR-shaped (32x32x3) random-weight members (the tiny/small/medium/large presets; --tiny: two
   micro nets) written with `save_member`: each member's profiled latency and spread, then the cost model
   (Σ profiled latencies) against measured wall time for random schedules of every search space;
c. a tiny end-to-end `search.py` run (`oms_lightning.jobs.search.run` on a config composed from `configs/`).
   CIFAR-10 itself needs a download, so CIFAR-shaped data is a folder of random 32x32 RGB PNGs
   (`data=image_folder`); the FID Inception's weights need a download too, so a random-weight Inception of the
   real architecture is written to a private torch hub folder and used through the package's own code path. A
   probe first times that path (reference statistics, one 2048-d FID). Each such FID solves a 2048x2048
   non-symmetric eigenproblem (seconds; tens of seconds on 2 busy CPU cores) and a search computes ~100, so with
   `--search-data auto` (the default) the search runs on the CIFAR-shaped members when the probe says their FIDs
   fit the time left, else on digits-shaped random members (128-d digits-classifier FIDs: milliseconds), and says
   which and why. `--search-data cifar|digits` forces one. FIDs of random weights are meaningless either way:
   the section checks that the whole pipeline runs on the device and what it costs there.

At the end a markdown block in the style of `benchmarks/RESULTS.md` (device, torch, the command, every
section's numbers) is printed and written to <run folder>/RESULTS_gpu_check.md, ready to paste.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("WANDB_MODE", "disabled")  # logger=none anyway: never touch the network
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import train_throughput  # noqa: E402  (benchmarks/train_throughput.py: build, images_per_second, SHAPES)

CIFAR = {"name": "image_folder", "image_size": 32, "channels": 3}   # random 32x32 RGB PNGs (no download)
DIGITS = {"name": "digits", "image_size": 8, "channels": 1}          # sklearn's bundled digits (no download)
TIME_LIMIT_S = 480                  # the full run on one GPU must stay under 8 minutes

# --tiny members: random-weight micro U-Nets, small enough that everything finishes in ~1-2 min on 2 CPU cores
MICRO = {"channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "dropout": 0.0}
TINY_MEMBERS = {"micro": {**MICRO, "channels": 8}, "mini": {**MICRO, "channels": 16}}
FULL_MEMBERS = ("tiny", "small", "medium", "large")   # configs/model/<name>.yaml at 32x32 (large: 35.7M)

COMMON_SEARCH = ["search.evaluation.seeds=[100,101]", "search.rerank.top_per_space=1"]
SIZES = {
    "full": {
        "train": {"data": "cifar10", "models": ["large"], "batch": 128, "steps": 30, "warmup": 8},
        "profile": {"batch": 256, "warmup": 3, "repeats": 10, "rounds": 5, "attempts": 2},
        "schedules": 20, "space_size": 30, "timing_rounds": 3, "images": 1000, "probe_n": 128,
        "search": {
            # A 2048-d Inception FID needs the eigenvalues of a 2048x2048 non-symmetric matrix (torchmetrics), which
            # costs seconds, so this search is sized by its FID count: ≈ 40 records, ≤ 72 baselines, ≈ 25 more.
            "cifar": {"members": ["small", "large"], "overrides": [
                "search.space.size=12", "search.dataset.n_random=24", "search.dataset.anchor_nfes=[6]",
                "search.dataset.n_samples=128", "search.dataset.batch_size=256", "search.predictor.epochs=30",
                "search.evolution.generations=15", "search.evolution.population=16", "search.evolution.children=16",
                "search.rerank.n_samples=128", "search.rerank.top_k=3", "search.evaluation.n=256",
                "search.evaluation.timing_rounds=2", "default_budget_nfe=4", *COMMON_SEARCH]},
            "digits": {"members": ["small", "large"], "overrides": [
                "search.space.size=12", "search.dataset.n_random=48", "search.dataset.anchor_nfes=[4,8]",
                "search.dataset.n_samples=256", "search.dataset.batch_size=256", "search.predictor.epochs=30",
                "search.evolution.generations=15", "search.evolution.population=16", "search.evolution.children=16",
                "search.rerank.n_samples=256", "search.rerank.top_k=3", "search.evaluation.n=512",
                "search.evaluation.timing_rounds=2", *COMMON_SEARCH]},
        },
    },
    "tiny": {
        "train": {"data": "digits", "models": ["tiny"], "batch": 32, "steps": 3, "warmup": 1},
        "profile": {"batch": 4, "warmup": 2, "repeats": 6, "rounds": 3, "attempts": 1},
        "schedules": 6, "space_size": 6, "timing_rounds": 2, "images": 16, "probe_n": 4,
        "search": {
            "cifar": {"members": ["micro", "mini"], "overrides": [
                "search.space.size=4", "search.space.kind=dpm_solver", "search.dataset.n_random=4",
                "search.dataset.anchor_nfes=[2]", "search.dataset.n_samples=4", "search.dataset.batch_size=4",
                "search.predictor.epochs=2", "search.evolution.generations=2", "search.evolution.population=4",
                "search.evolution.children=4", "search.evolution.starts=1", "search.rerank.n_samples=4",
                "search.rerank.top_k=1", "search.evaluation.n=4", "search.evaluation.timing_rounds=1",
                *COMMON_SEARCH]},
            "digits": {"members": ["micro", "mini"], "overrides": [
                "search.space.size=4", "search.dataset.n_random=12", "search.dataset.anchor_nfes=[2,4]",
                "search.dataset.n_samples=32", "search.dataset.batch_size=32", "search.predictor.epochs=3",
                "search.evolution.generations=3", "search.evolution.population=8", "search.evolution.children=8",
                "search.rerank.n_samples=32", "search.rerank.top_k=2", "search.evaluation.n=32",
                "search.evaluation.timing_rounds=1", *COMMON_SEARCH]},
        },
    },
}
SEARCH_MARGIN_S = 30    # kept free after the search's estimated FID time when --search-data auto chooses
FID_OVERHEAD = 1.5      # a search's FID also samples, and its evaluation adds KID/pixel FD: measured 1.5-2x the probe


def say(msg: str = "") -> None:
    print(msg, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    from oms_lightning.zoo import device_description

    cpu = f"{os.cpu_count()} CPU cores"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), CUDA "
                f"{torch.version.cuda}, {cpu}")
    return f"{device_description(device)}, {cpu}, no GPU used"


# --------------------------------------------------------------------------------------------------- a. training
def section_train(device: torch.device, size: dict, compile_: bool) -> dict:
    """fp32 eager vs fast path with train_throughput's own build() and images_per_second()."""
    # train_throughput.build() reads torch.compile's switch from the module-level `args` of its CLI
    train_throughput.args = argparse.Namespace(compile=compile_)
    channels, image = train_throughput.SHAPES[size["data"]]
    fast_desc = "bf16 autocast + channels_last" + (" + torch.compile" if compile_ else "")
    say(f"## a. training throughput: {size['data']} presets {size['models']}, random {image}x{image}x{channels} "
        f"data, batch {size['batch']}, {size['steps']} timed steps after {size['warmup']} warm-up; fast = {fast_desc}")
    say("| preset | params | fp32 eager img/s | fast img/s | speed-up |\n|---|---:|---:|---:|---:|")
    rows = []
    for model in size["models"]:
        rates, params = {}, 0
        for fast in (False, True):
            torch.manual_seed(0)
            module = train_throughput.build(model, size["data"], fast, device)
            params = module.num_parameters()
            batch = torch.randn(size["batch"], channels, image, image, device=device)
            if fast:
                batch = batch.contiguous(memory_format=torch.channels_last)
            rates[fast] = train_throughput.images_per_second(module, batch, fast, size["steps"], size["warmup"])
            del module, batch
            _free(device)
        row = {"preset": model, "params_m": params / 1e6, "fp32": rates[False], "fast": rates[True],
               "speedup": rates[True] / rates[False]}
        rows.append(row)
        say(f"| {model} | {row['params_m']:.2f}M | {row['fp32']:.0f} | {row['fast']:.0f} | {row['speedup']:.2f}x |")
    return {"rows": rows, "fast_desc": fast_desc, "data": size["data"], "batch": size["batch"],
            "steps": size["steps"], "warmup": size["warmup"], "shape": f"{image}x{image}x{channels}"}


def _free(device: torch.device) -> None:
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # drop compiled graphs (and the memory they pin) between models
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- zoos
def member_specs(tiny: bool, data: dict) -> dict[str, dict]:
    """Member name → UNet kwargs (dropout included, as train.py stores them): the model presets at this image size,
    or with --tiny the two micro nets."""
    if tiny:
        return TINY_MEMBERS
    from oms_lightning.nets import preset_for

    specs = {}
    for name in FULL_MEMBERS:
        preset = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
        specs[name] = {**preset_for(preset, data["image_size"]), "dropout": float(preset.dropout)}
    return specs


def write_zoo(checkpoints: Path, specs: dict[str, dict], data: dict) -> None:
    """Random-weight members in the true on-disk format (what train.py writes), seeded per member, at
    `<checkpoints>/<data name>/<member>.ckpt`; the noise schedule is train.py's default."""
    from oms_lightning.zoo import save_member
    from oms_lightning.diffusion.noise_schedule import VPSchedule
    from oms_lightning.nets import UNet

    noise = VPSchedule.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train.yaml").diffusion))
    for i, (name, kwargs) in enumerate(specs.items()):
        path = checkpoints / data["name"] / f"{name}.ckpt"
        if path.is_file():
            continue
        torch.manual_seed(i)
        net = UNet(image_channels=data["channels"], image_size=data["image_size"], **kwargs)
        save_member(path, name=name, net_kwargs=kwargs, noise=noise.to_dict(), data=data, state_dict=net.state_dict(),
                    meta={"global_step": 0, "note": "random weights (benchmarks/gpu_check.py)"})


# --------------------------------------------------------------------------------------------------- b. latency
def section_latency(device: torch.device, size: dict, checkpoints: Path, tiny: bool) -> dict:
    from oms_lightning.search.space import make_spaces, random_schedules
    from oms_lightning.zoo import MAX_SPREAD, Zoo, cost_model_error, load_or_profile, time_schedules

    specs = member_specs(tiny, CIFAR)
    write_zoo(checkpoints, specs, CIFAR)
    zoo = Zoo.load(checkpoints, CIFAR["name"], names=list(specs), device=device)
    p = size["profile"]
    # search.yaml's paths.cache/latency.json: a search on this very zoo and batch size reuses the profile
    profile = load_or_profile(zoo, checkpoints / CIFAR["name"] / "search" / "latency.json", batch_size=p["batch"],
                              device=device, max_spread=MAX_SPREAD, attempts=p["attempts"], warmup=p["warmup"],
                              repeats=p["repeats"], rounds=p["rounds"])
    params = {n: zoo.member(n).num_parameters / 1e6 for n in zoo.names}
    say(f"## b. latency profile: CIFAR-shaped (32x32x3) random-weight zoo {list(zoo.names)}, batch {p['batch']}, "
        f"{p['rounds']} interleaved rounds (spread = (p90-p10)/median across rounds, limit {100 * MAX_SPREAD:.0f} %)")
    say("| member | params | latency ms per batch | spread |\n|---|---:|---:|---:|")
    by_cost = sorted(zoo.names, key=lambda n: -profile.latency[n])
    for n in by_cost:
        say(f"| {n} | {params[n]:.2f}M | {1000 * profile.latency[n]:.2f} | {100 * profile.spread.get(n, 0):.1f} % |")
    say(f"worst spread {100 * profile.worst_spread:.1f} % ({'noisy' if profile.noisy else 'quiet'})")

    spaces = make_spaces("all", zoo.names, zoo.noise_schedule, size["space_size"])
    per_space = -(-size["schedules"] // len(spaces))
    schedules = []
    for i, space in enumerate(spaces):
        schedules += random_schedules(space, per_space, seed=i, null_prob=0.6)
    walls = time_schedules(zoo, schedules, p["batch"], rounds=size["timing_rounds"])
    say(f"\ncost model (Σ profiled latencies) vs wall time, {len(schedules)} random schedules ({per_space} in each "
        f"of the {len(spaces)} spaces of kind=all, size {size['space_size']}, null prob 0.6), one batch of "
        f"{p['batch']}, {size['timing_rounds']} interleaved rounds:")
    say("| schedule | NFE | predicted ms | measured ms | error |\n|---|---:|---:|---:|---:|")
    errors = []
    for s, w in zip(schedules, walls):
        cost = profile.cost(s)
        errors.append(cost_model_error(cost, w["wall_seconds"]))
        say(f"| {md(s.compact().split(' | ')[0][:60])} | {s.nfe} | {1000 * cost:.1f} | "
            f"{1000 * w['wall_seconds']:.1f} | {100 * errors[-1]:+.1f} % |")
    absolute = [abs(e) for e in errors]
    stats = {"mean": statistics.mean(absolute), "median": statistics.median(absolute), "max": max(absolute),
             "signed_median": statistics.median(errors), "n": len(errors)}
    say(f"cost-model error |predicted - measured| / measured over {stats['n']} schedules: mean "
        f"{100 * stats['mean']:.1f} %, median {100 * stats['median']:.1f} %, max {100 * stats['max']:.1f} % "
        f"(signed median {100 * stats['signed_median']:+.1f} %)")
    return {"members": by_cost, "params": params, "latency": dict(profile.latency), "spread": dict(profile.spread),
            "batch": p["batch"], "worst_spread": profile.worst_spread, "noisy": profile.noisy, "error": stats,
            "space_size": size["space_size"], "rounds": size["timing_rounds"]}


# --------------------------------------------------------------------------------------------------- c. search
def write_random_images(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def install_random_inception(hub_dir: Path) -> Path:
    """A random-weight FID Inception (torch-fidelity's architecture, He-initialised convolutions, identity
    batch-norm statistics) saved where `oms_lightning.metrics.inception_weights_file` looks for the real weights,
    with torch.hub pointed at `hub_dir` for this process only. The real weights need a download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from oms_lightning.metrics import INCEPTION_WEIGHTS_FILE

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # builds the architecture without any weights file
            return None

    torch.hub.set_dir(str(hub_dir))
    path = hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
                m.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


def prepare_cifar_search_data(run: Path, size: dict) -> Path:
    write_random_images(run / "images", size["images"])
    return install_random_inception(run / "torch_hub")


def fid_probe(device: torch.device, size: dict, run: Path, tiny: bool) -> dict:
    """The CIFAR FID path on this device, as the search builds it: image_folder data module on the random PNGs,
    FIDEvaluator with the (random-weight) Inception, samples of the cheapest CIFAR-shaped member. Its time per FID
    (at the search's sample count, since the covariance's rank changes the eigensolver's work) sizes the search."""
    from oms_lightning.data import ImageFolderDataModule
    from oms_lightning.metrics import FIDEvaluator
    from oms_lightning.sampling import generate
    from oms_lightning.samplers import single_member_schedule
    from oms_lightning.zoo import Zoo

    weights = prepare_cifar_search_data(run, size)
    checkpoints = run / "checkpoints"
    specs = member_specs(tiny, CIFAR)
    write_zoo(checkpoints, specs, CIFAR)
    cheapest = list(specs)[0]
    zoo = Zoo.load(checkpoints, CIFAR["name"], names=[cheapest], device=device)
    dm = ImageFolderDataModule(root=str(run / "images"), image_size=32, channels=3, num_workers=0, val_fraction=0.2)
    t0 = time.perf_counter()
    evaluator = FIDEvaluator("inception", dm, cache_dir=checkpoints / CIFAR["name"], device=device)
    synchronize(device)
    reference_s = time.perf_counter() - t0
    n = size["probe_n"]
    samples = generate(zoo, single_member_schedule(cheapest, "dpm_solver++", 10, zoo.noise_schedule), n,
                       batch_size=min(n, 256))
    t0 = time.perf_counter()
    value = evaluator.fid(samples, seed=0).value
    synchronize(device)
    fid_s = time.perf_counter() - t0
    say(f"FID probe (the CIFAR path: data=image_folder on {size['images']} random PNGs, random-weight Inception "
        f"{weights}): reference statistics of {evaluator.ref_n} images in {reference_s:.1f} s; one 2048-d FID of "
        f"{n} samples of {cheapest!r} (DPM-Solver++, 10 NFE) in {fid_s:.2f} s; FID {value:.2f} (meaningless: "
        f"random weights)")
    return {"reference_s": reference_s, "reference_n": evaluator.ref_n, "fid_s": fid_s, "n": n, "member": cheapest,
            "fid": value}


def search_config(device: torch.device, size: dict, run: Path, data: str):
    """(overrides, composed search.yaml config) of the search on `data` ("cifar" or "digits")."""
    from hydra import compose, initialize_config_dir

    if data == "cifar":
        data_args = [f"data={CIFAR['name']}", f"data.module.root={run / 'images'}", "data.image_size=32",
                     "data.channels=3", "data.module.num_workers=0", "data.module.val_fraction=0.2"]
    else:
        data_args = ["data=digits"]
    spec = size["search"][data]
    overrides = [*data_args, "logger=none", f"device={device}", f"paths.checkpoints={run / 'checkpoints'}",
                 f"paths.run_dir={run / ('search_' + data)}", f"zoo.members=[{','.join(spec['members'])}]",
                 "zoo.train_missing=false", f"profile.batch_size={size['profile']['batch']}", *spec["overrides"]]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return overrides, compose(config_name="search", overrides=overrides)


def estimate_fids(cfg, latency: dict[str, float] | None) -> int:
    """About how many FIDs the search on `cfg` computes: its records (random schedules and anchors), every
    single-member baseline within the budget (from `latency` when known, else 2 t_end regimes each), the re-rank
    candidates and the ablation, and both contenders on the evaluation seeds with a few bisection steps."""
    from oms_lightning.diffusion.noise_schedule import VPSchedule
    from oms_lightning.samplers import single_member_baselines
    from oms_lightning.search.space import make_spaces
    from oms_lightning.samplers import space_anchors

    s = cfg.search
    members = tuple(sorted(cfg.zoo.members))
    noise = VPSchedule.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train.yaml").diffusion))
    spaces = make_spaces(str(s.space.kind), members, noise, int(s.space.size))
    records = -(-int(s.dataset.n_random) // len(spaces)) * len(spaces)
    records += sum(len(space_anchors(sp, list(s.dataset.anchor_nfes))) for sp in spaces)
    if latency and set(members) <= set(latency):
        lat = {m: latency[m] for m in members}
        budget = cfg.default_budget_nfe * max(lat.values())
        baselines = len(single_member_baselines(members, noise, lat, budget, nfes=s.evaluation.baseline_nfes))
    else:
        baselines = 2 * 24 * len(members)   # 6 samplers x 4 spacings x 2 t_end regimes per member
    rerank = int(s.rerank.top_k) + int(s.rerank.top_per_space) * len(spaces) + 1 + len(members)
    return records + baselines + rerank + len(s.evaluation.seeds) * 6


def count_fids(cache: Path) -> int:
    """FIDs the search computed: one line per schedule in its record stores (dataset, re-rank, evaluation seeds)."""
    return sum(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in cache.glob("*.jsonl"))


def section_search(device: torch.device, size: dict, run: Path, tiny: bool, choice: str, latency: dict | None,
                   seconds_left: float, run_probe: bool = True) -> dict:
    from oms_lightning.jobs.search import run as run_search

    say("## c. tiny end-to-end search (search.py's pipeline) on random-weight members")
    probe = fid_probe(device, size, run, tiny) if run_probe or choice != "digits" else None
    data, reason, estimate = choice, f"--search-data {choice}", {}
    if probe:
        overrides, cfg = search_config(device, size, run, "cifar")
        estimate["fids"] = estimate_fids(cfg, latency)
        estimate["seconds"] = estimate["fids"] * probe["fid_s"] * FID_OVERHEAD
        left = seconds_left - (probe["reference_s"] + probe["fid_s"]) - SEARCH_MARGIN_S
        say(f"a CIFAR-shaped search here computes ≈ {estimate['fids']} FIDs ≈ {estimate['seconds']:.0f} s (the "
            f"probe's {probe['fid_s']:.2f} s per FID x {FID_OVERHEAD} for sampling and the other metrics); "
            f"{max(left, 0):.0f} s of the time limit are left for it")
        if choice == "auto":
            data = "cifar" if estimate["seconds"] <= left else "digits"
            reason = ("it fits the time limit" if data == "cifar" else
                      f"≈ {estimate['seconds']:.0f} s of FIDs do not fit the {max(left, 0):.0f} s left (the CIFAR "
                      f"FID path itself ran in the probe; force it with --search-data cifar)")
    spec = CIFAR if data == "cifar" else DIGITS
    members = list(size["search"][data]["members"])
    write_zoo(run / "checkpoints", {m: member_specs(tiny, spec)[m] for m in members}, spec)
    if data == "cifar":
        say(f"search on CIFAR-shaped (32x32x3) members {members} ({reason}): {size['images']} random PNGs "
            f"(data=image_folder), random-weight Inception features; FIDs are meaningless")
    else:
        overrides, cfg = search_config(device, size, run, "digits")
        say(f"search on DIGITS-SHAPED (8x8x1) members {members}, not CIFAR-shaped ({reason}): the bundled digits, "
            f"digits-classifier features (milliseconds per FID); FIDs are meaningless")
    say(f"search.py overrides: {' '.join(overrides)}")
    start = time.perf_counter()
    summaries = run_search(cfg)
    seconds = time.perf_counter() - start
    fids = count_fids(Path(cfg.paths.cache))
    rows = []
    for s in summaries:
        row = {"budget": s["budget"], "schedule": s["schedule"], "cost": s["cost"], "nfe": s["nfe"],
               "fid": s["fid_mean"], "baseline": s["baseline_schedule"], "baseline_fid": s["baseline_fid_mean"],
               "verdict": s["verdict"], "is_baseline": bool(s.get("winner_is_baseline")),
               "wall_ms": 1000 * s["wall_seconds"]["searched"], "error": s["cost_model_error"]["searched"],
               "baseline_wall_ms": 1000 * s["wall_seconds"]["baseline"],
               "baseline_error": s["cost_model_error"]["baseline"],
               "n_records": s["n_records"], "tau": s["kendall_tau"]}
        rows.append(row)
        say(f"search result: budget {row['budget']:.1f} ms, winner {row['schedule']} (cost {row['cost']:.1f} ms, "
            f"NFE {row['nfe']}, FID {row['fid']:.2f}), baseline {row['baseline']} (FID {row['baseline_fid']:.2f}), "
            f"verdict {row['verdict']}; wall {row['wall_ms']:.1f} ms per batch (cost-model error "
            f"{100 * row['error']:+.1f} %), {row['n_records']} records, predictor tau {row['tau']:.3f}")
    say(f"search wall time {seconds:.1f} s, {fids} FIDs computed ({seconds / max(fids, 1):.2f} s per scored "
        f"schedule, sampling included)")
    return {"probe": probe, "estimate": estimate, "reason": reason, "rows": rows, "seconds": seconds, "fids": fids,
            "overrides": overrides, "members": members, "data": data, "images": size["images"]}


# --------------------------------------------------------------------------------------------------- report
def md(text) -> str:
    """Table-cell text: a schedule's own separators must not split a markdown row."""
    return str(text).replace("|", "\\|")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if ROOT in script.parents else script
    return "python " + " ".join(shlex.quote(a) for a in [str(shown), *sys.argv[1:]])


def results_block(args, device: torch.device, results: dict, walls: dict, total: float, limit: float) -> str:
    today = dt.date.today().isoformat()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only"
    lines = [f"## GPU check: {gpu} ({today}{', --tiny' if args.tiny else ''})", "",
             f"Machine: **{machine_description(device)}**, torch {torch.__version__}, Python "
             f"{platform.python_version()}. Command: `{command_line()}` — **{total:.0f} s in all** (limit "
             f"{limit:.0f} s: {'within' if total <= limit else 'OVER'}; "
             + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + "). Random weights and random data "
             "throughout: these are speeds, spreads and cost-model errors, not quality.", ""]
    if "train" in results:
        t = results["train"]
        lines += [f"**Training fast path** (a; random {t['shape']} data, batch {t['batch']}, {t['steps']} timed "
                  f"steps after {t['warmup']} warm-up; fast = {t['fast_desc']}; the functions of "
                  f"`benchmarks/train_throughput.py`):", "",
                  "| preset | params | fp32 eager img/s | fast img/s | speed-up |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['params_m']:.2f}M | {r['fp32']:.0f} | {r['fast']:.0f} | "
                  f"**{r['speedup']:.2f}x** |" for r in t["rows"]]
        lines.append("")
    if "latency" in results:
        b = results["latency"]
        e = b["error"]
        lat = ", ".join(f"{n} {1000 * b['latency'][n]:.2f} ms ({100 * b['spread'].get(n, 0):.1f} %)"
                        for n in b["members"])
        lines += [f"**Latency profile and cost model** (b; CIFAR-shaped random-weight zoo, interleaved rounds; "
                  f"worst spread {100 * b['worst_spread']:.1f} %, {'noisy' if b['noisy'] else 'quiet'}):", "",
                  f"| batch | profiled latency per batch (spread across rounds) | cost-model error, {e['n']} random "
                  f"schedules (kind=all, size {b['space_size']}) |", "|---:|---|---|",
                  f"| {b['batch']} | {lat} | mean **{100 * e['mean']:.1f} %**, median {100 * e['median']:.1f} %, "
                  f"max {100 * e['max']:.1f} % (signed median {100 * e['signed_median']:+.1f} %) |", ""]
    if "search" in results:
        c = results["search"]
        pr = c["probe"]
        if pr:
            lines += [f"**FID probe** (c; the CIFAR path: `data=image_folder` on {c['images']} random 32x32 PNGs, "
                      f"random-weight Inception, 2048-d): reference statistics of {pr['reference_n']} images "
                      f"{pr['reference_s']:.1f} s; one FID of {pr['n']} samples **{pr['fid_s']:.2f} s**; a "
                      f"CIFAR-shaped search here: ≈ {c['estimate']['fids']} FIDs ≈ "
                      f"{c['estimate']['seconds']:.0f} s).", ""]
        shape = ("CIFAR-shaped, random 32x32 PNGs as `data=image_folder`, random-weight Inception features"
                 if c["data"] == "cifar" else "**digits-shaped (8x8x1), not CIFAR-shaped**, digits-classifier features")
        lines += [f"**Tiny end-to-end search** (c; `search.py`'s pipeline on random-weight members {c['members']}, "
                  f"{shape}, because {c['reason']}: FIDs meaningless; {c['seconds']:.0f} s, {c['fids']} FIDs). "
                  f"Overrides: "
                  f"`{' '.join(c['overrides'])}`", "",
                  "| budget ms | searched schedule | cost ms | FID | best single sampler | FID | verdict | "
                  "wall ms searched / single (cost-model error) | records | τ |",
                  "|---:|---|---:|---:|---|---:|---|---:|---:|---:|"]
        lines += [f"| {r['budget']:.1f} | {md(r['schedule'])} | {r['cost']:.1f} | {r['fid']:.2f} | {md(r['baseline'])} "
                  f"| {r['baseline_fid']:.2f} | {r['verdict']}{' (the baseline itself)' if r['is_baseline'] else ''} | "
                  f"{r['wall_ms']:.1f} / {r['baseline_wall_ms']:.1f} ({100 * r['error']:+.0f} % / "
                  f"{100 * r['baseline_error']:+.0f} %) | {r['n_records']} | {r['tau']:.3f} |" for r in c["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test suite's run, ~1-2 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for members, caches and results; a fresh run-* folder is made inside it (default: "
                        "<tmp>/oms_gpu_check). Never inside the repository's checkpoints/")
    p.add_argument("--sections", default="train,latency,search", help="comma-separated subset of train,latency,search")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the fast path of a (default: on for CUDA, off on CPU and with --tiny)")
    p.add_argument("--search-data", choices=["auto", "cifar", "digits"], default="auto",
                   help="members of the search: CIFAR-shaped (Inception FIDs) or digits-shaped (digits-classifier "
                        "FIDs); auto: CIFAR when the FID probe says its FIDs fit the time limit, else digits")
    p.add_argument("--fid-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="time the CIFAR FID path before the search (always on unless --search-data digits)")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"seconds the whole run should take at most (default {TIME_LIMIT_S}; --tiny: 240)")
    args = p.parse_args(argv)

    from oms_lightning.errors import UserError
    from oms_lightning.zoo import resolve_device

    started = time.perf_counter()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or set(sections) - {"train", "latency", "search"}:
        p.error(f"--sections: a comma-separated subset of train,latency,search; got {args.sections!r}")
    try:
        device = resolve_device(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = SIZES["tiny" if args.tiny else "full"]
    compile_ = args.compile if args.compile is not None else (device.type == "cuda" and not args.tiny)
    limit = args.time_limit or (240 if args.tiny else TIME_LIMIT_S)

    out = (args.out or Path(tempfile.gettempdir()) / "oms_gpu_check").expanduser().resolve()
    if out == ROOT / "checkpoints" or (ROOT / "checkpoints") in out.parents:
        p.error(f"--out {out} is inside the repository's checkpoints/: use a temporary folder")
    out.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix=f"run-{dt.datetime.now():%Y%m%d-%H%M%S}-", dir=out))

    say(f"# {command_line()}")
    say(f"# device: {machine_description(device)}, torch {torch.__version__}; run folder {run}; "
        f"{'tiny' if args.tiny else 'full'} sizes; time limit {limit:.0f} s\n")
    results, walls = {}, {}
    for name in sections:
        t0 = time.perf_counter()
        try:
            if name == "train":
                results[name] = section_train(device, size["train"], compile_)
            elif name == "latency":
                results[name] = section_latency(device, size, run / "checkpoints", args.tiny)
            else:
                latency = results.get("latency", {}).get("latency")
                results[name] = section_search(device, size, run, args.tiny, args.search_data, latency,
                                               limit - (time.perf_counter() - started), args.fid_probe)
        except UserError as e:
            print(f"error in section {name}: {e}", file=sys.stderr)
            return 2
        synchronize(device)
        walls[name] = time.perf_counter() - t0
        say(f"section {name} wall time {walls[name]:.1f} s (elapsed {time.perf_counter() - started:.1f} s of "
            f"{limit:.0f} s)\n")
        _free(device)

    total = time.perf_counter() - started
    block = results_block(args, device, results, walls, total, limit)
    (run / "RESULTS_gpu_check.md").write_text(block + "\n")
    say("=" * 100)
    say(f"RESULTS.md block (also in {run / 'RESULTS_gpu_check.md'}):\n")
    say(block)
    say("=" * 100)
    say(f"total wall time {total:.1f} s (limit {limit:.0f} s): {'within the limit' if total <= limit else 'OVER'}")
    if total > limit:
        print(f"warning: the run took {total:.0f} s, over the {limit:.0f} s limit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
