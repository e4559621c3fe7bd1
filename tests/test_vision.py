"""The torchvision loaders, run on small datasets written in the real on-disk formats (no download here)."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from autoprune.data import Splits, load_dataset
from autoprune.errors import AutopruneError
from autoprune.vision import PIP_HINT, STATS, import_torchvision, load_imagefolder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tv() -> ModuleType:
    return import_torchvision()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's AUTOPRUNE_DOWNLOAD=1 must not send these tests to the internet.
    monkeypatch.delenv("AUTOPRUNE_DOWNLOAD", raising=False)


@pytest.fixture
def cifar_md5_ignored(tv: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks CIFAR files against the md5 sums of the real 50k-image archives, which small test files
    # cannot match. Only the md5 comparison is dropped: the files must still exist, and everything else (pickle
    # layout, keys, meta file, reshaping) goes through torchvision's real code.
    real = tv.datasets.cifar.check_integrity

    def exists_only(fpath: str, md5: str | None = None) -> bool:
        return bool(real(fpath, None))

    monkeypatch.setattr(tv.datasets.cifar, "check_integrity", exists_only)


def _labelled_images(n: int, num_classes: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images whose first two bytes are the image's index (to trace it through the splits)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return images, labels.astype(np.int64)


def _pickle(path: Path, obj: dict[str, object]) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, n_per_batch: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = _labelled_images(5 * n_per_batch, 10, (3072,), seed=1)
    for b in range(5):
        part = slice(b * n_per_batch, (b + 1) * n_per_batch)
        batch = {"batch_label": f"training batch {b + 1} of 5", "data": x[part], "labels": y[part].tolist()}
        _pickle(folder / f"data_batch_{b + 1}", batch)
    xt, yt = _labelled_images(n_test, 10, (3072,), seed=2)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": xt, "labels": yt.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return x, y, xt, yt


def write_cifar100(root: Path, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    x, y = _labelled_images(n_train, 100, (3072,), seed=3)
    xt, yt = _labelled_images(n_test, 100, (3072,), seed=4)
    for fname, images, labels in (("train", x, y), ("test", xt, yt)):
        batch = {"data": images, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
        _pickle(folder / fname, batch)
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    _pickle(folder / "meta", meta)
    return x, y, xt, yt


def _idx(path: Path, array: np.ndarray) -> None:
    # IDX format: zero bytes, dtype code 0x08 (uint8), number of dimensions, big-endian sizes, raw bytes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(
    root: Path, folder: str, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    x, y = _labelled_images(n_train, 10, (28, 28), seed=5)
    xt, yt = _labelled_images(n_test, 10, (28, 28), seed=6)
    _idx(raw / "train-images-idx3-ubyte", x)
    _idx(raw / "train-labels-idx1-ubyte", y)
    _idx(raw / "t10k-images-idx3-ubyte", xt)
    _idx(raw / "t10k-labels-idx1-ubyte", yt)
    return x, y, xt, yt


def _denormalised(x: torch.Tensor, name: str) -> np.ndarray:
    mean, std = STATS[name]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return torch.round((x * s + m) * 255.0).to(torch.int64).numpy()


def _check_official(
    splits: Splits, name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, shape: tuple[int, int, int]
) -> None:
    n = len(y)
    n_val = round(0.1 * n)
    assert splits.sizes() == (n - n_val, n_val, len(yt))
    assert splits.input_shape == shape
    for part in (splits.train, splits.val, splits.test):
        images, labels = part.tensors
        assert images.dtype == torch.float32 and labels.dtype == torch.long
        assert tuple(images.shape[1:]) == shape

    # The test split is the official test set, in file order and with exact pixels (checks the CHW layout).
    test_x, test_y = splits.test.tensors
    assert np.array_equal(_denormalised(test_x, name), xt.reshape(len(yt), *shape))
    assert np.array_equal(test_y.numpy(), yt)

    # Train and val partition the official training set, each image keeping its own label.
    ids, labels = [], []
    for part in (splits.train, splits.val):
        images, lab = part.tensors
        pixels = _denormalised(images, name).reshape(len(lab), -1)
        ids.append(pixels[:, 0] * 256 + pixels[:, 1])
        labels.append(lab.numpy())
    ids_all, labels_all = np.concatenate(ids), np.concatenate(labels)
    assert np.array_equal(np.sort(ids_all), np.arange(n))
    assert np.array_equal(labels_all, y[ids_all])


def _tensors(split: Dataset) -> tuple[torch.Tensor, ...]:
    """A split's images and labels, stacked here from its items (an ImageFolder holds none in memory)."""
    if isinstance(split, TensorDataset):
        return split.tensors
    images, labels = zip(*(split[i] for i in range(len(split))))
    return torch.stack(images), torch.as_tensor(labels)


