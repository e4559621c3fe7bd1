"""Sensitivities against closed forms: a linear layer under MSE to fixed targets is a quadratic in its weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autoprune.prune import ChannelGroup
from autoprune.sensitivity import (
    SensitivityTable, act_perturbation, load_or_measure, measure_sensitivity, quantization_perturbation, sensitivity_rows,
)

D_IN, D_OUT, N = 6, 3, 64


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _linear(weight: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x).double(), y.double()))


def test_hutchinson_trace_converges_to_the_exact_trace() -> None:
    # L = 1/(N out) sum_s ||W x_s - y_s||^2: H = 2/(N out) sum_s I_out (x) x_s x_s^T, Tr(H) = 2/N sum_s ||x_s||^2.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g) * torch.linspace(0.5, 2.0, D_IN)
    y = torch.randn(N, D_OUT, generator=g)
    model = _linear(torch.randn(D_OUT, D_IN, generator=g))
    exact = 2.0 / N * float(x.double().square().sum())
    table = measure_sensitivity(model, _batches(x, y, 16), method="hessian", probes=200, loss_fn=nn.MSELoss(), groups=(), w_bits=(4,), a_bits=(4,), keep_ratios=())
    assert table.layers["0"].trace == pytest.approx(exact, rel=0.05)
    assert table.samples == N and table.batches == 4
    assert table.layers["0"].reads_input and table.layers["0"].a_bits == {}


def _whitened_minimum() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """X^T X = N I and targets the model fits exactly: gradient 0 and H = 2/out I, so 1/2 Tr(H)/n ||dW||^2 is exact."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(N, D_IN, generator=g, dtype=torch.float64))
    x = (q * N**0.5).float()
    weight = torch.randn(D_OUT, D_IN, generator=g) * torch.tensor([[0.2], [1.0], [3.0]])
    model = _linear(weight)
    with torch.no_grad():
        y = model(x)
    return model, x, y, weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_predicted_increase_of_quantization_is_the_exact_quadratic_increase(bits: int) -> None:
    model, x, y, weight = _whitened_minimum()
    table = measure_sensitivity(model, [(x, y)], method="hessian", probes=1, loss_fn=nn.MSELoss(), groups=(), w_bits=(bits, 32), a_bits=(), keep_ratios=())
    assert table.layers["0"].trace == pytest.approx(2.0 / D_OUT * weight.numel(), rel=1e-5)
    quantized = _linear(weight + quantization_perturbation(weight, bits).float())
    exact = _mse(quantized, x, y) - _mse(model, x, y)
    assert exact > 0
    assert table.layers["0"].w_bits[bits] == pytest.approx(exact, rel=1e-4)
    assert table.layers["0"].w_bits[32] == 0.0


def test_predicted_increase_of_pruning_zeroes_the_smallest_filters_exactly() -> None:
    # Rows 0, 1, 2 have norms ~0.2, ~1, ~3 (times a random row): keep 1/3 removes the two smallest.
    model, x, y, weight = _whitened_minimum()
    group = ChannelGroup(name="0", layers=("0",), channels=D_OUT)
    table = measure_sensitivity(model, [(x, y)], method="hessian", probes=1, loss_fn=nn.MSELoss(), groups=(group,), w_bits=(), a_bits=(), keep_ratios=(1 / 3, 1.0))
    order = weight.square().sum(1).argsort()
    pruned = weight.clone()
    pruned[order[:2]] = 0
    exact = _mse(_linear(pruned), x, y) - _mse(model, x, y)
    assert table.groups["0"].keep[1 / 3] == pytest.approx(exact, rel=1e-4)
    assert table.groups["0"].keep[1.0] == 0.0


