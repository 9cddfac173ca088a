"""How the FID classifiers (digits and Fashion-MNIST) are cached in a data set's checkpoints folder.

A `ClassifierCache` names one classifier's file and format; `_load_or_train` returns the cached classifier with
its stored accuracy, or trains one and saves it atomically when its accuracy is good enough. An unreadable cache
or one of an older oms-lightning format (`StaleCache`) is rebuilt with a warning; a readable file of any other
kind raises UserError, so someone else's file is never overwritten.
"""
from __future__ import annotations

import pickle
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from oms_lightning.errors import UserError
from oms_lightning.io import atomic_torch_save


@dataclass(frozen=True)
class ClassifierCache:
    """How one FID classifier is cached (file, format) and named in messages; shared by digits and Fashion-MNIST."""

    title: str                          # "FID digits classifier"
    file: str                           # in the cache dir
    prefix: str                         # every version of the format starts with it: older ones are ours, stale
    format: str                         # the current version
    model: Callable[[], nn.Module]      # an untrained instance to load the weights into
    accuracy_on: str                    # the split the stored accuracy was measured on
    train_time: str                     # what a rebuild costs, for the warning
    older: str                          # what changed since the older formats


def _load_or_train(cache: ClassifierCache, cache_dir: str | Path, train: Callable[[], tuple[nn.Module, float]],
                   min_accuracy: float, meta: dict) -> tuple[nn.Module, float]:
    """The cached classifier, or `train()`'s, saved atomically (with its accuracy and `meta`) when good enough."""
    path = Path(cache_dir) / cache.file
    if path.exists():
        try:
            model, accuracy = _load_classifier(path, cache)
        except StaleCache as e:
            warnings.warn(f"{e}; training it again ({cache.train_time})", stacklevel=3)
        else:
            print(f"{cache.title}: loaded {path} ({cache.accuracy_on} accuracy {accuracy:.4f})")
            return model, accuracy
    start = time.perf_counter()
    model, accuracy = train()
    seconds = time.perf_counter() - start
    if accuracy < min_accuracy:
        raise UserError(f"the {cache.title} reached only {accuracy:.4f} {cache.accuracy_on} accuracy (needs "
                        f"{min_accuracy}); train longer (epochs > {meta['epochs']}) or try another seed")
    payload = {"format": cache.format, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "accuracy": float(accuracy), **meta, "train_seconds": round(seconds, 1)}
    atomic_torch_save(payload, path)
    print(f"{cache.title}: trained in {seconds:.1f} s, {cache.accuracy_on} accuracy {accuracy:.4f}, saved to {path}")
    return model, accuracy


class StaleCache(UserError):
    """A cache file this project wrote but can no longer use (unreadable or an older format): rebuilt, not refused."""


def _load_classifier(path: Path, cache: ClassifierCache) -> tuple[nn.Module, float]:
    fix = f"delete {path} and run again to retrain it ({cache.train_time} on a CPU)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise StaleCache(f"FID classifier cache {path} is unreadable (truncated or corrupt: "
                         f"{type(e).__name__}: {str(e)[:200]})") from None
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    if isinstance(found, str) and found.startswith(cache.prefix) and found != cache.format:
        raise StaleCache(f"{path} is an older oms-lightning {cache.title} (format {found!r}, expected "
                         f"{cache.format!r}: {cache.older})")
    if found != cache.format:
        raise UserError(f"{path} is not an oms-lightning {cache.title} (format {found!r}, expected "
                        f"{cache.format!r}); {fix}")
    model = cache.model()
    try:
        model.load_state_dict(obj["state_dict"])
        accuracy = float(obj["accuracy"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"FID classifier cache {path} does not fit the classifier ({str(e)[:200]}); {fix}") from None
    return model.eval().requires_grad_(False), accuracy
