"""The latency model measured with onnxruntime: a per-layer table measured lazily and cached per machine, summed
per policy and checked against whole-model runs; ``latency_ms`` as an objective and a constraint."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autoprune.deploy.latency import LatencyModel, LatencyTable, random_calibrated  # noqa: E402
from autoprune.policy import Policy  # noqa: E402

SHAPE = (2, 24)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 16, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(16 * 12, 4)).eval()


def _policy(**layer: object) -> Policy:
    return Policy.model_validate({"layers": {"_default": layer}, "finetune_steps": 0})


def _latency(tmp_path, **kwargs: object) -> LatencyModel:
    return LatencyModel(_model(), input_shape=SHAPE, batch_size=8, warmup=1, repeats=3, path=tmp_path / "latency.json", **kwargs)


class _Residual(nn.Module):
    """conv0 -> conv1 read by one layer alone; conv1's output also feeds a residual add, conv2's goes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv1d(2, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.conv1, self.bn1 = nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.conv2, self.bn2 = nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.pool, self.fc = nn.MaxPool1d(2), nn.Linear(8 * 12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn0(self.conv0(x))))
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(torch.flatten(h, 1))


def test_a_w8a8_layer_file_runs_on_an_integer_kernel_exactly_when_the_whole_model_does(tmp_path) -> None:
    from autoprune.deploy.latency import write_layer_file
    from autoprune.deploy.onnx_export import export_onnx
    from autoprune.deploy.verify import INTEGER_KERNELS, runtime_kernels

    torch.manual_seed(0)
    latency = LatencyModel(_Residual().eval(), input_shape=SHAPE, batch_size=8, path=tmp_path / "latency.json")
    policy = Policy.model_validate({"layers": {"_default": {"w_bits": 8, "a_bits": 8}}, "quantizer": {"kind": "clip_uniform"}, "finetune_steps": 0})
    w8a8 = random_calibrated(latency.base_model, policy, SHAPE)
    export_onnx(w8a8, tmp_path / "whole.onnx", input_shape=SHAPE)
    whole = runtime_kernels(tmp_path / "whole.onnx")
    alone = {}
    for name, point in latency.points(w8a8).items():
        write_layer_file(point, tmp_path / f"{name}.onnx")
        alone[name] = runtime_kernels(tmp_path / f"{name}.onnx")["0"]
    # conv0 ends in conv1's QuantizeLinear (across BN, ReLU, MaxPool): QLinearConv; conv1 also feeds the add and
    # conv2 ends in it: float; the last linear layer: QGemm
    assert {n: k in INTEGER_KERNELS for n, k in whole.items()} == {"conv0": True, "conv1": False, "conv2": False, "fc": True}
    assert {n: k in INTEGER_KERNELS for n, k in alone.items()} == {n: k in INTEGER_KERNELS for n, k in whole.items()}, (whole, alone)


def test_weights_before_float_kernels_stored_in_float_give_the_same_logits_and_kernels(tmp_path) -> None:
    import numpy as np

    from autoprune.deploy.onnx_export import export_onnx
    from autoprune.deploy.verify import runtime_kernels, run_onnx

    torch.manual_seed(0)
    policy = Policy.model_validate({"layers": {"_default": {"w_bits": 8, "a_bits": 8}}, "quantizer": {"kind": "clip_uniform"}, "finetune_steps": 0})
    w8a8 = random_calibrated(_Residual().eval(), policy, SHAPE)
    levels = export_onnx(w8a8, tmp_path / "levels.onnx", input_shape=SHAPE)
    floats = export_onnx(w8a8, tmp_path / "floats.onnx", input_shape=SHAPE, float_weights_off_kernel=True)
    # conv1 and conv2 run on float kernels (they feed or end in the residual add): their weights are float32 values
    assert {n: r.weights_dequantized for n, r in floats.layers.items()} == {"conv0": False, "conv1": True, "conv2": True, "fc": False}
    assert not any(r.weights_dequantized for r in levels.layers.values())
    assert runtime_kernels(tmp_path / "floats.onnx") == runtime_kernels(tmp_path / "levels.onnx")
    x = torch.randn(16, *SHAPE).numpy()
    np.testing.assert_array_equal(run_onnx(tmp_path / "floats.onnx", x), run_onnx(tmp_path / "levels.onnx", x))


