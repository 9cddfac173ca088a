"""LightningDataModules whose batches are bare image tensors in [-1, 1] (toy2d: 2-D points)."""

from oms_lightning.data.cifar10 import CIFAR10DataModule
from oms_lightning.data.digits import DigitsDataModule
from oms_lightning.data.fashion_mnist import FashionMNISTDataModule
from oms_lightning.data.image_folder import ImageFolderDataModule
from oms_lightning.data.toy2d import Toy2DDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "FashionMNISTDataModule", "ImageFolderDataModule",
           "Toy2DDataModule"]
