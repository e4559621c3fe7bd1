"""Real image datasets through torchvision: CIFAR-10/100, MNIST, Fashion-MNIST and ImageFolder.

torchvision is an optional extra (``pip install 'autoprune[vision]'``) and is imported on first use only,
so that ``import autoprune`` stays lean. Each loader reads the dataset's standard on-disk format under
``data_dir`` (default ``./data``) and returns :class:`autoprune.data.Splits`: the official training set,
less a seeded, stratified 10 % validation split, for train and val, and the official test set for test.
Images become normalised float tensors (N, C, H, W); an ImageFolder streams its files from disk instead. Nothing is downloaded unless the environment
variable ``AUTOPRUNE_DOWNLOAD=1`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from autoprune.data import Splits
from autoprune.deps import VISION_HINT
from autoprune.deps import import_torchvision as deps_import_torchvision
from autoprune.errors import AutopruneError

VAL_FRACTION = 0.1
DEFAULT_DATA_DIR = Path("data")
PIP_HINT = VISION_HINT
# Images an ImageFolder's normalisation statistics are estimated on: enough for stable means, bounded time.
STATS_SAMPLES = 2000

# Per-channel mean and std of each official training set, on pixel values scaled to [0, 1].
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

def import_torchvision(name: str = "torchvision") -> ModuleType:
    """torchvision, imported on first use; ``name`` is what a failure is reported against (a dataset)."""
    return deps_import_torchvision(field="dataset", value=name)


def _download_requested() -> bool:
    return os.environ.get("AUTOPRUNE_DOWNLOAD", "") == "1"


def _root(data_dir: Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR


def _open(name: str, cls: Callable[..., Any], root: Path, where: Path, *, train: bool) -> Any:
    """One split of a torchvision dataset, its failures turned into one-line errors."""
    download = _download_requested()
    try:
        return cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:
        if download:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutopruneError("dataset", name, f"could not be downloaded into {where}: {reason}") from None
        raise AutopruneError(
            "dataset",
            name,
            f"files not found (or corrupted) in {where}: set AUTOPRUNE_DOWNLOAD=1 to download them "
            f"(needs internet), or copy the dataset's files there",
        ) from None


def _holdout(y: np.ndarray, *, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: stratified where every class can give at least one sample to each side."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_out = max(1, int(round(fraction * len(y))))
    counts = np.bincount(y)
    counts = counts[counts > 0]
    stratifiable = counts.min() >= 2 and len(counts) <= n_out <= len(y) - len(counts)
    kept, out = train_test_split(idx, test_size=n_out, random_state=seed, stratify=y if stratifiable else None)
    return kept, out


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, H, W) to float32 (N, C, H, W), written once into one new tensor."""
    if images.dim() == 3:
        images = images.unsqueeze(-1)
    n, h, w, c = images.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    out.copy_(images.permute(0, 3, 1, 2))
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1) * 255.0
    return out.sub_(m).div_(s)


def _tensors(images: torch.Tensor, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> TensorDataset:
    return TensorDataset(_normalise(images, mean, std), torch.as_tensor(labels, dtype=torch.long))


def _official_splits(
    images: torch.Tensor,
    labels: np.ndarray,
    test_images: torch.Tensor,
    test_labels: np.ndarray,
    *,
    name: str,
    num_classes: int,
    seed: int,
) -> Splits:
    # Split on labels first and convert each part on its own: the float copy of CIFAR's 50k images is 600 MB,
    # and indexing a finished float tensor would hold a second one.
    train_ix, val_ix = _holdout(labels, seed=seed, fraction=VAL_FRACTION)
    mean, std = STATS[name]
    train = _tensors(images[torch.as_tensor(train_ix)], labels[train_ix], mean, std)
    val = _tensors(images[torch.as_tensor(val_ix)], labels[val_ix], mean, std)
    test = _tensors(test_images, test_labels, mean, std)
    return Splits(train, val, test, num_classes, tuple(train.tensors[0].shape[1:]))  # type: ignore[arg-type]


def _load_cifar(name: str, class_name: str, folder: str, *, seed: int, data_dir: Path | None) -> Splits:
    tv = import_torchvision(name)
    root = _root(data_dir)
    cls = getattr(tv.datasets, class_name)
    train = _open(name, cls, root, root / folder, train=True)
    test = _open(name, cls, root, root / folder, train=False)
    return _official_splits(
        torch.from_numpy(np.ascontiguousarray(train.data)),
        np.asarray(train.targets, dtype=np.int64),
        torch.from_numpy(np.ascontiguousarray(test.data)),
        np.asarray(test.targets, dtype=np.int64),
        name=name,
        num_classes=len(train.classes),
        seed=seed,
    )


def _load_mnist_like(name: str, class_name: str, *, seed: int, data_dir: Path | None) -> Splits:
    tv = import_torchvision(name)
    root = _root(data_dir)
    cls = getattr(tv.datasets, class_name)
    where = root / class_name / "raw"
    train = _open(name, cls, root, where, train=True)
    test = _open(name, cls, root, where, train=False)
    return _official_splits(
        train.data,
        train.targets.numpy().astype(np.int64),
        test.data,
        test.targets.numpy().astype(np.int64),
        name=name,
        num_classes=len(train.classes),
        seed=seed,
    )


def load_cifar10(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python pickle batches)."""
    return _load_cifar("cifar10", "CIFAR10", "cifar-10-batches-py", seed=seed, data_dir=data_dir)


def load_cifar100(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """CIFAR-100 (fine labels) from ``<data_dir>/cifar-100-python``."""
    return _load_cifar("cifar100", "CIFAR100", "cifar-100-python", seed=seed, data_dir=data_dir)


def load_mnist(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """MNIST from the idx-ubyte files in ``<data_dir>/MNIST/raw``."""
    return _load_mnist_like("mnist", "MNIST", seed=seed, data_dir=data_dir)


def load_fashion_mnist(*, seed: int = 0, data_dir: Path | None = None) -> Splits:
    """Fashion-MNIST from the idx-ubyte files in ``<data_dir>/FashionMNIST/raw``."""
    return _load_mnist_like("fashion_mnist", "FashionMNIST", seed=seed, data_dir=data_dir)


class ImageFiles(Dataset):
    """Image files read from disk one at a time (RGB, resized, normalised): a split of any size streams.

    Module-level and built from plain data, so DataLoader workers can pickle it.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], torch.Tensor], loader: Callable[[str], Any]) -> None:
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