def _assert_same(a: Splits, b: Splits) -> None:
    for pa, pb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        for ta, tb in zip(_tensors(pa), _tensors(pb)):
            assert torch.equal(ta, tb)


def test_cifar10_reads_the_python_batches(tmp_path: Path, cifar_md5_ignored: None) -> None:
    x, y, xt, yt = write_cifar10(tmp_path, n_per_batch=20, n_test=30)
    splits = load_dataset("cifar10", data_dir=tmp_path, seed=0)
    assert splits.num_classes == 10
    _check_official(splits, "cifar10", x, y, xt, yt, (3, 32, 32))
    # Stratified: 10 % of 10 per class is one validation image per class.
    assert sorted(splits.val.tensors[1].tolist()) == list(range(10))

    _assert_same(splits, load_dataset("cifar10", data_dir=tmp_path, seed=0))
    other = load_dataset("cifar10", data_dir=tmp_path, seed=1)
    assert not torch.equal(splits.val.tensors[0], other.val.tensors[0])
    assert torch.equal(splits.test.tensors[0], other.test.tensors[0])


def test_cifar100_uses_fine_labels(tmp_path: Path, cifar_md5_ignored: None) -> None:
    x, y, xt, yt = write_cifar100(tmp_path, n_train=1000, n_test=200)
    splits = load_dataset("cifar100", data_dir=tmp_path, seed=3)
    assert splits.num_classes == 100
    _check_official(splits, "cifar100", x, y, xt, yt, (3, 32, 32))
    assert sorted(splits.val.tensors[1].tolist()) == list(range(100))
    assert sorted(torch.cat([splits.train.tensors[1], splits.val.tensors[1]]).tolist()) == sorted(y.tolist())
    _assert_same(splits, load_dataset("cifar100", data_dir=tmp_path, seed=3))


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_reads_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    x, y, xt, yt = write_mnist_like(tmp_path, folder, n_train=100, n_test=40)
    splits = load_dataset(name, data_dir=tmp_path, seed=0)
    assert splits.num_classes == 10
    _check_official(splits, name, x, y, xt, yt, (1, 28, 28))
    assert sorted(splits.val.tensors[1].tolist()) == list(range(10))
    _assert_same(splits, load_dataset(name, data_dir=tmp_path, seed=0))


