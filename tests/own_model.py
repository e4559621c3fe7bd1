"""A user's own model for the CLI tests, importable as ``own_model`` when ``tests/`` is on PYTHONPATH.

``small_cnn`` is the ``--model own_model:small_cnn`` factory; ``task`` is the ``--task own_model:task``
function, which reads its weights from ``OWN_MODEL_WEIGHTS`` (as a user's function reads its own config).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from autoprune.data import load_dataset
from autoprune.task import Task
from autoprune.weights import load_weights

WEIGHTS_ENV = "OWN_MODEL_WEIGHTS"


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def train_and_save(path: Path, *, steps: int = 150) -> Path:
    """A few SGD steps on the bundled digits, then the weights as safetensors: a user's trained checkpoint."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = small_cnn()
    train = load_dataset("digits", seed=0).train
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def task() -> Task:
    """The weights of ``OWN_MODEL_WEIGHTS`` on the digits splits, with a short S/N fine-tune."""
    splits = load_dataset("digits", seed=0)
    model = load_weights(small_cnn(), os.environ[WEIGHTS_ENV])
    return Task.from_model(model, train=splits.train, val=splits.val, test=splits.test, signal_steps=40)


def task_without_signals() -> Task:
    """``task`` with no S/N fine-tune: it has no training-time S/N record to show."""
    splits = load_dataset("digits", seed=0)
    model = load_weights(small_cnn(), os.environ[WEIGHTS_ENV])
    return Task.from_model(model, train=splits.train, val=splits.val, test=splits.test, signal_steps=0)