def test_the_rest_of_a_uniform_policy_is_measured_on_its_own_grid(tmp_path) -> None:
    latency = _latency(tmp_path)
    uniform = {"layers": {"_default": {"w_bits": 8, "a_bits": 8}}, "finetune_steps": 0}
    tread = random_calibrated(latency.base_model, Policy.model_validate({**uniform, "quantizer": {"kind": "clip_uniform"}}), SHAPE)
    rise = random_calibrated(latency.base_model, Policy.model_validate(uniform), SHAPE)
    estimates = [latency.estimate(tread), latency.estimate(rise)]
    # int8 weights (mid-tread) run on integer kernels, int16 ones (mid-rise at 8 bits) do not: each uniform
    # policy is its own base model, whose estimate is its whole-model time
    wholes = sorted(v for k, v in latency.table.models.items() if k.split(":")[1] == "int8")
    assert len(wholes) == 2
    assert sorted(max(e.overhead_ms, e.total_ms) for e in estimates) == pytest.approx([max(estimates[0].overhead_ms, w) for w in wholes])


def test_points_are_measured_once_then_read_from_the_table_on_disk(tmp_path) -> None:
    latency = _latency(tmp_path)
    w4 = random_calibrated(latency.base_model, _policy(w_bits=4, a_bits=4), SHAPE)
    first = latency.estimate(w4)
    # every layer reads int8 storage: the base model's 2 layers at W8A8 and its whole W8A8 run (the rest), 2 W4A4
    # layers; nothing float is measured, as no layer of the policy is float
    assert first.measured == 5 and set(first.layers) == {"0", "4"}
    # never below one run's overhead: on a loaded machine a tiny model's rest may come out negative
    assert first.total_ms == pytest.approx(max(first.overhead_ms, first.overhead_ms + sum(first.layers.values()) + first.rest_ms))
    assert latency.estimate(w4).measured == 0, "a second estimate is a lookup"
    again = _latency(tmp_path)
    assert again.estimate(w4).measured == 0 and again.estimate(w4).total_ms == first.total_ms, "the table is read back from disk"
    table = json.loads((tmp_path / "latency.json").read_text())
    assert table["threads"] == 1 and table["batch_size"] == 8 and len(table["layers"]) == 4
    # a keep ratio is a new shape for both layers: only those two points are measured
    assert again.estimate(random_calibrated(again.base_model, _policy(w_bits=4, a_bits=4, keep_ratio=0.5), SHAPE)).measured == 2


def test_a_table_of_another_machine_or_batch_is_measured_again(tmp_path) -> None:
    latency = _latency(tmp_path)
    latency.estimate(random_calibrated(latency.base_model, Policy(input_bits=32), SHAPE))
    on_disk = LatencyTable.model_validate_json((tmp_path / "latency.json").read_text())
    (tmp_path / "latency.json").write_text(on_disk.model_copy(update={"machine": "another cpu"}).model_dump_json())
    assert _latency(tmp_path).estimate(random_calibrated(latency.base_model, Policy(input_bits=32), SHAPE)).measured == 3
    other_batch = LatencyModel(_model(), input_shape=SHAPE, batch_size=4, warmup=1, repeats=3, path=tmp_path / "latency.json")
    assert other_batch.estimate(random_calibrated(latency.base_model, Policy(input_bits=32), SHAPE)).measured == 3


def test_the_check_returns_the_model_beside_a_whole_model_run(tmp_path) -> None:
    latency = _latency(tmp_path)
    check = latency.check(random_calibrated(latency.base_model, _policy(w_bits=8, a_bits=8, keep_ratio=0.5), SHAPE))
    assert check.batch_size == 8 and check.threads == 1 and check.measured_ms > 0
    assert check.relative_error == pytest.approx((check.model_ms - check.measured_ms) / check.measured_ms)


def test_latency_ms_is_a_metric_an_objective_and_a_constraint() -> None:
    from autoprune.metrics import BY_NAME, METRICS, parse_bound
    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.specs import shipped

    assert BY_NAME["latency_ms"].direction == "minimize" and "latency_ms" in METRICS
    spec = ObjectiveSpec.load(shipped("objectives", "accuracy_latency"))
    assert spec.metrics == ["accuracy", "latency_ms"] and spec.directions == ["maximize", "minimize"] and spec.needs_latency
    bounded = ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}], "constraints": ["latency_ms <= 2.5"]})
    assert bounded.needs_latency and bounded.violations({"latency_ms": 3.0}) == [pytest.approx(0.5)]
    assert parse_bound("latency_ms <= 2.5") == ("latency_ms", "<=", 2.5)
    assert not ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}]}).needs_latency