def _write_pngs(directory: Path, classes: dict[str, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (directory / cls).mkdir(parents=True)
        for i in range(count):
            # Odd, non-square sizes and some grayscale files: the loader must resize and convert to RGB.
            if i % 3 == 0:
                img = Image.fromarray(rng.integers(0, 256, size=(10, 14), dtype=np.uint8), mode="L")
            else:
                img = Image.fromarray(rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8), mode="RGB")
            img.save(directory / cls / f"{i}.png")


def test_imagefolder_splits_train_when_alone(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"cat": 10, "dog": 10, "frog": 10}, seed=0)
    splits = load_dataset("imagefolder", data_dir=tmp_path, seed=0)
    assert splits.num_classes == 3
    assert splits.input_shape == (3, 32, 32)
    assert splits.sizes() == (24, 3, 3)
    assert sorted(_tensors(splits.val)[1].tolist()) == [0, 1, 2]
    assert sorted(_tensors(splits.test)[1].tolist()) == [0, 1, 2]
    assert not isinstance(splits.train, TensorDataset)
    train_x = _tensors(splits.train)[0]
    assert train_x.shape == (24, 3, 32, 32)
    # Normalised with the train split's own statistics.
    assert torch.allclose(train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train_x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    _assert_same(splits, load_dataset("imagefolder", data_dir=tmp_path, seed=0))
    assert load_imagefolder(data_dir=tmp_path, image_size=16).input_shape == (3, 16, 16)


def test_imagefolder_uses_val_and_test_folders_with_train_class_indices(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"a": 4, "b": 4, "c": 4}, seed=1)
    _write_pngs(tmp_path / "val", {"b": 2, "c": 1}, seed=2)
    _write_pngs(tmp_path / "test", {"c": 2}, seed=3)
    splits = load_dataset("imagefolder", data_dir=tmp_path, seed=0)
    assert splits.sizes() == (12, 3, 2)
    assert _tensors(splits.val)[1].tolist() == [1, 1, 2]
    assert _tensors(splits.test)[1].tolist() == [2, 2]

    _write_pngs(tmp_path / "test", {"zebra": 1}, seed=4)
    with pytest.raises(AutopruneError, match="classes missing from train/: zebra"):
        load_dataset("imagefolder", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
    ],
)
def test_missing_files_fail_with_one_line_naming_dataset_and_dir(tmp_path: Path, name: str, where: str) -> None:
    with pytest.raises(AutopruneError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message
    assert str(tmp_path / where) in message
    assert "AUTOPRUNE_DOWNLOAD=1" in message


def test_imagefolder_without_train_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(AutopruneError, match=r"needs .*train/<class>/<image>"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_missing_torchvision_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail exactly as if torchvision were not installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(AutopruneError) as info:
        load_dataset("mnist")
    assert str(info.value) == f"dataset: 'mnist' needs torchvision: {PIP_HINT}"


def test_import_completes_a_partly_defined_op_library() -> None:
    # Another library may already have defined one of the two schemas; the fallback must add only the other.
    code = (
        "import torch\n"
        "lib = torch.library.Library('torchvision', 'FRAGMENT')\n"
        "try:\n"
        "    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "except RuntimeError:\n"
        "    pass  # torchvision's compiled ops loaded here after all\n"
        "from autoprune.vision import import_torchvision\n"
        "tv = import_torchvision()\n"
        "assert import_torchvision() is tv\n"
        "assert hasattr(torch.ops.torchvision, 'qnms')\n"
        "print(tv.transforms.Resize((4, 4))(torch.zeros(3, 8, 8)).shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([3, 4, 4])"



def test_a_torchvision_built_for_another_torch_is_one_line_naming_both(tmp_path: Path) -> None:
    # torchvision pins the torch release it was built for; pretend the installed one pins another.
    code = (
        "import importlib.metadata, sys\n"
        "real = importlib.metadata.requires\n"
        "importlib.metadata.requires = lambda name: ['torch (==2.99.0)'] if name == 'torchvision' else real(name)\n"
        "from autoprune.cli import main\n"
        "sys.exit(main(['cost', '--model', 'torchvision.models:resnet18', '--input', '3x32x32']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    import torch

    installed = torch.__version__.split("+")[0]
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: --model: 'torchvision.models:resnet18' needs a torchvision that matches torch: torchvision "
        f"{importlib.metadata.version('torchvision')} is built for torch 2.99.0, but torch {installed} is installed: "
        f"pip install the torchvision of torch {installed}"
    ]


def test_a_torchvision_model_reference_imports_through_the_op_fallback(tmp_path: Path) -> None:
    from autoprune.models import build_model

    model = build_model("torchvision.models:squeezenet1_0")
    assert sum(p.numel() for p in model.parameters()) == 1_248_424  # torchvision's published parameter count
