"""Fashion-MNIST: the four IDX files (synthetic ones in the true format, checksums patched in), their checks and clear
errors, splits and pooled sizes, the model presets at its resolutions, and the timm FID classifier (never a download).
"""

import gzip
import hashlib
from pathlib import Path
from urllib.error import URLError

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets.mnist import read_image_file, read_label_file

from conftest import CONFIGS
from oms_lightning import metrics
from oms_lightning.data import FashionMNISTDataModule
from oms_lightning.data import fashion_mnist as fm
from oms_lightning.errors import UserError
from oms_lightning.metrics import extractors
from oms_lightning.metrics import (EXTRACTORS, FASHION_FORMAT, FashionClassifierExtractor, FIDEvaluator,
                                   default_extractor_for, feature_extractor, load_or_train_fashion_classifier)
from oms_lightning.nets import build_preset

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_TEST = 320, 80
PRESETS = ["tiny", "small", "medium", "large"]


def _idx(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 array: 0 0 8 <ndim>, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.contiguous().numpy().tobytes()


def _fake_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise with a bright bar whose row is the label: a class a few steps of training can see."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    images = torch.randint(0, 60, (n, 28, 28), generator=gen, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
    return images, labels


def write_fake(folder: Path, gz: bool = True) -> dict[str, str]:
    """The four files in `folder`; returns the MD5 of each one's content (to patch in for the real checksums)."""
    folder.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = _fake_split(N_TRAIN, 0), _fake_split(N_TEST, 1)
    arrays = {"train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
              "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y}
    md5 = {}
    for name, array in arrays.items():
        data = _idx(array)
        md5[name] = hashlib.md5(data).hexdigest()
        (folder / f"{name}.gz").write_bytes(gzip.compress(data)) if gz else (folder / name).write_bytes(data)
    return md5


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "raw"
    monkeypatch.setattr(fm, "FILE_MD5", write_fake(folder))
    return folder


def _module(raw_dir, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(raw_dir=str(raw_dir), data_dir=None, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------------- data module
def test_loads_gzipped_files_from_raw_dir(raw):
    dm = _module(raw, image_size=28, val_fraction=0.25, batch_size=16)
    assert (dm.name, dm.image_size, dm.channels) == ("fashion_mnist", 28, 1)
    shapes = {split: tuple(dm.real_images(split).shape) for split in ("train", "val", "test")}
    assert shapes == {"train": (240, 1, 28, 28), "val": (80, 1, 28, 28), "test": (N_TEST, 1, 28, 28)}
    test_x, test_y = _fake_split(N_TEST, 1)
    assert torch.equal(dm.real_images("test"), test_x.float().div(127.5).sub(1).unsqueeze(1))
    assert torch.equal(dm.labels("test"), test_y.long())
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.float32
    assert next(iter(dm.test_dataloader())).shape == (16, 1, 28, 28)


def test_plain_files_in_torchvision_layout_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "FILE_MD5", write_fake(tmp_path / "data" / "FashionMNIST" / "raw", gz=False))
    dm = FashionMNISTDataModule(raw_dir=str(tmp_path / "empty"), data_dir=str(tmp_path / "data"))
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download",
                        lambda self: pytest.fail("must not download when download=False"))
    dm.prepare_data()
    assert dm.real_images("test").shape == (N_TEST, 1, 14, 14)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"         # our decoder reads what torchvision's reader reads
    assert torch.equal(fm.read_idx(raw / "train-images-idx3-ubyte", "train-images-idx3-ubyte", 3),
                       read_image_file(str(raw / "train-images-idx3-ubyte")))
    assert torch.equal(fm.read_idx(raw / "t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte", 1),
                       read_label_file(str(raw / "t10k-labels-idx1-ubyte")).to(torch.uint8))


@pytest.mark.parametrize("size", [14, 16])
def test_pooled_sizes_and_range(raw, size):
    dm = _module(raw, image_size=size)
    full = _module(raw, image_size=28)
    for split in ("train", "val", "test"):
        x = dm.real_images(split)
        assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        pooled = F.avg_pool2d(full.real_images(split), 2)
        if size == 16:                               # padded with background, then pooled: 14 px inside a border
            assert (x[..., 0, :] == -1).all() and (x[..., :, -1] == -1).all()
            x = x[..., 1:15, 1:15]
        assert torch.equal(x, pooled)
    assert dm.real_images("test").max() == 1.0       # the bars are 2x2-aligned white blocks


def test_split_is_deterministic_disjoint_and_labelled(raw):
    a, b = _module(raw, val_fraction=0.1), _module(raw, val_fraction=0.1)
    assert torch.equal(a.real_images("val"), b.real_images("val")) and torch.equal(a.val_indices, b.val_indices)
    assert a.real_images("train").shape[0] == 288 and a.real_images("val").shape[0] == 32
    train, val = set(a.train_indices.tolist()), set(a.val_indices.tolist())
    assert not train & val and len(train | val) == N_TRAIN
    all_labels = _fake_split(N_TRAIN, 0)[1].long()
    assert torch.equal(a.labels("val"), all_labels[a.val_indices])
    assert not torch.equal(a.val_indices, _module(raw, split_seed=1).val_indices)
    with pytest.raises(UserError, match="train, val, test"):
        a.real_images("holdout")


def test_checksum_mismatch_names_the_file(raw):
    path = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-1] = (data[-1] + 1) % 10                     # a valid IDX file, one label changed
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz fails its checksum"):
        _module(raw)


def test_truncated_file_names_the_file(raw):
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz is truncated or corrupt"):
        _module(raw)


def test_missing_files_name_both_ways_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download",
                        lambda self: pytest.fail("must not download when download=False"))
    dm = FashionMNISTDataModule(raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "data"))
    dm.prepare_data()                                # nothing to do: download=False
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "raw") in message and str(tmp_path / "data") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.module.raw_dir=/usr/share/datasets/fashion-mnist" in message
    assert "data.module.download=true data.module.data_dir=" in message


