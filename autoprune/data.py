"""Datasets as train / validation / test splits, read through DataLoaders.

The default is scikit-learn's bundled digits (1,797 8x8 images, no download). MNIST-1D (Greydanus and Kobak,
ICML 2024) is generated procedurally by the ``mnist1d`` package, also without a download. Real datasets go
through torchvision (``autoprune.vision``), imported only when asked for; an ImageFolder streams
from disk. A split is any map-style ``Dataset`` (or a user's ``DataLoader``): nothing downstream
needs the whole split as one tensor.
"""

from __future__ import annotations

import importlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from autoprune.errors import AutopruneError
from autoprune.files import atomic_path, cache_root

# Bumped whenever a built-in loader's arrays or split change, so that no cache serves the old ones.
ARRAYS_VERSION = 1


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    # Set where the arrays were generated rather than read from the cache: writes them there. The task
    # calls it once its inputs were accepted, so that input it refuses leaves no file behind.
    keep: Callable[[], None] | None = None

    def sizes(self) -> tuple[int, int, int]:
        return _size(self.train), _size(self.val), _size(self.test)


def _size(split: Any) -> int:
    # A user's DataLoader counts batches; its dataset counts samples.
    return len(getattr(split, "dataset", split))


def split_indices(y: np.ndarray, *, seed: int, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded train / val / test indices of the labels ``y``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    rel_val = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=rel_val, random_state=seed, stratify=y[rest])
    return train, val, test


def _subsets(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray, *, keep: Callable[[], None] | None = None) -> Splits:
    def subset(ix: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(x[ix], dtype=torch.float32), torch.as_tensor(y[ix], dtype=torch.long))

    return Splits(subset(train), subset(val), subset(test), int(y.max()) + 1, tuple(x.shape[1:]), keep)  # type: ignore[arg-type]


def cached_splits(name: str, *, seed: int, val_fraction: float, test_fraction: float, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Splits:
    """The arrays ``make`` returns, split by ``split_indices``, kept with their split under the cache root.

    Generating MNIST-1D takes about two seconds and importing scikit-learn about one: every search and every
    worker process paid them before its first trial. The file is written by ``Splits.keep``, whole (a reader
    never sees half of it), keyed by dataset, seed and ``ARRAYS_VERSION``.
    """
    path = cache_root() / "data" / f"{name}-seed{seed}-v{ARRAYS_VERSION}.npz"
    try:
        with np.load(path) as saved:
            return _subsets(*(saved[key] for key in ("x", "y", "train", "val", "test")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing, or unreadable: the cache is ours, so it is made again rather than an error
    x, y = make()
    train, val, test = split_indices(y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)

    def keep() -> None:
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, x=x, y=y, train=train, val=val, test=test)

    return _subsets(x, y, train, val, test, keep=keep)


def load_digits(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """sklearn's digits: pixel values 0..16 scaled to zero mean, unit variance; 60/20/20 split."""

    def make() -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        images = bunch.images.astype(np.float32)[:, None, :, :]
        return (images / 16.0 - 0.3) / 0.37, bunch.target.astype(np.int64)

    return cached_splits("digits", seed=seed, val_fraction=0.2, test_fraction=0.2, make=make)


MNIST1D_SAMPLES = 12_000
# The generator's own default seed: every task seed sees the same 12,000 signals, split differently, as digits does.
MNIST1D_GENERATOR_SEED = 42


def load_mnist1d(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """MNIST-1D: 12,000 signals of length 40 (one channel) from ``make_dataset``, split 8,000 / 2,000 / 2,000.

    Generated deterministically (in about two seconds, then cached); the package's ``get_dataset`` would
    download a pickle and is never called. ``make_dataset`` reseeds Python's and NumPy's global random
    generators, whose states are restored afterwards so a caller's random streams do not depend on it.
    """

    def make() -> tuple[np.ndarray, np.ndarray]:
        import random

        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.train_split, args.seed = MNIST1D_SAMPLES, 1.0, MNIST1D_GENERATOR_SEED
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return data["x"].astype(np.float32)[:, None, :], data["y"].astype(np.int64)

    return cached_splits("mnist1d", seed=seed, val_fraction=1 / 6, test_fraction=1 / 6, make=make)


# Loaders beyond digits and MNIST-1D live in autoprune.vision, which imports torchvision on first use.
DATASETS: dict[str, str] = {
    "digits": "autoprune.data:load_digits",
    "mnist1d": "autoprune.data:load_mnist1d",
    "cifar10": "autoprune.vision:load_cifar10",
    "cifar100": "autoprune.vision:load_cifar100",
    "mnist": "autoprune.vision:load_mnist",
    "fashion_mnist": "autoprune.vision:load_fashion_mnist",
    "imagefolder": "autoprune.vision:load_imagefolder",
}


def load_dataset(name: str, *, seed: int = 0, data_dir: Path | None = None) -> Splits:
    if name not in DATASETS:
        raise AutopruneError("dataset", name, f"is not known (datasets: {', '.join(DATASETS)})")
    module_name, _, attr = DATASETS[name].partition(":")
    loader = getattr(importlib.import_module(module_name), attr)
    return loader(seed=seed, data_dir=data_dir)