def test_a_search_for_latency_without_onnxruntime_is_refused_before_training(tmp_path, monkeypatch, capsys) -> None:
    import sys

    from autoprune.cli import main

    # onnxruntime made unimportable: the search must stop with one line and exit 2, training nothing
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    status = main([
        "search", "--objectives", "accuracy_latency", "--trials", "1", "--no-ladder", "--quiet",
        "--storage", f"sqlite:///{tmp_path}/s.db", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
    ])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "onnxruntime" in lines[0] and "autoprune[deploy]" in lines[0], lines
    assert not (tmp_path / "cache").exists(), "no base model was trained"


@pytest.mark.e2e
def test_search_for_accuracy_and_latency_on_mnist1d(tmp_path) -> None:
    import optuna
    from cli_support import autoprune
    from optuna.trial import TrialState

    (tmp_path / "space.yaml").write_text(
        # bits fixed at W8A8 on int8 weights (integer kernels): the trials share the base model's 8-bit points,
        # and few one-layer files are measured
        "layers:\n  _default:\n    keep_ratio: {choices: [0.5, 1.0]}\n    w_bits: 8\n    a_bits: 8\n"
        "policy:\n  finetune_steps: 2\n  quantizer: clip_uniform\n"
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = autoprune(
        tmp_path, "search", "--dataset", "mnist1d", "--model", "mnist1d_cnn", "--epochs", "1", "--val-samples", "256", "--objectives", "accuracy_latency",
        "--space", str(tmp_path / "space.yaml"), "--trials", "3", "--no-ladder", "--no-priors", "--study", "s", "--storage", storage,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "--quiet",
    )
    assert proc.wait(timeout=600) == 0
    study = optuna.load_study(study_name="s", storage=storage)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3 and study.metric_names == ["accuracy", "latency_ms"]
    for trial in trials:
        assert 0 < trial.values[1] < 1000
    from autoprune.search.report import front_rows, print_front
    from rich.console import Console

    data = front_rows(study)
    # the float base model's estimate is the reference of the hypervolume; the printed front shows the column
    assert data["base"]["cost"]["latency_ms"] > 0 and data["hypervolume"] is not None
    assert data["front"] and all(row["latency_ms"] > 0 for row in data["front"])
    console = Console(record=True, width=250)
    print_front(data, console=console)
    text = console.export_text()
    assert "ms (model)" in text and f"latency {data['base']['cost']['latency_ms']:.3f} ms" in text


def test_the_estimate_sums_the_layers_and_shares_the_rest_by_the_features_they_read(tmp_path) -> None:
    latency = _latency(tmp_path)
    base = random_calibrated(latency.base_model, Policy(input_bits=32), SHAPE)
    pruned = random_calibrated(latency.base_model, _policy(keep_ratio=0.5).model_copy(update={"input_bits": 32}), SHAPE)
    latency.estimate(base), latency.estimate(pruned)
    # hand-set times: the conv 1.0 ms whole and 0.6 ms at half width, the linear 0.5 and 0.3, the whole base 2.0,
    # one run's overhead 0.1
    table = LatencyTable.model_validate_json((tmp_path / "latency.json").read_text())
    times = {("conv1d", 16): 1.0, ("conv1d", 8): 0.6, ("linear", 192): 0.5, ("linear", 96): 0.3}
    layers = {}
    for key in table.layers:
        point = json.loads(key)
        layers[key] = times[(point["op"], point["out_channels"] if point["op"] == "conv1d" else point["in_shape"][0])]
    (tmp_path / "latency.json").write_text(table.model_copy(update={
        "layers": layers, "overhead_ms": 0.1, "models": dict.fromkeys(table.models, 2.0),
    }).model_dump_json())
    hand = _latency(tmp_path)
    assert hand.estimate(base).total_ms == pytest.approx(2.0), "the base model's estimate is its whole-model time"
    # rest = 2.0 - 0.1 - (0.9 + 0.4) = 0.6 over 48 + 192 input elements; pruned, the linear reads 96 of its 192
    estimate = hand.estimate(pruned)
    assert estimate.measured == 0 and estimate.rest_ms == pytest.approx(0.6 * (48 + 96) / 240)
    assert estimate.total_ms == pytest.approx(0.1 + (0.6 - 0.1) + (0.3 - 0.1) + 0.6 * (48 + 96) / 240)