def _channel_stats(images: Dataset, *, limit: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, on [0, 1], of up to ``limit`` images read one at a time (a seeded sample)."""
    count = len(images)  # type: ignore[arg-type]
    chosen = range(count) if count <= limit else torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    total = total_sq = None
    pixels = 0
    for i in chosen:
        block = images[i][0].to(torch.float64).flatten(1)
        total = block.sum(dim=1) if total is None else total + block.sum(dim=1)
        total_sq = (block * block).sum(dim=1) if total_sq is None else total_sq + (block * block).sum(dim=1)
        pixels += block.shape[1]
    assert total is not None and total_sq is not None
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def load_imagefolder(*, seed: int = 0, data_dir: Path | None = None, image_size: int = 32) -> Splits:
    """Images in ``<data_dir>/{train,val,test}/<class>/<image>``; val/ and test/ are optional.

    Class indices come from train/ (sorted folder names), so val/ and test/ may lack classes but not add
    any. A missing val/ or test/ is split off train/ (seeded, stratified, 10 % each). Pixels are normalised
    with the per-channel mean and std of the final train split (of a seeded sample of STATS_SAMPLES images),
    as an arbitrary folder has no known stats. Images stream from disk: only their paths are held.
    """
    name = "imagefolder"
    tv = import_torchvision(name)
    folder = tv.datasets.folder
    root = _root(data_dir)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise AutopruneError(
            "dataset", name, f"needs {train_dir}/<class>/<image> files (and optional val/ and test/ folders)"
        )
    try:
        classes, class_to_idx = folder.find_classes(str(train_dir))
    except FileNotFoundError:
        raise AutopruneError("dataset", name, f"found no class folders in {train_dir}") from None

    parts: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val", "test"):
        directory = root / split
        if not directory.is_dir():
            continue
        found = (d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = sorted(c for c in found if c not in class_to_idx)
        if unknown:
            raise AutopruneError("dataset", name, f"{directory} has classes missing from train/: {', '.join(unknown)}")
        parts[split] = folder.make_dataset(str(directory), class_to_idx, extensions=folder.IMG_EXTENSIONS, allow_empty=True)
    if len(parts["train"]) == 0:
        raise AutopruneError("dataset", name, f"found no images in {train_dir}")

    for split in ("test", "val"):
        if split in parts:
            continue
        samples = parts["train"]
        if len(samples) < 3:
            raise AutopruneError("dataset", name, f"has too few images in {train_dir} to split off {split}/")
        kept, out = _holdout(np.asarray([t for _, t in samples], dtype=np.int64), seed=seed, fraction=VAL_FRACTION)
        parts["train"] = [samples[i] for i in kept]
        parts[split] = [samples[i] for i in out]

    transforms = tv.transforms
    resize = [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    mean, std = _channel_stats(ImageFiles(parts["train"], transforms.Compose(resize), folder.default_loader), limit=STATS_SAMPLES, seed=seed)
    transform = transforms.Compose([*resize, transforms.Normalize(mean, std)])
    train, val, test = (ImageFiles(parts[split], transform, folder.default_loader) for split in ("train", "val", "test"))
    return Splits(train, val, test, len(classes), (3, image_size, image_size))