def test_offline_download_is_a_user_error(tmp_path, monkeypatch):
    def no_network(self):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", no_network)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(UserError, match="network is unreachable.*apt-get install dataset-fashion-mnist"):
        dm.prepare_data()


def test_unsupported_image_size_is_a_user_error():
    with pytest.raises(UserError, match="data.image_size=14"):
        FashionMNISTDataModule(image_size=20)


@pytest.mark.skipif(not Path(fm.DEBIAN_DIR).is_dir(), reason="the Debian package dataset-fashion-mnist is absent")
def test_real_debian_files_pass_their_checksums():
    dm = FashionMNISTDataModule(raw_dir=fm.DEBIAN_DIR, data_dir=None, image_size=14)
    counts = {split: dm.real_images(split).shape[0] for split in ("train", "val", "test")}
    assert counts["train"] + counts["val"] == 60000 and counts["test"] == 10000 and counts["val"] == 6000
    assert torch.equal(dm.labels("test").bincount(), torch.full((10,), 1000))


def test_config_instantiates_with_its_image_size(compose):
    cfg = OmegaConf.load(CONFIGS / "data" / "fashion_mnist.yaml")
    assert (cfg.name, cfg.image_size, cfg.channels) == ("fashion_mnist", 14, 1)
    composed = compose("train", ["data=fashion_mnist", "data.image_size=16"])
    dm = hydra.utils.instantiate(composed.data.module)    # constructing reads no files
    assert isinstance(dm, FashionMNISTDataModule) and dm.image_size == 16 and dm.download is False


