"""The built-in datasets' arrays and splits are cached: a later process reads them without generating them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoprune.data import ARRAYS_VERSION, load_dataset
from autoprune.files import CACHE_ENV


def test_a_builtin_dataset_is_cached_whole_and_read_back_without_scikit_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = load_dataset("digits", seed=3)
    assert not list(tmp_path.iterdir()), "nothing is written before the task keeps the arrays"
    assert first.keep is not None
    first.keep()
    assert [p.name for p in (tmp_path / "data").iterdir()] == [f"digits-seed3-v{ARRAYS_VERSION}.npz"]

    code = "import sys; from autoprune.data import load_dataset; s = load_dataset('digits', seed=3); print(*s.sizes(), int(s.test.tensors[1].sum()), 'sklearn' in sys.modules)"
    read = subprocess.run([sys.executable, "-c", code], env={**os.environ, CACHE_ENV: str(tmp_path)}, capture_output=True, text=True, check=True)
    assert read.stdout.split() == [*map(str, first.sizes()), str(int(first.test.tensors[1].sum())), "False"]

    again = load_dataset("digits", seed=3)
    assert again.keep is None
    for split, cached in zip((first.train, first.val, first.test), (again.train, again.val, again.test)):
        assert all(torch.equal(a, b) for a, b in zip(split.tensors, cached.tensors))
    assert not torch.equal(load_dataset("digits", seed=4).test.tensors[1], first.test.tensors[1]), "the seed moves the split"


def test_an_unreadable_cached_file_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = tmp_path / "data" / f"digits-seed0-v{ARRAYS_VERSION}.npz"
    path.parent.mkdir()
    for damaged in (b"not an npz archive", b"PK\x03\x04 a zip archive cut short"):
        path.write_bytes(damaged)
        splits = load_dataset("digits", seed=0)
        assert splits.sizes() == (1077, 360, 360) and splits.keep is not None
    splits.keep()
    assert load_dataset("digits", seed=0).keep is None
