"""The user's own model, weights, data, metric and device, through the Python API.

The models here are the user's: defined in this file, trained a few steps here, saved as safetensors. No
test retrains them: the recorded base metric must be the metric of the given weights. ``AUTOPRUNE_TEST_DEVICE``
(default cpu) picks the device of the device tests, so bench/gpu_check.sh can run them on CUDA.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.search.budget import counts_toward_budget, spent
from autoprune.search.record import read_trial
from autoprune.errors import AutopruneError
from autoprune.task import Task, TaskSpec, model_task, task_from_record, task_from_reference

REPO = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("AUTOPRUNE_TEST_DEVICE", "cpu")
CNN_SPACE = {
    "layers": {"_default": {"keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25}, "w_bits": {"low": 4, "high": 8}, "a_bits": 8}},
    "policy": {"finetune_steps": 20, "calibration_batches": 2},
}


class TinyCNN(nn.Module):
    """The user's classifier of 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor((bunch.images[:, None] / 16.0 - 0.3) / 0.37, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


@torch.no_grad()
def balanced_acc(model: nn.Module, loader: DataLoader) -> float:
    """The user's metric: mean per-class recall in percent."""
    pred, true = zip(*((model(x).argmax(1), y) for x, y in loader))
    p, t = torch.cat(pred).cpu(), torch.cat(true).cpu()
    return 100.0 * float(np.mean([(p[t == c] == c).float().mean().item() for c in t.unique()]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user trains their CNN themselves (a few hundred steps) and saves it."""
    torch.manual_seed(0)
    model, (train, _) = TinyCNN(), digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("user") / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def user_task(path: Path, **kwargs: object) -> Task:
    model = autoprune.load_weights(TinyCNN(), path)
    train, val = digits()
    return Task.from_model(
        model, train=DataLoader(train, batch_size=64, shuffle=True), val=DataLoader(val, batch_size=128),
        metric=balanced_acc, metric_name="balanced_acc", signal_steps=40, device=DEVICE, **kwargs,  # type: ignore[arg-type]
    )


def regression_task() -> Task:
    """A regressor: metric negative MSE, loss MSE; importable as tests.test_task_api:regression_task."""
    torch.manual_seed(1)
    x = torch.randn(512, 1, 4, 4)
    y = x.flatten(1) @ torch.linspace(-1, 1, 16)[:, None]
    # A conv first: torch_pruning's tracer fails on a model of Linear layers only (an unbind it cannot map).
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 1))

    @torch.no_grad()
    def neg_mse(m: nn.Module, loader: DataLoader) -> float:
        errors = [nn.functional.mse_loss(m(a), b, reduction="sum") for a, b in loader]
        return -float(sum(errors)) / 128

    def mse(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    return Task.from_model(
        model, train=TensorDataset(x[:384], y[:384]), val=TensorDataset(x[384:], y[384:]),
        metric=neg_mse, metric_name="neg_mse", loss=mse, signal_steps=20, device=DEVICE,
    )


def _search_args(tmp_path: Path, name: str) -> dict[str, object]:
    return {"study": name, "storage": f"sqlite:///{tmp_path}/study.db", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "device": DEVICE}


# --- the user's CNN, end to end ---------------------------------------------------------------------


@pytest.mark.e2e
def test_search_on_user_weights_keeps_them_and_apply_reproduces_the_front(weights: Path, tmp_path: Path) -> None:
    task = user_task(weights)
    given = autoprune.load_weights(TinyCNN(), weights)
    _, val = digits()
    given_metric = balanced_acc(given, DataLoader(val, batch_size=128))
    assert given_metric > 60.0  # trained by the test itself, a few epochs

    result = autoprune.search(
        task, space=CNN_SPACE, objectives={"objectives": [{"metric": "balanced_acc"}, {"metric": "bops"}]}, trials=3, sampler="random", **_search_args(tmp_path, "user-cnn")
    )
    # Not retrained: the base metric is that of the given weights, and the weights are the file's.
    assert result.base_metric == pytest.approx(given_metric, abs=1e-9)
    for key, value in task.base().model.state_dict().items():
        assert torch.equal(value, given.state_dict()[key]), key
    assert result.priors["source"] == "finetune" and result.priors["steps"] == 40
    # the default priors: the integer program's policies from the sensitivity measured with the task's loss
    assert (read_trial(result.study.trials[0]).prior or "").startswith("sensitivity:budget=")
    front = result.front()
    assert front and all(p.policy is not None and "balanced_acc" in p.metrics for p in front)
    point = front[0]
    compressed = autoprune.apply(given, point.policy, task=task)
    assert task.evaluate(compressed.model) == pytest.approx(point.metrics["balanced_acc"], abs=1e-6)
    assert compressed.cost(task.input_shape).to_dict()["total"]["bops"] == pytest.approx(point.metrics["bops"])

    exported = result.export(tmp_path / "export")
    report = json.loads(Path(exported.report if hasattr(exported, "report") else tmp_path / "export" / "report.json").read_text())
    assert report["exported"] and all(row["replay_matches"] for row in report["exported"])
    # the tables name the task's metric: its value, drop and interval, never "-" for want of "accuracy"
    rows = result.rows()
    assert rows["metric"] == "balanced_acc" and all(r["balanced_acc"] is not None and r["balanced_acc_drop"] is not None for r in rows["front"])
    header = next(line for line in result.table().splitlines() if "trial" in line and "strategy" in line)
    assert "balanced_acc" in header and "drop" in header and "accuracy" not in header
    markdown = (tmp_path / "export" / "report.md").read_text()
    assert "val balanced_acc (recorded)" in markdown and "val acc" not in markdown


@pytest.mark.e2e
def test_regression_task_runs_a_two_trial_search_on_its_own_metric(tmp_path: Path) -> None:
    task = regression_task()
    objectives = {"objectives": [{"metric": "neg_mse"}, {"metric": "bops"}], "constraints": ["neg_mse_drop <= 100"]}
    space = {"layers": {"_default": {"keep_ratio": 1.0, "w_bits": {"low": 4, "high": 8}, "a_bits": 8}}, "policy": {"finetune_steps": 10}}
    result = autoprune.search(task, space=space, objectives=objectives, trials=2, sampler="random", **_search_args(tmp_path, "regression"))
    trials = [t for t in result.study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    assert result.base_metric < 0 and result.front()
    assert all({"neg_mse", "neg_mse_drop"} <= set(t.user_attrs["metrics"]) for t in trials)


def test_priors_false_records_that_there_are_none(tmp_path: Path) -> None:
    task = regression_task()
    task.skip_signals(reason="priors=False: no S/N prior is enqueued")
    base = task.base()
    assert "signals" not in base.extras
    assert base.extras["priors"] == {"source": "none", "reason": "priors=False: no S/N prior is enqueued"}


def test_signal_finetune_records_sn_per_layer_and_leaves_the_weights() -> None:
    task = regression_task()
    before = {k: v.clone() for k, v in task.build().state_dict().items()}
    base = task.base()
    signals = base.extras["signals"]
    assert set(signals["layers"]) == {"0", "3"} and len(signals["epochs"]) == 4
    assert all(v > 0 for curves in signals["layers"].values() for v in curves["snr"])
    assert base.extras["priors"] == {"source": "finetune", "steps": 20, "lr": 1e-3, "epochs": 4}
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


# --- objectives name the task's metric ---------------------------------------------------------------


def test_objectives_name_the_task_metric_and_shipped_specs_mean_it_by_accuracy() -> None:
    from autoprune.search.objectives import ObjectiveSpec

    spec = ObjectiveSpec.from_dict({"objectives": [{"metric": "miou"}, {"metric": "bops"}], "constraints": ["miou_drop <= 1.0"]}).for_metric("miou")
    assert spec.directions == ["maximize", "minimize"]
    assert spec.violations({"miou": 50.0, "miou_drop": 1.5, "bops": 1.0}) == [0.5]
    shipped = ObjectiveSpec.load(REPO / "autoprune/specs/objectives/accuracy_bops.yaml").for_metric("miou")
    assert shipped.metrics == ["miou", "bops"]
    with pytest.raises(AutopruneError, match="'miuo' is not a metric"):
        ObjectiveSpec.from_dict({"objectives": [{"metric": "miuo"}]}).for_metric("miou")
    with pytest.raises(AutopruneError, match="'miou' is not a metric"):
        ObjectiveSpec.from_dict({"objectives": [{"metric": "miou"}]}).for_metric("accuracy")


# --- device ------------------------------------------------------------------------------------------


def test_resolve_device() -> None:
    from autoprune.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AutopruneError, match=r"^device: 'gpu' is not a device \(cpu, cuda or cuda:N\)$"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_without_cuda_is_a_clean_error_before_any_work(weights: Path, tmp_path: Path) -> None:
    from autoprune.device import resolve_device

    with pytest.raises(AutopruneError, match=r"^--device: 'cuda:1' asks for CUDA, which this machine does not have \(use cpu\)$"):
        resolve_device("cuda:1", field="--device")
    task = user_task(weights)
    with pytest.raises(AutopruneError, match="^device: 'cuda' asks for CUDA"):
        autoprune.search(task, trials=1, storage=f"sqlite:///{tmp_path}/never.db", device="cuda")
    assert not (tmp_path / "never.db").exists()
    with pytest.raises(AutopruneError, match="^device: 'cuda'"):
        Task(device="cuda")


def test_apply_runs_on_the_task_device_and_cost_needs_no_data(weights: Path) -> None:
    task = user_task(weights)
    model = task.build()
    policy = {"finetune_steps": 5, "calibration_batches": 1, "input_bits": 6, "layers": {"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 8}}}
    result = autoprune.apply(model, policy, task=task, device=DEVICE)
    assert next(result.model.parameters()).device.type == torch.device(DEVICE).type
    summary = result.summary()
    assert summary["features.0"]["out_channels"] == 4  # half of 8 channels removed
    # the layer reading the network input gets the input's bits, and the table says so, not the policy's 8
    assert summary["features.0"]["a_bits"] == 6 and summary["features.3"]["a_bits"] == 8
    lines = str(summary).splitlines()
    assert lines[0].split()[:2] == ["layer", "out"] and "6 (input)" in next(line for line in lines if line.startswith("features.0"))
    assert all(p.device.type == "cpu" for p in model.parameters())  # the given model is untouched
    static = autoprune.cost(model, input_shape=(1, 8, 8), policy=policy).to_dict()["total"]
    float_cost = autoprune.cost(model, input_shape=(1, 8, 8)).to_dict()["total"]
    assert static["bops"] < float_cost["bops"] / 4
    assert result.cost(task.input_shape).to_dict()["total"]["bops"] == pytest.approx(static["bops"])


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 autocast is exercised on the device run")
def test_bf16_finetune_on_device(weights: Path) -> None:
    task = user_task(weights)
    task.bf16 = True
    result = autoprune.apply(task.build(), {"finetune_steps": 20, "layers": {"_default": {"keep_ratio": 1.0, "w_bits": 8, "a_bits": 8}}}, task=task)
    assert task.evaluate(result.model) > 50.0


# --- user weights ------------------------------------------------------------------------------------


def test_load_weights_reads_safetensors_and_state_dicts_and_refuses_pickles(weights: Path, tmp_path: Path) -> None:
    from autoprune.weights import load_weights

    reference = load_weights(TinyCNN(), weights)
    pt = tmp_path / "cnn.pt"
    torch.save({"state_dict": reference.state_dict()}, pt)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in load_weights(TinyCNN(), pt).state_dict().items())

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(os.getcwd))  # a callable global: unpickling it would run code's lookup
    with pytest.raises(AutopruneError, match=r"^--weights: '.*evil.pt' is not a safetensors file nor a state dict"):
        load_weights(TinyCNN(), evil)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a header")
    with pytest.raises(AutopruneError, match="is not a readable safetensors file") as info:
        load_weights(TinyCNN(), bad)
    assert "\n" not in str(info.value)
    with pytest.raises(AutopruneError, match=r"does not fit the model: keys missing"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), weights)


def test_model_task_loads_weights_into_a_zoo_model(tmp_path: Path) -> None:
    net = Task().build()  # digits_cnn, untrained: any weights do
    path = tmp_path / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    train, val = digits()
    task = model_task("digits_cnn", weights=path, train=train, val=val, device="cpu", signal_steps=0)
    assert task.input_shape == (1, 8, 8) and task.is_user
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in task.build().state_dict().items())


def test_task_reference_and_record_rebuild_the_task() -> None:
    task = task_from_reference("tests.test_task_api:regression_task")
    assert task.record()["reference"] == "tests.test_task_api:regression_task"
    again = task_from_record(json.loads(json.dumps(task.record())))
    assert again.metric_name == "neg_mse" and again.input_shape == (1, 4, 4)
    builtin = Task(TaskSpec(dataset="digits", model="digits_cnn"))
    assert task_from_record(builtin.record()).spec == builtin.spec
    with pytest.raises(AutopruneError, match="^--task: 'tests.test_task_api:digits' returned tuple, not an autoprune.Task$"):
        task_from_reference("tests.test_task_api:digits")
    with pytest.raises(AutopruneError, match="is not of the form package.module:function"):
        task_from_reference("no_colon")
    with pytest.raises(AutopruneError, match="was defined in another Python session without reference="):
        task_from_record({"session": "python:elsewhere.Model:acc", "reference": None})


@pytest.mark.e2e
def test_a_worker_process_rebuilds_a_referenced_task_and_joins_the_study(tmp_path: Path) -> None:
    task = task_from_reference("tests.test_task_api:regression_task")
    space = {"layers": {"_default": {"keep_ratio": 1.0, "w_bits": {"low": 4, "high": 8}, "a_bits": 8}}, "policy": {"finetune_steps": 10}}
    args = _search_args(tmp_path, "joined")
    result = autoprune.search(task, space=space, objectives={"objectives": [{"metric": "neg_mse"}, {"metric": "bops"}]}, trials=2, priors=False, **args)
    assert result.priors["source"] == "none" and "priors=False" in result.priors["reason"]
    # Widen the study as a resume with more trials would, and let `autoprune worker` run the rest.
    meta = result.study.user_attrs["autoprune"]
    result.study.set_user_attr("autoprune", {**meta, "budget": 4})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "AUTOPRUNE_TEST_DEVICE": DEVICE}
    subprocess.run(
        [sys.executable, "-m", "autoprune.cli", "worker", "--study", "joined", "--storage", str(args["storage"]), "--quiet"],
        cwd=tmp_path, env=env, check=True, timeout=300,
    )
    # The ladder may stop a worker's trial at its post-training rung: it counts toward the budget all the same.
    counted = [t for t in result.study.get_trials() if counts_toward_budget(t.state, read_trial(t))]
    assert len(counted) == 4 and spent(result.study) == 4
    assert len({read_trial(t).owner for t in counted}) == 2


# --- streaming data ----------------------------------------------------------------------------------


def _write_pngs(root: Path, counts: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_streams_from_disk_through_loaders(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _write_pngs(tmp_path / "train", {"a": 12, "b": 12})
    task = Task(TaskSpec(dataset="imagefolder", model="resnet20", data_dir=str(tmp_path)), device="cpu", val_samples=2)
    for split in (task.splits.train, task.splits.val, task.splits.test):
        assert not isinstance(split, TensorDataset)
        # Only paths are held: no tensor anywhere in the dataset's state.
        assert not any(isinstance(v, torch.Tensor) for v in vars(split).values())
    batches = list(task.loader("train", batch_size=8))
    assert [len(x) for x, _ in batches] == [8, 8, 4] and batches[0][0].shape == (8, 3, 32, 32)
    assert sum(len(x) for x, _ in task.loader("val", full=False)) == 2
    assert sum(len(x) for x, _ in task.loader("val")) == len(task.splits.val)


def test_val_samples_fixes_one_subset_for_a_users_loader(weights: Path) -> None:
    task = user_task(weights)
    task.val_samples = 50
    first = torch.cat([y for _, y in task.loader("val", full=False)])
    again = torch.cat([y for _, y in task.loader("val", full=False)])
    assert len(first) == 50 and torch.equal(first, again)
    assert sum(len(y) for _, y in task.loader("val")) == len(digits()[1])


# --- the README ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    assert len(code.strip().splitlines()) < 25
    monkeypatch.chdir(tmp_path)
    # The example loads "model.safetensors": the user's checkpoint, written here from its own architecture.
    scope: dict[str, object] = {}
    exec(code.split("autoprune.load_weights")[0], scope)
    model = scope["model"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "model.safetensors")  # type: ignore[attr-defined]
    exec(code, {})
    assert (tmp_path / "exports" / "mine" / "report.json").is_file()
    assert (tmp_path / "front.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert out.count("Pareto front of study") == 2, "the search printed the front table, and result.table() gave it"
    assert "A bits" in out and "(input)" in out, "the summary is a per-layer table naming the input's bits"
    assert sqlite3.connect(tmp_path / "study.db").execute("select count(*) from trials").fetchone()[0] == 3


# --- what the CLI's --task / --model --weights / --device will call ------------------------------------


def test_cli_task_builds_each_kind_and_checks_the_device_first(tmp_path: Path) -> None:
    from autoprune.task import cli_task

    net = Task().build()
    path = tmp_path / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with_weights = cli_task(model="digits_cnn", weights=path, device="cpu", val_samples=20)
    assert with_weights.is_user and with_weights.val_samples == 20 and with_weights.input_shape == (1, 8, 8)
    record = with_weights.record()
    assert record["weights"] == str(path.resolve()) and len(record["sha256"]) == 64
    rebuilt = task_from_record(json.loads(json.dumps(record)))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in rebuilt.build().state_dict().items())

    referenced = cli_task(model="digits_cnn", task="tests.test_task_api:regression_task", device="cpu")
    assert referenced.metric_name == "neg_mse"
    builtin = cli_task(model="digits_cnn", device="cpu", epochs=1)
    assert builtin.spec is not None and builtin.spec.train.epochs == 1 and not builtin.is_user
    with pytest.raises(AutopruneError, match="^--weights: .* cannot go with --task"):
        cli_task(model="digits_cnn", task="tests.test_task_api:regression_task", weights=path)
    with pytest.raises(AutopruneError, match="^--device: 'tpu' is not a device"):
        cli_task(model="digits_cnn", task="no.such:module", device="tpu")  # the device fails before the import