def test_direct_method_measures_the_exact_increase_of_each_perturbation() -> None:
    model, x, y, weight = _whitened_minimum()
    group = ChannelGroup(name="0", layers=("0",), channels=D_OUT)
    table = measure_sensitivity(model, _batches(x, y, 16), method="direct", loss_fn=nn.MSELoss(), groups=(group,), w_bits=(2, 4, 32), a_bits=(), keep_ratios=(1 / 3, 1.0))
    for bits in (2, 4):
        exact = _mse(_linear(weight + quantization_perturbation(weight, bits).float()), x, y) - _mse(model, x, y)
        assert table.layers["0"].w_bits[bits] == pytest.approx(exact, rel=1e-5)
    assert table.layers["0"].w_bits[32] == 0.0
    pruned = weight.clone()
    pruned[weight.square().sum(1).argsort()[:2]] = 0
    assert table.groups["0"].keep[1 / 3] == pytest.approx(_mse(_linear(pruned), x, y) - _mse(model, x, y), rel=1e-5)
    assert table.groups["0"].keep[1.0] == 0.0
    assert torch.equal(model[0].weight, weight)


def test_direct_method_quantizes_one_layer_input() -> None:
    model, x, y = _two_layers(scale=2.0)
    table = measure_sensitivity(model, [(x, y)], method="direct", loss_fn=nn.MSELoss(), groups=(), w_bits=(), a_bits=(3,), keep_ratios=())
    with torch.no_grad():
        features = model[0](x)
        exact = float(nn.functional.mse_loss(model[1](features + act_perturbation(features, 3).float()), y))
    assert table.layers["1"].a_bits[3] == pytest.approx(exact, rel=1e-5)
    assert not model[1]._forward_pre_hooks


def test_fisher_is_the_mean_squared_per_sample_gradient() -> None:
    # Per-sample gradient of 1/out ||W x_s - y_s||^2 is 2/out (W x_s - y_s) x_s^T.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randn(N, D_OUT, generator=g)
    weight = torch.randn(D_OUT, D_IN, generator=g)
    model = _linear(weight)
    residual = (x @ weight.T - y).double()
    per_sample = 2.0 / D_OUT * residual[:, :, None] * x.double()[:, None, :]
    fisher = per_sample.square().mean(0)
    table = measure_sensitivity(model, _batches(x, y, 16), method="fisher", loss_fn=nn.MSELoss(), groups=(), w_bits=(3,), a_bits=(), keep_ratios=())
    assert table.layers["0"].trace == pytest.approx(float(fisher.sum()), rel=1e-5)
    expected = 0.5 * float((fisher * quantization_perturbation(weight, 3).square()).sum())
    assert table.layers["0"].w_bits[3] == pytest.approx(expected, rel=1e-5)


def _two_layers(scale: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(4, 3) -> Linear(3, 6) with W2^T W2 = scale^2 I: the loss is isotropic in the second layer's input."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 6, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(q * scale)
    x = torch.randn(N, 4, generator=g)
    with torch.no_grad():
        y = model(x)
    return model, x, y


@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_activation_bits_predict_the_loss_increase_of_quantized_features(method: str) -> None:
    # At the minimum, L(x + dx) - L(x) = scale^2 / (B out) ||dx||^2 exactly: H_x = 2 scale^2 / (B out) I.
    # Fisher at a zero residual is 0, so it is checked at a perturbed target instead (its own closed form).
    model, x, y = _two_layers(scale=2.0)
    if method == "fisher":
        y = y + 0.5
    table = measure_sensitivity(model, [(x, y)], method=method, probes=400, loss_fn=nn.MSELoss(), groups=(), w_bits=(), a_bits=(3, 32), keep_ratios=())
    with torch.no_grad():
        features = model[0](x)
    dx = act_perturbation(features, 3)
    if method == "hessian":
        expected = 4.0 / (N * 6) * float(dx.square().sum())
        tolerance = 0.1
    else:
        with torch.no_grad():
            grad = 2.0 / (N * 6) * (model[1](features) - y).double() @ model[1].weight.double()
        expected = N / 2 * float((grad.square() * dx.square()).sum())
        tolerance = 1e-5
    assert table.layers["1"].a_bits[3] == pytest.approx(expected, rel=tolerance)
    assert table.layers["1"].a_bits[32] == 0.0
    assert not table.layers["1"].reads_input


def test_model_is_left_as_it_was() -> None:
    model, x, y = _two_layers(scale=1.0)
    model.train()
    model[0].weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    measure_sensitivity(model, [(x, y)], method="hessian", probes=2, loss_fn=nn.MSELoss(), groups=(), w_bits=(2,), a_bits=(2,), keep_ratios=())
    assert model.training and not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["hessian", "fisher", "direct"])
