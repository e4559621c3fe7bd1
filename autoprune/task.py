"""A task: a model with its weights, its data, its metric and loss, and the device it runs on.

Two kinds share one type. A built-in task (``Task(TaskSpec(...))``) names a dataset and a zoo model and
trains its base model once (cached under the spec's key). A user task (``Task.from_model``) wraps a model
*with its trained weights*: nothing is trained, the base metric is the metric of those weights, and the
training-time S/N the priors need comes from a short, recorded fine-tune of a copy (or is recorded as absent).

Every split is read through a DataLoader, so a split never needs to fit in memory as one tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autoprune.data import Splits, load_dataset
from autoprune.device import device_of, resolve_device, to_device
from autoprune.errors import AutopruneError
from autoprune.files import atomic_path, cache_root, write_atomic
from autoprune.models import build_model, check_products, check_supported, convert_model, default_input_shape

Metric = Callable[[nn.Module, Iterable[Any]], float]
Loss = Callable[[nn.Module, Any], torch.Tensor]
DistillLoss = Callable[[nn.Module, nn.Module, Any], torch.Tensor]
"""``distill_loss(student, teacher, batch)``: a user task's own fine-tuning loss with its float teacher."""
# The short fine-tune that measures a given model's S/N: few steps, small lr, so the weights barely move.
SIGNAL_STEPS = 200
SIGNAL_LR = 1e-3
SIGNAL_EPOCHS = 4

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


def seeded_loader(dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool = True, device: torch.device | None = None, num_workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    pin = device is not None and device.type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, pin_memory=pin)


