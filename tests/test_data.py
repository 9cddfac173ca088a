"""Data modules: shapes, ranges, deterministic splits, clear errors, and that every data config instantiates."""

from urllib.error import URLError

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from oms_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, Toy2DDataModule
from oms_lightning.errors import UserError

from conftest import CONFIGS


def _in_range(x: torch.Tensor) -> bool:
    return bool(x.min() >= -1.0 and x.max() <= 1.0)


def _ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_digits_batches_are_images_in_range():
    dm = _ready(DigitsDataModule(batch_size=32))
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
    assert batch.shape == (32, 1, 8, 8)
    assert (dm.name, dm.image_size, dm.channels) == ("digits", 8, 1)
    everything = torch.cat([dm.real_images("train"), dm.real_images("val")])
    assert _in_range(everything)
    assert everything.min() == -1.0 and everything.max() == 1.0   # 0 and 16 both occur
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch.shape[1:] == (1, 8, 8)


def test_digits_split_is_deterministic_and_disjoint():
    a, b = _ready(DigitsDataModule(val_fraction=0.1)), _ready(DigitsDataModule(val_fraction=0.1))
    train, val = a.real_images("train"), a.real_images("val")
    assert train.shape[0] + val.shape[0] == 1797
    assert val.shape == (180, 1, 8, 8) and train.shape == (1617, 1, 8, 8)
    assert torch.equal(train, b.real_images("train")) and torch.equal(val, b.real_images("val"))
    ti, vi = set(a.train_indices.tolist()), set(a.val_indices.tolist())
    assert not ti & vi and len(ti | vi) == 1797
    assert torch.equal(a.val_indices, b.val_indices)
    other = _ready(DigitsDataModule(split_seed=1)).real_images("val")
    assert not torch.equal(val, other)


def test_drop_last_only_for_splits_larger_than_a_batch():
    dm = _ready(DigitsDataModule(batch_size=4096))
    assert next(iter(dm.train_dataloader())).shape[0] == 1617
    dm = _ready(DigitsDataModule(batch_size=100))
    assert all(b.shape[0] == 100 for b in dm.train_dataloader())


def _write_pngs(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy()
        pixels[0, 0] = 0
        pixels[-1, -1] = 255
        Image.fromarray(pixels).save(folder / f"img{i}.png")


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_resizes_and_normalises(tmp_path, channels):
    _write_pngs(tmp_path / "a", [(40, 30), (16, 64)])
    _write_pngs(tmp_path / "b" / "deep", [(20, 20), (33, 17), (64, 48)])
    (tmp_path / "notes.txt").write_text("not an image")
    dm = _ready(ImageFolderDataModule(root=str(tmp_path), image_size=12, channels=channels, batch_size=2,
                                      val_fraction=0.2, num_workers=0))
    assert (dm.name, dm.image_size, dm.channels) == ("image_folder", 12, channels)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, channels, 12, 12) and batch.dtype == torch.float32
    train, val = dm.real_images("train"), dm.real_images("val")
    assert train.shape == (4, channels, 12, 12) and val.shape == (1, channels, 12, 12)
    assert _in_range(train) and _in_range(val)


def test_image_folder_missing_or_empty_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8).setup("fit")
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope"), image_size=8).setup("fit")
    with pytest.raises(UserError, match="channels"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=4)


def test_cifar10_offline_is_a_user_error(tmp_path, monkeypatch):
    def no_network(self):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", no_network)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), num_workers=0)
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "CIFAR-10 is not in" in message and str(tmp_path) in message
    assert "network is unreachable" in message and "data.module.data_dir" in message and "python -c" in message


def test_cifar10_missing_without_download_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download",
                        lambda self: pytest.fail("must not download when download=False"))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(UserError, match="CIFAR-10 is not in"):
        dm.prepare_data()
    with pytest.raises(UserError, match="data.module.data_dir"):
        dm.setup("fit")


def test_toy2d_matches_its_mixture():
    dm = _ready(Toy2DDataModule(n_samples=20000, n_components=8, radius=2.0, std=0.1, batch_size=256))
    assert (dm.name, dm.image_size, dm.channels) == ("toy2d", None, None)
    assert next(iter(dm.train_dataloader())).shape == (256, 2)
    points = dm.real_images("train")
    assert points.shape == (18000, 2) and dm.real_images("val").shape == (2000, 2)
    assert points.mean(0).abs().max() < 0.05
    assert abs(points.norm(dim=1).mean() - 2.0) < 0.02
    assert dm.means.shape == (8, 2) and torch.allclose(dm.means.norm(dim=1), torch.full((8,), 2.0))
    assert dm.std == 0.1
    assert torch.equal(points, _ready(Toy2DDataModule()).real_images("train"))


@pytest.mark.parametrize("name", ["digits", "cifar10", "image_folder", "toy2d"])
def test_data_configs_load(name, tmp_path, monkeypatch):
    cfg = OmegaConf.load(CONFIGS / "data" / f"{name}.yaml")
    assert cfg.name == name and "_target_" in cfg.module
    if name == "image_folder":
        cfg.module.root = str(tmp_path)
    if name == "cifar10":
        monkeypatch.setenv("OMS_DATA_DIR", str(tmp_path))
    dm = hydra.utils.instantiate(cfg.module)     # constructing touches no files; setup would
    assert dm.name == cfg.name and dm.image_size == cfg.image_size and dm.channels == cfg.channels
    if name == "cifar10":
        assert dm.data_dir == str(tmp_path)
    if name in ("digits", "toy2d"):
        dm.setup("fit")
        assert next(iter(dm.train_dataloader())).shape[0] == cfg.module.batch_size


@pytest.mark.parametrize("name", ["digits", "image_folder", "toy2d"])
def test_data_configs_compose_with_train(compose, name, tmp_path):
    overrides = [f"data={name}"] + ([f"data.module.root={tmp_path}", "data.image_size=16"]
                                    if name == "image_folder" else [])
    cfg = compose("train", overrides)
    dm = hydra.utils.instantiate(cfg.data.module)
    assert dm.name == name and dm.image_size == cfg.data.image_size