def test_digits_cnn_table_round_trips_and_orders_bits(method: str, tmp_path) -> None:
    from autoprune.task import Task

    task = Task()
    model = task.build()
    table = load_or_measure(model, task, method=method, batches=2, w_bits=(2, 4, 8), a_bits=(2, 8), keep_ratios=(0.5, 1.0), probes=4)
    path = task.cache_dir() / "sensitivity.json"
    assert SensitivityTable.load(path) == table
    assert SensitivityTable.from_dict(json.loads(table.to_json())) == table
    again = load_or_measure(model, task, method=method, batches=2, w_bits=(2, 4), a_bits=(2,), keep_ratios=(0.5,))
    assert again.seconds == table.seconds  # read from the cache, not measured again
    with torch.no_grad():
        model.classifier.weight.mul_(2)
    retrained = load_or_measure(model, task, method=method, batches=2, w_bits=(2,), a_bits=(2,), keep_ratios=(0.5,), probes=4)
    assert retrained.model_digest != table.model_digest
    assert SensitivityTable.load(path) == retrained
    path.write_text("{not json")
    assert load_or_measure(model, task, method=method, batches=2, w_bits=(2,), a_bits=(2,), keep_ratios=(0.5,)).model_digest == retrained.model_digest
    assert set(table.groups) == {"features.0", "features.3", "features.7"}
    for name, layer in table.layers.items():
        # A measured increase need not fall with bits (an untrained model's loss may drop at 2 bits): only >= 0.
        ordered = method == "direct" or layer.w_bits[2] >= layer.w_bits[4] >= layer.w_bits[8]
        assert ordered and min(layer.w_bits.values()) >= 0, name
    for group in table.groups.values():
        assert group.keep[0.5] >= group.keep[1.0] == 0.0
    rows = sensitivity_rows(table)
    assert [row["name"] for row in rows] == list(table.layers)
    assert rows[0]["dL_k0.5"] == table.groups["features.0"].keep[0.5] and rows[-1]["dL_k0.5"] == ""
    path.unlink()


def _weighted_mse(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, w = batch
    return (w * (model(x).squeeze(1) - y).square()).mean()


def test_a_user_task_is_measured_with_its_own_loss_and_batches(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(x, target, weight) batches and a weighted MSE: cross-entropy on (x, y) could not even run on them."""
    from torch.utils.data import TensorDataset

    from autoprune.errors import AutopruneError
    from autoprune.sensitivity import calibration_batches, table_path
    from autoprune.task import Task

    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    x = torch.randn(96, D_IN)
    y, w = x[:, 0] - 2 * x[:, 1], torch.rand(96) + 0.5
    model = nn.Sequential(nn.Linear(D_IN, 4), nn.ReLU(), nn.Linear(4, 1))
    data = TensorDataset(x, y, w)
    task = Task.from_model(model, train=data, val=data, metric=lambda m, loader: 0.0, metric_name="neg_mse", loss=_weighted_mse, signal_steps=0)
    table = load_or_measure(task.base(progress=False).model, task, batches=2, w_bits=(2, 8), a_bits=(2,), keep_ratios=(0.5, 1.0))

    batches = calibration_batches(task, batches=2)
    assert [len(b[0]) for b in batches] == [64, 32] and table.samples == 96

    def loss_of(net: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(_weighted_mse(net, b)) * len(b[0]) for b in batches) / 96

    quantized = nn.Sequential(*[copy_of(layer) for layer in model])
    with torch.no_grad():
        quantized[2].weight.add_(quantization_perturbation(model[2].weight, 2).float())
    assert table.layers["2"].w_bits[2] == pytest.approx(max(0.0, loss_of(quantized) - loss_of(model)), rel=1e-5)
    assert table.groups["0"].keep[1.0] == 0.0 and table.groups["0"].keep[0.5] > 0.0
    assert table_path(task, model).parent == tmp_path / "sensitivity" and SensitivityTable.load(table_path(task, model)) == table

    with pytest.raises(AutopruneError, match="fisher"):
        measure_sensitivity(model, batches, method="fisher", batch_loss=_weighted_mse)


def copy_of(layer: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(layer)