# ------------------------------------------------------------------------------------------------------- presets
def _flops(name: str, size: int) -> int:
    """Forward FLOPs per image on the meta device (shapes only, no arithmetic)."""
    with torch.device("meta"):
        net = build_preset(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"), size, 1)
        with FlopCounterMode(display=False) as counter:
            out = net(torch.zeros(1, 1, size, size), torch.tensor([0.5]))
    assert out.shape == (1, 1, size, size)
    return counter.get_total_flops()


@pytest.mark.parametrize("size", [14, 16, 28])
def test_presets_build_with_a_real_spread_of_cost(size):
    flops = [_flops(name, size) for name in PRESETS]
    assert flops == sorted(flops) and flops[-1] >= 10 * flops[0]


@pytest.mark.parametrize("size", [14, 16, 28])
def test_multistage_preset_costs_about_what_small_costs_per_nfe(size):
    """Routed per sample by t, the multi-decoder net's cost per NFE averages its three decoders' (stage
    boundaries 1/3, 2/3): it is the unified `small`'s rival at about its cost."""
    from oms_lightning.nets import MultiDecoderUNet

    net = build_preset(OmegaConf.load(CONFIGS / "model" / "multistage.yaml"), size, 1, boundaries=[1 / 3, 2 / 3])
    assert isinstance(net, MultiDecoderUNet) and net.num_stages == 3
    per_stage = []
    for t in (0.1, 0.5, 0.9):   # on the CPU: routing by t needs real values
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            assert net(torch.zeros(1, 1, size, size), torch.tensor([t])).shape == (1, 1, size, size)
        per_stage.append(counter.get_total_flops())
    assert len(set(per_stage)) == 3
    assert 0.7 < sum(per_stage) / 3 / _flops("small", size) < 1.5


def test_every_preset_runs_at_14_px():
    x = torch.randn(2, 1, 14, 14)
    for name in PRESETS:
        net = build_preset(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"), 14, 1).eval()
        with torch.no_grad():
            out = net(x, torch.tensor([0.5, 1e-3]))
        assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- the FID classifier
@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """A module-scoped 14 px data module over the synthetic files (checksums patched only while it reads them)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("fashion_raw")
        mp.setattr(fm, "FILE_MD5", write_fake(folder))
        return _module(folder, image_size=14)


@pytest.fixture(scope="module")
def classifier(fake_data, tmp_path_factory):
    """One epoch on the synthetic train split, through the real training code and cache."""
    cache = tmp_path_factory.mktemp("fashion_cache")
    model, accuracy = load_or_train_fashion_classifier(cache, fake_data, epochs=1, min_accuracy=0.0)
    return model, accuracy, cache


def test_classifier_is_cached_with_its_accuracy(classifier, fake_data):
    model, accuracy, cache = classifier
    assert isinstance(model, FashionClassifierExtractor) and not model.training and not model.net.training
    saved = torch.load(cache / "fid_fashion_classifier.pt", weights_only=True)
    assert saved["format"] == FASHION_FORMAT and saved["accuracy"] == pytest.approx(accuracy)
    assert saved["epochs"] == 1 and saved["model"] == "resnet10t" and saved["train_seconds"] >= 0
    features = model(fake_data.real_images("test"))
    assert features.shape == (N_TEST, model.num_features) == (N_TEST, 256) and features.dtype == torch.float64
    assert (features < 0).any()                        # taken before the last ReLU


def test_features_are_those_of_the_14_px_images_at_every_size(classifier, raw):
    model = classifier[0]
    at_14 = model(_module(raw, image_size=14).real_images("test"))
    for size in (16, 28):
        assert torch.allclose(model(_module(raw, image_size=size).real_images("test")), at_14, atol=1e-5)
    model.train()                                      # batch norm stays in eval mode: features never depend on it
    assert not model.net.training and torch.equal(model(_module(raw, image_size=14).real_images("test")), at_14)
    with pytest.raises(UserError, match="fashion_classifier extractor takes"):
        model(torch.zeros(2, 1, 8, 8))


def test_cached_classifier_is_reloaded_without_training(classifier, monkeypatch):
    model, accuracy, cache = classifier
    monkeypatch.setattr(extractors, "train_fashion_classifier",
                        lambda *a, **k: pytest.fail("the cached classifier should have been loaded, not retrained"))
    again = feature_extractor("fashion_classifier", cache)
    assert isinstance(again, FashionClassifierExtractor)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_corrupt_cache_is_rebuilt_and_foreign_file_refused(classifier, fake_data, tmp_path, monkeypatch):
    path = tmp_path / "fid_fashion_classifier.pt"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    monkeypatch.setattr(extractors, "train_fashion_classifier", lambda *a, **k: classifier[:2])
    with pytest.warns(UserWarning, match="training it again"):
        load_or_train_fashion_classifier(tmp_path, fake_data, min_accuracy=0.0)
    assert torch.load(path, weights_only=True)["format"] == FASHION_FORMAT
    torch.save({"state_dict": {}, "accuracy": 1.0}, path)
    with pytest.raises(UserError, match="delete"):
        load_or_train_fashion_classifier(tmp_path, fake_data)


def test_too_low_accuracy_is_refused_and_not_cached(classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(extractors, "train_fashion_classifier", lambda *a, **k: (classifier[0], 0.5))
    with pytest.raises(UserError, match="reached only 0.5000 test accuracy"):
        load_or_train_fashion_classifier(tmp_path)
    assert not (tmp_path / "fid_fashion_classifier.pt").exists()


def test_fid_evaluator_takes_the_extractor_by_name(classifier, fake_data):
    cache = classifier[2]
    assert "fashion_classifier" in EXTRACTORS and default_extractor_for("fashion_mnist") == "fashion_classifier"
    assert default_extractor_for("digits") == "digits_classifier"
    evaluator = FIDEvaluator("fashion_classifier", fake_data, cache, split="test")
    assert evaluator.fingerprint["features"] == "resnet10t_half_nopool_pre_relu_256"
    assert evaluator.fid(fake_data.real_images("test"), seed=0).value == pytest.approx(0.0, abs=1e-3)
    assert evaluator.fid(fake_data.real_images("val"), seed=0).value > 0


def test_real_images_downloads_first_when_asked(tmp_path, monkeypatch):
    """Jobs that only evaluate (sample.py, search.py) call real_images without a Trainer's prepare_data."""
    def fake_download(self):                          # what torchvision leaves: the files, extracted
        monkeypatch.setattr(fm, "FILE_MD5", write_fake(Path(self.raw_folder), gz=False))

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", fake_download)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True)
    assert dm.real_images("test").shape == (N_TEST, 1, 14, 14)
    assert fm.find_files(tmp_path / "FashionMNIST" / "raw") is not None


# ------------------------------------------------------------------------------- metrics on the held-out test split
def test_sample_metrics_report_on_test_and_the_search_selects_on_val(classifier, fake_data, monkeypatch, tmp_path):
    """data=fashion_mnist: FID, KID and pixel FD against the held-out test split, copy rate against train, the
    noise floor = n real val images scored exactly as samples (the sizes compared); searches select on val."""
    (tmp_path / "fashion_mnist").mkdir()
    (tmp_path / "fashion_mnist" / "fid_fashion_classifier.pt").write_bytes(
        (classifier[2] / "fid_fashion_classifier.pt").read_bytes())      # the trained extractor, not a new one
    data = OmegaConf.create({"name": "fashion_mnist", "fid_reference": "test", "search_reference": "val",
                             "module": {"_target_": "builtins.object"}})
    monkeypatch.setattr(hydra.utils, "instantiate", lambda _: fake_data)
    sm = metrics.sample_metrics_for(data, tmp_path, "cpu")
    assert sm.evaluator.split == "test" and sm.heldout_split == "test"
    test, val = fake_data.real_images("test"), fake_data.real_images("val")
    assert sm.evaluator.fid(test, 0).value == pytest.approx(0.0, abs=1e-3)
    assert torch.equal(sm.heldout_features, sm.features(test))                 # KID against test
    assert sm.score(test, 0)["pixel_fd"] == pytest.approx(0.0, abs=1e-4)       # pixel FD against test
    assert sm.copy_threshold == metrics.copy_threshold(fake_data.real_images("train"), 0.05)   # copies of train
    floor = sm.noise_floor(10_000, seed=0)
    assert floor["n_used"] == val.shape[0]
    assert {k: v for k, v in floor.items() if k != "n_used"} == sm.score(val[torch.randperm(
        val.shape[0], generator=torch.Generator().manual_seed(0))], 0)
    assert sm.noise_floor(10, seed=1)["n_used"] == 10

    selecting = metrics.search_evaluator_for(sm, data, tmp_path)
    assert selecting.split == "val" and selecting is not sm.evaluator
    assert selecting.fid(val, 0).value == pytest.approx(0.0, abs=1e-3)
    assert metrics.search_evaluator_for(sm, OmegaConf.create({"name": "fashion_mnist"}), tmp_path) is sm.evaluator


def test_the_cpu_preset_is_specialised_for_fashion_mnist_and_only_there(compose):
    fashion = compose("search", ["data=fashion_mnist"])
    assert fashion.search.zoo_train_steps == 3000 and fashion.data.fid_reference == "test"
    assert compose("search", []).search.zoo_train_steps == 800                      # digits: the preset as is
    assert compose("search", ["data=fashion_mnist", "search=paper"]).search.zoo_train_steps == 800_000


@pytest.mark.slow
def test_a_tiny_search_on_fashion_shaped_data_reports_on_test(classifier, tmp_path, monkeypatch, compose):
    """The whole search (dataset, predictor, evolution, refinement, fresh-seed evaluation, report) on synthetic
    Fashion-MNIST files at 14 px: the reported metrics are against the test split, the stores against val."""
    import json

    from conftest import SMALL as SMALL_NET, TINY as TINY_NET, write_member
    from test_search import tiny_search_args

    from oms_lightning.jobs import search as pipeline
    from oms_lightning.zoo import LatencyProfile, Zoo, device_description

    monkeypatch.setattr(fm, "FILE_MD5", write_fake(tmp_path / "raw"))
    shape = {"name": "fashion_mnist", "image_size": 14, "channels": 1}
    write_member(tmp_path, "tiny", TINY_NET, data=shape, data_name="fashion_mnist")
    write_member(tmp_path, "small", SMALL_NET, data=shape, data_name="fashion_mnist", seed=1)
    (tmp_path / "fashion_mnist" / "fid_fashion_classifier.pt").write_bytes(
        (classifier[2] / "fid_fashion_classifier.pt").read_bytes())
    zoo = Zoo.load(tmp_path, "fashion_mnist", ["small", "tiny"])
    LatencyProfile({"small": 0.02, "tiny": 0.01}, 256, device_description("cpu"), "float32", zoo.fingerprint()).save(
        tmp_path / "fashion_mnist" / "latency.json")
    args = [a for a in tiny_search_args(tmp_path) if not a.startswith("hydra.")]
    cfg = compose("search", ["data=fashion_mnist", f"data.module.raw_dir={tmp_path / 'raw'}",
                             "data.module.data_dir=null", "budget=60", "search.dataset.n_random=8",
                             "search.refine.evaluations=6", f"paths.run_dir={tmp_path / 'run'}", *args])
    summary = pipeline.run(cfg)[0]
    assert summary["verdict"] in ("better", "tie", "worse") and summary["noise_floor"]["n_used"] == 32
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["budget"] == pytest.approx(60.0)
    refs = sorted(p.name for p in (tmp_path / "fashion_mnist").glob("fid_ref_*.pt"))
    assert refs == ["fid_ref_fashion_classifier_test.pt", "fid_ref_fashion_classifier_val.pt"]
    for store in (tmp_path / "fashion_mnist" / "search").glob("*.jsonl"):
        if store.name.startswith("iia-"):   # IIA fits: no FID in them
            continue
        split = json.loads(store.read_text().splitlines()[0])["settings"]["split"]
        assert split == ("test" if store.name.startswith("eval") else "val"), store.name