def cycle(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


class DeviceLoader:
    """A loader whose batches arrive on the task's device, so a user's metric or loss never moves data itself."""

    def __init__(self, loader: Iterable[Any], device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.dataset = getattr(loader, "dataset", None)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the first item of an ``(x, y, ...)`` batch, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy in percent over ``(x, y)`` batches: the default metric."""
    correct = total = 0
    device = device_of(model)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(1, total)


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default fine-tuning loss, on ``(x, y)`` batches."""
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(model(x), y)


def distilled_cross_entropy(student: nn.Module, teacher: nn.Module, batch: Any, *, temperature: float, weight: float) -> torch.Tensor:
    """(1 - weight) x cross-entropy + weight x T^2 KL(teacher || student) on soft targets at temperature T
    (Hinton et al. 2015): the T^2 keeps the soft term's gradients on the scale of the hard one's."""
    x, y = batch[0], batch[1]
    logits = student(x)
    with torch.no_grad():
        soft = nn.functional.log_softmax(teacher(x).float() / temperature, dim=-1)
    kl = nn.functional.kl_div(nn.functional.log_softmax(logits.float() / temperature, dim=-1), soft, reduction="batchmean", log_target=True)
    return (1 - weight) * nn.functional.cross_entropy(logits, y) + weight * temperature**2 * kl


def accuracy(model: nn.Module, data: Dataset | Iterable[Any], *, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of a dataset (read in batches) or of a loader, on the model's device."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size) if isinstance(data, Dataset) else data
    return top1_accuracy(model, loader)


def train(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    *,
    seed: int,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
    description: str = "train",
    device: torch.device | None = None,
) -> nn.Module:
    """SGD with momentum and cosine annealing (the schedule of seed 000 sec. 2.3), on ``device``; returns on the CPU."""
    from tqdm.auto import tqdm

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model.to(device)
    loader = seeded_loader(dataset, batch_size=settings.batch_size, seed=seed, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(settings.epochs), desc=description, disable=not progress, unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        for cb in callbacks:
            cb.on_epoch_start(model, epoch)
        for step, batch in enumerate(loader):
            x, y = to_device(batch, device)
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
    return model.cpu()


@dataclass
class BaseModel:
    """The base model of a task (on the CPU) and what is known about it; the metric is the task's."""

    model: nn.Module
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    cache_path: Path | None
    from_cache: bool
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class _UserParts:
    """What a user task brings instead of a spec: the model with its weights, metric and loss."""

    model: nn.Module
    metric: Metric
    loss: Loss
    reference: str | None
    signal_steps: int
    signal_lr: float
    distill_loss: DistillLoss | None = None
    no_signals_reason: str = "signal_steps=0: no S/N fine-tune was asked for, so no S/N prior is enqueued"
    # How another process rebuilds the task when no reference does (``weights_task``'s model, weights, dataset).
    description: dict[str, Any] | None = None


# Tasks built in this process without a reference, by their record's key: a study's export or resume in
# the same Python session finds them; another process cannot, and says so.
_SESSION_TASKS: dict[str, "Task"] = {}


class Task:
    """A model with its weights, data splits, metric, loss and device.

    ``Task(spec)`` is a built-in task whose ``base()`` trains once and caches under the spec's key;
    ``Task.from_model(...)`` wraps a trained model of the user's, whose ``base()`` is those weights.
    """

    def __init__(self, spec: TaskSpec | None = None, *, device: str | torch.device | None = None, val_samples: int | None = None, bf16: bool = False, num_workers: int = 0) -> None:
        self.spec: TaskSpec | None = spec or TaskSpec()
        self.metric_name = "accuracy"
        self._user: _UserParts | None = None
        self._base: BaseModel | None = None
        self.configure(device=device, val_samples=val_samples, bf16=bf16, num_workers=num_workers)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        train: Dataset | DataLoader,
        val: Dataset | DataLoader,
        test: Dataset | DataLoader | None = None,
        input_shape: Sequence[int] | None = None,
        metric: Metric | None = None,
        metric_name: str = "accuracy",
        loss: Loss | None = None,
        example_input: torch.Tensor | None = None,
        reference: str | None = None,
        signal_steps: int = SIGNAL_STEPS,
        signal_lr: float = SIGNAL_LR,
        device: str | torch.device | None = None,
        distill_loss: DistillLoss | None = None,
    ) -> "Task":
        """A task around a trained model: nothing is trained, the given weights are the base model.

        ``metric(model, loader) -> float`` is higher-is-better (default top-1 accuracy in percent), and
        ``loss(model, batch) -> Tensor`` drives fine-tuning (default cross-entropy on ``(x, y)``); both get
        batches already on the task's device. ``reference`` (``package.module:function`` returning this
        task) lets worker processes and Ray nodes rebuild it. ``signal_steps`` fine-tune steps at
        ``signal_lr`` measure the training-time S/N for the priors; 0 records that there are none.
        Fine-tuning distils from the float model (``Policy.distill``) when the outputs are class logits, which
        the default loss implies; with a loss of your own, give ``distill_loss(student, teacher, batch)`` to
        distil, or fine-tuning uses your loss alone.
        """
        if not isinstance(model, nn.Module):
            raise AutopruneError("model", type(model).__name__, "is not a torch.nn.Module")
        if not isinstance(metric_name, str) or not metric_name.isidentifier() or not metric_name.islower():
            raise AutopruneError("metric_name", metric_name, "must be a lower-case identifier (it names objectives and constraints)")
        if not _is_int(signal_steps) or signal_steps < 0:
            raise AutopruneError("signal_steps", signal_steps, "must be 0 (no priors) or a positive number of steps")
        if not isinstance(signal_lr, (int, float)) or isinstance(signal_lr, bool) or not signal_lr > 0 or not math.isfinite(signal_lr):
            raise AutopruneError("signal_lr", signal_lr, "must be a positive number")
        for name, function in (("metric", metric), ("loss", loss)):
            if function is not None and not callable(function):
                raise AutopruneError(name, function, f"must be a function ({'metric(model, loader) -> float' if name == 'metric' else 'loss(model, batch) -> Tensor'})")
        for name, split in (("train", train), ("val", val), ("test", test)):
            if split is not None:
                _check_split(name, split)
        if input_shape is not None and (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape or not all(_is_int(d) and d > 0 for d in input_shape)):
            raise AutopruneError("input_shape", input_shape, "must be the positive integer sizes of one sample, e.g. (3, 32, 32) or (1, 40)")
        if example_input is not None and not isinstance(example_input, torch.Tensor):
            raise AutopruneError("example_input", type(example_input).__name__, "must be a tensor (a batch of one or more samples)")
        if reference is not None and (not isinstance(reference, str) or reference.count(":") != 1):
            raise AutopruneError("reference", reference, "must be 'package.module:function' (a function returning this task)")
        task = cls.__new__(cls)
        task.spec = None
        task.metric_name = metric_name
        task._base = None
        # A CPU copy: the user's module is never moved or changed, and the cost model reads the copy.
        base = convert_model(copy.deepcopy(model)).cpu().eval()
        check_supported(base)
        if distill_loss is not None and not callable(distill_loss):
            raise AutopruneError("distill_loss", type(distill_loss).__name__, "must be a function (student, teacher, batch) -> loss")
        task._user = _UserParts(base, metric or top1_accuracy, loss or cross_entropy, reference, signal_steps, signal_lr, distill_loss)
        test = val if test is None else test
        shape = tuple(input_shape) if input_shape is not None else _infer_input_shape(example_input, train)
        # A product autoprune cannot see is refused here, before a search traces the model's channel groups.
        check_products(base, input_shape=shape)
        task.__dict__["splits"] = Splits(train, val, test, None, shape)  # type: ignore[arg-type]
        task.configure(device=device)
        _SESSION_TASKS[task.key()] = task
        return task

    def configure(self, *, device: str | torch.device | None = None, val_samples: int | None = None, bf16: bool = False, num_workers: int = 0) -> "Task":
        """Where and how the task runs; none of it changes results beyond floating-point order."""
        self.device = device  # type: ignore[assignment] - resolved by the property
        self.val_samples = val_samples
        self.bf16 = bf16
        self.num_workers = num_workers
        return self

    # Settings a user may also assign (``task.val_samples = 200``): checked when set, as configure checks them,
    # so that a bad one is refused before any work rather than met in the middle of a search.

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, value: str | torch.device | None) -> None:
        self._device = resolve_device(value)

    @property
    def val_samples(self) -> int | None:
        return self._val_samples

    @val_samples.setter
    def val_samples(self, value: int | None) -> None:
        if value is not None and (not _is_int(value) or value < 1):
            raise AutopruneError("val_samples", value, "must be a positive number of samples (or None for the whole split)")
        self._val_samples = value

    @property
    def bf16(self) -> bool:
        return self._bf16

    @bf16.setter
    def bf16(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise AutopruneError("bf16", value, "must be True or False")
        self._bf16 = value

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        if not _is_int(value) or value < 0:
            raise AutopruneError("num_workers", value, "must be 0 or more")
        self._num_workers = value

    @property
    def is_user(self) -> bool:
        return self._user is not None

    # --- data -----------------------------------------------------------------------------------

    @cached_property
    def splits(self) -> Splits:
        assert self.spec is not None
        data_dir = Path(self.spec.data_dir) if self.spec.data_dir else None
        return load_dataset(self.spec.dataset, seed=self.spec.seed, data_dir=data_dir)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits.input_shape

    def loader(self, split: str, *, batch_size: int = 64, shuffle: bool = False, seed: int = 0, full: bool = True) -> DeviceLoader:
        """Batches of a split on the task's device; ``full=False`` limits val to its fixed search subset.

        A user's DataLoader keeps its own batching and order; a dataset is batched here, with pinned memory on CUDA.
        """
        source = getattr(self.splits, split)
        if isinstance(source, DataLoader):
            if full or self.val_samples is None or split != "val":
                return DeviceLoader(source, self.device)
            subset = Subset(source.dataset, self._subset_indices(len(source.dataset)))  # type: ignore[arg-type]
            return DeviceLoader(DataLoader(subset, batch_size=source.batch_size, collate_fn=source.collate_fn, num_workers=source.num_workers, pin_memory=source.pin_memory), self.device)
        if not full and self.val_samples is not None and split == "val":
            source = Subset(source, self._subset_indices(len(source)))
        return DeviceLoader(seeded_loader(source, batch_size=batch_size, seed=seed, shuffle=shuffle, device=self.device, num_workers=self.num_workers), self.device)

    def scored_samples(self, split: str = "val", *, full: bool = False) -> int | None:
        """How many samples ``evaluate(split, full=full)`` scores (its confidence interval's n); None when
        a user's loader does not say."""
        source = getattr(self.splits, split)
        dataset = source.dataset if isinstance(source, DataLoader) else source
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:  # an iterable dataset has no length
            return None
        return size if full or self.val_samples is None or split != "val" else min(size, self.val_samples)

    @property
    def metric_is_accuracy(self) -> bool:
        """The metric is top-1 accuracy in percent (a proportion of samples: it has a Wilson interval)."""
        return self._user is None or self._user.metric is top1_accuracy

    def _subset_indices(self, size: int) -> list[int]:
        # Fixed by the seed alone, so every trial and every process scores on the same samples.
        order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
        return sorted(order[: self.val_samples].tolist())

    # --- model, metric, loss --------------------------------------------------------------------

    def build(self) -> nn.Module:
        """A fresh model of the task's architecture (a copy with the given weights, for a user task)."""
        if self._user is not None:
            return copy.deepcopy(self._user.model)
        assert self.spec is not None
        torch.manual_seed(self.spec.seed)
        model = build_model(self.spec.model, num_classes=self.splits.num_classes or 10, in_channels=self.input_shape[0])
        check_supported(model)
        return model

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self._user is None:
            return cross_entropy(model, batch)
        from autoprune.usercode import call_user, reference_of

        loss = self._user.loss
        value = loss(model, batch) if loss is cross_entropy else call_user("loss", reference_of(loss), loss, model, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise AutopruneError("loss", reference_of(loss), f"returned {_what(value)}: it must return a scalar tensor")
        return value

    @property
    def distills(self) -> bool:
        """Whether fine-tuning can distil from a teacher: a built-in task or the default loss (class logits),
        or a user task with its own distillation loss."""
        return self._user is None or self._user.loss is cross_entropy or self._user.distill_loss is not None

    def fine_tune_loss(self, model: nn.Module, batch: Any, *, teacher: nn.Module | None, temperature: float, weight: float) -> torch.Tensor:
        """The fine-tuning loss: the task's own, or with ``teacher`` the distillation loss (the user's, else
        cross-entropy and soft targets of the class logits)."""
        if teacher is None or not self.distills:
            return self.loss(model, batch)
        if self._user is not None and self._user.distill_loss is not None:
            return self._user.distill_loss(model, teacher, batch)
        return distilled_cross_entropy(model, teacher, batch, temperature=temperature, weight=weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val", *, full: bool = False) -> float:
        """The task's metric of ``model`` on a split, on the task's device; the model returns where it was.

        ``full=False`` scores val on the fixed search subset (``val_samples``); export scores the full split.
        """
        home = device_of(model)
        was_training = model.training
        model.to(self.device).eval()
        try:
            loader = self.loader(split, batch_size=512, full=full)
            metric = self._user.metric if self._user is not None else top1_accuracy
            if metric is top1_accuracy:
                return float(metric(model, loader))
            from autoprune.usercode import call_user, reference_of

            value = call_user("metric", reference_of(metric), metric, model, loader)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise AutopruneError("metric", reference_of(metric), f"returned {_what(value)}: it must return a number (higher is better)")
            return float(value)
        finally:
            model.train(was_training)
            model.to(home)

    # --- identity -------------------------------------------------------------------------------

    def key(self) -> str:
        if self._user is None:
            assert self.spec is not None
            return self.spec.key()
        model = type(self._user.model)
        return self._user.reference or f"python:{model.__module__}.{model.__qualname__}:{self.metric_name}"

    def record(self) -> dict[str, Any]:
        """A JSON description from which another process rebuilds the task (``task_from_record``).

        It carries the scoring subset and bf16 when set (they change trial metrics, so every worker must
        share them), never the device, which is each process's own.
        """
        if self._user is None:
            assert self.spec is not None
            data = asdict(self.spec)
        elif self._user.description is not None:
            data = dict(self._user.description)
        else:
            data = {"reference": self._user.reference, "session": self.key(), "metric": self.metric_name, "input_shape": list(self.input_shape)}
        # only when set, so that a study recorded without them resumes with the same identity
        return {**data, **({"val_samples": self.val_samples} if self.val_samples is not None else {}), **({"bf16": True} if self.bf16 else {})}

    def cache_dir(self) -> Path:
        assert self.spec is not None
        return cache_root() / f"{self.spec.dataset}-{self.spec.model.replace(':', '_')}-{self.spec.key()}"

    # --- the base model -------------------------------------------------------------------------

    def base(self, *, progress: bool = True, callbacks: Sequence[TrainingCallback] = ()) -> BaseModel:
        """The base model: the given weights of a user task, or the built-in model from the cache or trained now.

        Built-in training always records the training-time S/N (seed 000 eq. 5) with the validation accuracy
        per epoch, so every cached model carries what the warm-start priors need, whoever trained it first.
        """
        if self._user is not None:
            if self._base is None:
                self._base = self._given_base()
            return self._base
        return self._trained_base(progress=progress, callbacks=callbacks)

    def skip_signals(self, *, reason: str) -> None:
        """No S/N fine-tune for a user task: its base record then says the priors are absent, and why."""
        if self._user is not None and self._base is None:
            self._user.signal_steps = 0
            self._user.no_signals_reason = reason

    def _given_base(self) -> BaseModel:
        assert self._user is not None
        model = self._user.model
        val, test = self.evaluate(model, "val"), self.evaluate(model, "test")
        for split, value in (("val", val), ("test", test)):
            if not math.isfinite(value):
                from autoprune.usercode import reference_of

                raise AutopruneError("metric", reference_of(self._user.metric), f"gives {value} for the given model on {split}: it must give a finite number, or no trial could be ranked")
        return BaseModel(model, val, test, 0.0, None, False, self.signal_record(model))

    def signal_record(self, model: nn.Module) -> dict[str, Any]:
        """S/N per layer from a short fine-tune of a copy of ``model`` (seed 000 eq. 5), or why there is none."""
        from autoprune.signals import SignalTracker

        assert self._user is not None
        steps, lr = self._user.signal_steps, self._user.signal_lr
        if steps == 0:
            return {"priors": {"source": "none", "reason": self._user.no_signals_reason}}
        tuned = copy.deepcopy(model).to(self.device)
        tracker = SignalTracker(every=1, val_accuracy=lambda m: self.evaluate(m, "val"))
        optimizer = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=0.9)
        batches = cycle(self.loader("train", shuffle=True, seed=0))
        per_epoch = math.ceil(steps / SIGNAL_EPOCHS)
        torch.manual_seed(0)
        for epoch in range(SIGNAL_EPOCHS):
            tuned.train()
            tracker.on_epoch_start(tuned, epoch)
            for step in range(min(per_epoch, steps - epoch * per_epoch)):
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(tuned, next(batches))
                if not math.isfinite(loss.item()):
                    raise AutopruneError("signal_lr", lr, f"makes the S/N fine-tune diverge (loss {loss.item()} at step {epoch * per_epoch + step})")
                loss.backward()
                optimizer.step()
                tracker.on_step(tuned, epoch, step)
            tracker.on_epoch_end(tuned, epoch)
        return {**tracker.export(), "priors": {"source": "finetune", "steps": steps, "lr": lr, "epochs": SIGNAL_EPOCHS}}

    def _trained_base(self, *, progress: bool, callbacks: Sequence[TrainingCallback]) -> BaseModel:
        from safetensors.torch import load_file, save_file

        assert self.spec is not None
        directory = self.cache_dir()
        weights, meta_path = directory / "model.safetensors", directory / "meta.json"
        model = self.build()
        if self.splits.keep is not None:
            self.splits.keep()
        if weights.is_file() and meta_path.is_file():
            model.load_state_dict(load_file(weights))
            model.eval()
            meta = json.loads(meta_path.read_text())
            return BaseModel(model, meta["val_accuracy"], meta["test_accuracy"], meta["train_seconds"], directory, True, meta.get("extras", {}))
        from autoprune.signals import SignalTracker

        callbacks = [SignalTracker(every=1, val_accuracy=lambda m: accuracy(m, self.splits.val)), *callbacks]
        start = time.perf_counter()
        train(model, self.splits.train, self.spec.train, seed=self.spec.seed, callbacks=callbacks, progress=progress, description=f"train {self.spec.model}", device=self.device)
        seconds = time.perf_counter() - start
        extras: dict[str, Any] = {}
        for cb in callbacks:
            export = getattr(cb, "export", None)
            if export is not None:
                extras.update(export())
        val_acc, test_acc = accuracy(model, self.splits.val), accuracy(model, self.splits.test)
        directory.mkdir(parents=True, exist_ok=True)
        # Weights first, metadata last: a crash in between leaves no meta.json, so nothing half-cached is trusted.
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        meta = {"spec": asdict(self.spec), "val_accuracy": val_acc, "test_accuracy": test_acc, "train_seconds": seconds, "extras": extras}
        write_atomic(meta_path, json.dumps(meta, indent=2))
        return BaseModel(model, val_acc, test_acc, seconds, directory, False, extras)


# Zoo models whose dataset and base training differ from the digits defaults.
MODEL_DATASETS = {"mnist1d_cnn": "mnist1d", "mnist1d_gru": "mnist1d", "mnist1d_transformer": "mnist1d"}
MODEL_TRAINING = {"mnist1d_cnn": TrainSettings(epochs=20), "mnist1d_gru": TrainSettings(epochs=20), "mnist1d_transformer": TrainSettings(epochs=20)}


def check_reads_input(model: nn.Module, input_shape: Sequence[int], *, field: str, value: Any, what: str) -> None:
    """One forward pass of two zero samples of ``input_shape``: a model that cannot read its task's input
    (a 32x32 zoo model on 8x8 digits) is refused in one line now, not met as a traceback inside training."""
    from autoprune.models import probing

    try:
        with probing(model):
            model(torch.zeros(2, *input_shape))
    except Exception as exc:  # noqa: BLE001 - a shape mismatch raises RuntimeError, a user's forward anything
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AutopruneError(field, value, f"cannot read {what} of shape {'x'.join(map(str, input_shape))} ({reason})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _what(value: Any) -> str:
    """A returned value as an error line names it: its type, and the value when short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def _check_split(name: str, split: Any) -> None:
    """A split is a Dataset or a DataLoader (or any iterable of batches) holding at least one sample: an
    empty one would end fine-tuning with a bare StopIteration, or score every model 0."""
    if isinstance(split, (str, bytes)) or not hasattr(split, "__iter__") and not hasattr(split, "__getitem__"):
        raise AutopruneError(name, type(split).__name__, "must be a Dataset or a DataLoader")
    dataset = split.dataset if isinstance(split, DataLoader) else split
    try:
        empty = len(dataset) == 0  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset has no length: its first batch says
        try:
            next(iter(split))
            empty = False
        except StopIteration:
            empty = True
    if empty:
        raise AutopruneError(name, f"{type(dataset).__name__} of 0 samples", "is empty: every split needs samples")


def _infer_input_shape(example_input: torch.Tensor | None, train: Any) -> tuple[int, ...]:
    """The shape of one sample: from ``example_input`` (a batch of one or more) or the first training batch."""
    if example_input is None:
        first = next(iter(train), None)
        if first is None:
            raise AutopruneError("train", type(train).__name__, "is empty: every split needs samples")
        x = batch_inputs(first)
        if not isinstance(x, torch.Tensor):
            raise AutopruneError("input_shape", None, "cannot be inferred: a batch's input is not a tensor (pass input_shape=)")
        # A dataset yields one sample, a DataLoader a batch.
        return tuple(x.shape[1:]) if isinstance(train, DataLoader) else tuple(x.shape)
    return tuple(example_input.shape[1:])


def task_from_reference(reference: str, *, field: str = "--task") -> Task:
    """Call ``package.module:function`` and check that it returned a Task; the reference is kept for workers.
    What the function raises is the user's, named by the reference (``usercode.UserCodeError``)."""
    from autoprune.usercode import call_user, load_reference

    task = call_user(field, reference, load_reference(reference, field=field))
    if not isinstance(task, Task):
        raise AutopruneError(field, reference, f"returned {type(task).__name__}, not an autoprune.Task")
    if task._user is not None and task._user.reference is None:
        task._user.reference = reference
    return task


def task_from_record(data: dict[str, Any], *, device: str | None = None) -> Task:
    """The task a study's record describes: a built-in spec, a reference to import, or a task of this session.

    ``device`` is this process's (default: the task's own, CUDA when available); the scoring subset and bf16
    come from the record.
    """
    data = dict(data)
    val_samples, bf16 = data.pop("val_samples", None), bool(data.pop("bf16", False))
    task = _task_of_record(data)
    return task.configure(device=device if device is not None else task.device, val_samples=val_samples, bf16=bf16, num_workers=task.num_workers)


def _task_of_record(data: dict[str, Any]) -> Task:
    if "weights" in data:
        return weights_task(data["model"], weights=data["weights"], dataset=data["dataset"], data_dir=data["data_dir"], seed=data["seed"], signal_steps=data["signal_steps"])
    if "session" in data:
        if data.get("reference"):
            return task_from_reference(data["reference"])
        task = _SESSION_TASKS.get(data["session"])
        if task is None:
            raise AutopruneError("task", data["session"], "was defined in another Python session without reference=; pass reference='package.module:function' so other processes can rebuild it")
        return task
    return Task(TaskSpec(**{**data, "train": TrainSettings(**data["train"])}))


def model_task(model: str, *, weights: str | Path, train: Any, val: Any, test: Any = None, num_classes: int = 10, input_shape: Sequence[int] | None = None, **kwargs: Any) -> Task:
    """A user task for a zoo or ``package.module:factory`` model with the user's weights file and data."""
    from autoprune.weights import load_weights

    if input_shape is None:
        input_shape = default_input_shape(model)
    in_channels = input_shape[0] if input_shape else None
    net = load_weights(build_model(model, num_classes=num_classes, in_channels=in_channels, convert=False), weights)
    return Task.from_model(net, train=train, val=val, test=test, input_shape=input_shape, **kwargs)


def weights_task(model: str, *, weights: str | Path, dataset: str | None = None, data_dir: str | None = None, seed: int = 0, signal_steps: int = SIGNAL_STEPS, device: str | None = None) -> Task:
    """CLI ``--model M --weights FILE``: the user's weights on a built-in dataset's splits, nothing trained.

    The task's record names the model, the weights file (absolute) and its SHA-256, so a worker rebuilds it
    and a study refuses to resume on other weights.
    """
    spec = task_for(model, dataset=dataset, data_dir=data_dir, seed=seed).spec
    assert spec is not None
    splits = Task(spec, device="cpu").splits
    path = Path(weights).resolve()
    task = model_task(model, weights=path, train=splits.train, val=splits.val, test=splits.test, num_classes=splits.num_classes or 10, input_shape=splits.input_shape, signal_steps=signal_steps, device=device)
    assert task._user is not None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    task._user.description = {"model": model, "weights": str(path), "sha256": digest, "dataset": spec.dataset, "data_dir": data_dir, "seed": seed, "signal_steps": signal_steps}
    return task


def cli_task(*, model: str, weights: str | Path | None = None, task: str | None = None, dataset: str | None = None, data_dir: str | None = None, seed: int = 0, epochs: int | None = None, device: str | None = None, val_samples: int | None = None, bf16: bool = False) -> Task:
    """The task the CLI's flags describe: ``--task module:function``, ``--model --weights``, or a built-in one.

    The device is checked here (``--device``), before any data is read or any model trained.
    """
    resolve_device(device, field="--device")
    if task is not None:
        if weights is not None:
            raise AutopruneError("--weights", str(weights), "cannot go with --task (the task brings its own weights)")
        built = task_from_reference(task)
        built.device = resolve_device(device, field="--device") if device is not None else built.device
    elif weights is not None:
        built = weights_task(model, weights=weights, dataset=dataset, data_dir=data_dir, seed=seed, device=device)
    else:
        built = task_for(model, dataset=dataset, data_dir=data_dir, seed=seed, epochs=epochs)
        built.device = resolve_device(device, field="--device")
        assert built.spec is not None
        check_reads_input(built.build(), built.input_shape, field="model", value=model, what=f"the {built.spec.dataset} input")
    if val_samples is not None or bf16:
        built.configure(device=str(built.device), val_samples=val_samples if val_samples is not None else built.val_samples, bf16=bf16 or built.bf16, num_workers=built.num_workers)
    return built


def task_for(model: str, *, dataset: str | None = None, data_dir: str | None = None, seed: int = 0, epochs: int | None = None) -> Task:
    """The task a CLI user means: MNIST-1D for its CNN, digits for the digits CNN, CIFAR-10 for the 32x32 zoo models."""
    if dataset is None:
        shape = default_input_shape(model)
        dataset = MODEL_DATASETS.get(model) or ("cifar10" if shape == (3, 32, 32) else "digits")
    train_settings = MODEL_TRAINING.get(model, TrainSettings())
    if epochs is not None:
        train_settings = replace(train_settings, epochs=epochs)
    return Task(TaskSpec(dataset=dataset, model=model, data_dir=data_dir, seed=seed, train=train_settings))
