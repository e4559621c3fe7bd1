"""Bad input through the Python API, as the CLI refuses it: one AutopruneError naming the argument and the
value, raised before anything is written in the working folder (no study database, no MLflow store)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
import autoprune.api
from autoprune.errors import AutopruneError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _task(**kwargs: Any) -> autoprune.Task:
    return autoprune.Task.from_model(_model(), train=_data(), val=_data(24), signal_steps=0, **kwargs)


def _search(task: autoprune.Task | None = None, **kwargs: Any) -> Callable[[], Any]:
    return lambda: autoprune.search(task or _task(), storage="sqlite:///study.db", tracking_uri="sqlite:///mlflow.db", priors=False, quiet=True, **kwargs)


def _with(attribute: str, value: Any) -> Callable[[], Any]:
    def call() -> Any:
        task = _task()
        setattr(task, attribute, value)
        return _search(task, trials=1)()

    return call


def _empty(split: str) -> Callable[[], Any]:
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    splits = {"train": _data(), "val": _data(24), split: empty if split != "loader" else DataLoader(empty)}
    if split == "loader":
        splits["train"] = splits.pop("loader")
    return lambda: autoprune.Task.from_model(_model(), **splits)


CASES: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "trials-a-string": (_search(trials="3"), ("trials", "'3'")),
    "trials-a-fraction": (_search(trials=1.5), ("trials", "1.5")),
    "trials-a-bool": (_search(trials=True), ("trials", "True")),
    "trials-zero": (_search(trials=0), ("trials", "0")),
    "an-unknown-argument": (_search(trails=3), ("trails", "not an argument of search")),
    "space-a-number": (_search(space=3), ("space", "3")),
    "timeout-not-finite": (_search(timeout=math.inf), ("timeout", "inf")),
    "fidelity-above-one": (_search(fidelity=2.0), ("fidelity", "2.0")),
    "study-with-a-slash": (_search(study="a/b"), ("study", "a/b")),
    "sampler-unknown": (_search(sampler="annealing"), ("sampler", "annealing")),
    "val-samples-negative": (_with("val_samples", -5), ("val_samples", "-5")),
    "val-samples-a-string": (_with("val_samples", "200"), ("val_samples", "'200'")),
    "bf16-a-string": (_with("bf16", "yes"), ("bf16", "'yes'")),
    "device-unknown": (_with("device", "tpu"), ("device", "tpu")),
    "empty-train-split": (_empty("train"), ("train", "empty")),
    "empty-val-split": (_empty("val"), ("val", "empty")),
    "empty-train-loader": (_empty("loader"), ("train", "empty")),
    "metric-not-callable": (lambda: _task(metric=3), ("metric", "3")),
    "input-shape-a-string": (lambda: _task(input_shape="1x6"), ("input_shape", "'1x6'")),
    "example-input-not-a-tensor": (lambda: _task(example_input=[1.0] * 6), ("example_input", "list")),
    "reference-not-a-reference": (lambda: _task(reference="my_task"), ("reference", "my_task")),
    "ray-options-a-number": (_search(executor="ray", ray=5), ("ray", "5")),
    "metric-returns-nan": (lambda: _search(_task(metric=lambda m, loader: float("nan"), metric_name="score"), trials=2)(), ("metric", "nan")),
    "metric-returns-a-string": (lambda: _search(_task(metric=lambda m, loader: "high", metric_name="score"), trials=2)(), ("metric", "str")),
    "metric-raises": (lambda: _search(_task(metric=lambda m, loader: 1 / 0, metric_name="score"), trials=2)(), ("metric", "ZeroDivisionError")),
    "apply-without-a-task": (lambda: autoprune.apply(_model(), {"layers": {"_default": {"w_bits": 4}}}), ("task", "required")),
    "apply-a-policy-of-a-number": (lambda: autoprune.apply(_model(), 5, task=_task()), ("policy", "5")),
    "cost-input-shape-a-string": (lambda: autoprune.cost(_model(), input_shape="6"), ("input_shape", "'6'")),
    "export-unknown-format": (lambda: autoprune.api.export("s", out="out", format="zip"), ("format", "zip")),
    "export-register-empty": (lambda: autoprune.api.export("s", out="out", format="onnx", register=""), ("register", "''")),
    "pareto-study-empty": (lambda: autoprune.api.pareto(""), ("study", "''")),
    "finalize-jobs-zero": (lambda: autoprune.api.finalize("s", jobs=0), ("jobs", "0")),
    "finalize-jobs-an-in-session-task": (lambda: autoprune.api.finalize("s", jobs=2, task=_task()), ("jobs", "2", "reference=")),
    "ui-port-zero": (lambda: autoprune.api.ui(port=0), ("port", "0")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_api_refuses_bad_input_before_any_work(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    call, needles = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AutopruneError) as caught:
        call()
    line = str(caught.value)
    assert "\n" not in line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"{name} wrote before refusing"


def test_a_task_setting_assigned_later_is_checked_as_configure_checks_it() -> None:
    task = _task()
    task.val_samples = 10
    assert task.val_samples == 10
    with pytest.raises(AutopruneError, match="val_samples"):
        task.val_samples = 0
    assert task.val_samples == 10


def test_sizes_and_counts_of_numpy_or_torch_types_are_taken_as_the_numbers_they_are() -> None:
    import numpy as np

    model = _model()
    assert autoprune.cost(model, input_shape=torch.Size([6])).to_dict()["total"]["macs"] == 6 * 8 + 8 * 3
    assert autoprune.cost(model, input_shape=(np.int64(6),)).to_dict()["total"]["macs"] == 6 * 8 + 8 * 3
    with pytest.raises(AutopruneError, match="input_shape"):
        autoprune.cost(model, input_shape=(6.5,))


def test_a_search_results_export_logs_to_the_store_its_search_tracked_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoprune.export as export_module
    from autoprune.api import SearchResult

    seen: dict[str, Any] = {}
    monkeypatch.setattr(export_module, "check_export", lambda out, **kwargs: seen.update(checked=kwargs["tracking_uri"]))
    monkeypatch.setattr(export_module, "export_study", lambda ctx, **kwargs: seen.update(exported=kwargs["tracking_uri"]))
    result = SearchResult(None, _task(), tracking_uri="sqlite:///searched.db")  # type: ignore[arg-type]
    result._context = object()  # type: ignore[assignment] - the search's context, which export_study would read
    result.export(tmp_path / "out", format="onnx")
    assert seen == {"checked": "sqlite:///searched.db", "exported": "sqlite:///searched.db"}
    result.export(tmp_path / "out", format="onnx", tracking_uri="sqlite:///other.db")
    assert seen["exported"] == "sqlite:///other.db"


@pytest.mark.e2e
def test_the_front_shows_the_bits_the_layer_reading_the_input_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.policy import Policy

    policy = Policy.from_dict({"layers": {"0": {"w_bits": 6}}})
    assert policy.summary(["0"]) == "P>Q 0:W6Af"
    assert policy.summary(["0"], applied={"0": {"a_bits_applied": 8}}) == "P>Q 0:W6A8"

    monkeypatch.chdir(tmp_path)
    space = {"layers": {"_default": {"w_bits": 6}}, "policy": {"finetune_steps": 2}}
    result = autoprune.search(_task(), space=space, trials=1, storage="sqlite:///s.db", tracking_uri="sqlite:///m.db", priors=False, quiet=True)
    summary = result.rows()["front"][0]["policy"]
    # the input is charged at input_bits (8): the table says so, where it once said "Af" for the first layer
    assert "0:W6A8" in summary and "2:W6Af" in summary, summary
