"""A task bundles a dataset's splits with a model factory, and trains the base model once (cached)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.data import Splits, load_dataset
from autoprune.models import build_model, check_supported, default_input_shape

CACHE_ENV = "AUTOPRUNE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, ".autoprune/cache"))


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64


@dataclass(frozen=True)
class TaskSpec:
    dataset: str = "digits"
    model: str = "digits_cnn"
    data_dir: str | None = None
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)

    def key(self) -> str:
        """Changes whenever anything that shapes the trained weights changes."""
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class TrainingCallback(Protocol):
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...
    def on_step(self, model: nn.Module, epoch: int, step: int) -> None: ...
    def on_epoch_end(self, model: nn.Module, epoch: int) -> None: ...


def seeded_loader(dataset: TensorDataset, *, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / max(1, len(dataset))


def train(
    model: nn.Module,
    dataset: TensorDataset,
    settings: TrainSettings,
    *,
    seed: int,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
    description: str = "train",
) -> nn.Module:
    """SGD with momentum and cosine annealing (the schedule of seed 000 sec. 2.3)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    loader = seeded_loader(dataset, batch_size=settings.batch_size, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(settings.epochs), desc=description, disable=not progress, unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        for cb in callbacks:
            cb.on_epoch_start(model, epoch)
        for step, (x, y) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for cb in callbacks:
                cb.on_step(model, epoch, step)
        for cb in callbacks:
            cb.on_epoch_end(model, epoch)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


@dataclass
class BaseModel:
    """The trained base model of a task and what is known about it."""

    model: nn.Module
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    cache_path: Path
    from_cache: bool
    extras: dict[str, Any] = field(default_factory=dict)


class Task:
    """Dataset splits + model factory. ``base()`` trains once and caches under the spec's key."""

    def __init__(self, spec: TaskSpec | None = None) -> None:
        self.spec = spec or TaskSpec()

    @cached_property
    def splits(self) -> Splits:
        data_dir = Path(self.spec.data_dir) if self.spec.data_dir else None
        return load_dataset(self.spec.dataset, seed=self.spec.seed, data_dir=data_dir)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits.input_shape

    def build(self) -> nn.Module:
        torch.manual_seed(self.spec.seed)
        model = build_model(self.spec.model, num_classes=self.splits.num_classes, in_channels=self.input_shape[0])
        check_supported(model)
        return model

    def cache_dir(self) -> Path:
        return cache_root() / f"{self.spec.dataset}-{self.spec.model.replace(':', '_')}-{self.spec.key()}"

    def base(self, *, progress: bool = True, callbacks: Sequence[TrainingCallback] = ()) -> BaseModel:
        """The trained base model, from the cache or trained now.

        Training always records the training-time S/N (seed 000 eq. 5) with the validation accuracy per
        epoch, so every cached model carries what the warm-start priors need, whoever trained it first.
        """
        from safetensors.torch import load_file, save_file

        directory = self.cache_dir()
        weights, meta_path = directory / "model.safetensors", directory / "meta.json"
        model = self.build()
        if weights.is_file() and meta_path.is_file():
            model.load_state_dict(load_file(weights))
            model.eval()
            meta = json.loads(meta_path.read_text())
            return BaseModel(model, meta["val_accuracy"], meta["test_accuracy"], meta["train_seconds"], directory, True, meta.get("extras", {}))
        from autoprune.signals import SignalTracker

        callbacks = [SignalTracker(every=1, val_accuracy=lambda m: accuracy(m, self.splits.val)), *callbacks]
        start = time.perf_counter()
        train(model, self.splits.train, self.spec.train, seed=self.spec.seed, callbacks=callbacks, progress=progress, description=f"train {self.spec.model}")
        seconds = time.perf_counter() - start
        extras: dict[str, Any] = {}
        for cb in callbacks:
            export = getattr(cb, "export", None)
            if export is not None:
                extras.update(export())
        val_acc, test_acc = accuracy(model, self.splits.val), accuracy(model, self.splits.test)
        directory.mkdir(parents=True, exist_ok=True)
        # Weights first, metadata last: a crash in between leaves no meta.json, so nothing half-cached is trusted.
        tmp = directory / ".model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        meta = {"spec": asdict(self.spec), "val_accuracy": val_acc, "test_accuracy": test_acc, "train_seconds": seconds, "extras": extras}
        meta_tmp = directory / ".meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2))
        meta_tmp.replace(meta_path)
        return BaseModel(model, val_acc, test_acc, seconds, directory, False, extras)


# Zoo models whose dataset and base training differ from the digits defaults.
MODEL_DATASETS = {"mnist1d_cnn": "mnist1d"}
MODEL_TRAINING = {"mnist1d_cnn": TrainSettings(epochs=20)}


def task_for(model: str, *, dataset: str | None = None, data_dir: str | None = None, seed: int = 0, epochs: int | None = None) -> Task:
    """The task a CLI user means: MNIST-1D for its CNN, digits for the digits CNN, CIFAR-10 for the 32x32 zoo models."""
    if dataset is None:
        shape = default_input_shape(model)
        dataset = MODEL_DATASETS.get(model) or ("cifar10" if shape == (3, 32, 32) else "digits")
    train_settings = MODEL_TRAINING.get(model, TrainSettings())
    if epochs is not None:
        train_settings = replace(train_settings, epochs=epochs)
    return Task(TaskSpec(dataset=dataset, model=model, data_dir=data_dir, seed=seed, train=train_settings))
