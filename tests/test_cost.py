"""The ideal-hardware cost model against values computed by hand from its formulas."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from autoprune.cost import LayerQuant, esn_a_from_snr, format_cost_table, format_count, measure_cost
from autoprune.errors import AutopruneError
from autoprune.models import build_model
from autoprune.quant.midrise import midrise_delta, midrise_int


def _set(layer: nn.Module, weight: list) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def _linear_net(weight: list) -> nn.Module:
    out_f, in_f = len(weight), len(weight[0])
    return nn.Sequential(nn.Flatten(), _set(nn.Linear(in_f, out_f, bias=False), weight))


def test_tiny_tensor_by_hand_with_pruned_filter_and_input_bits() -> None:
    # 2 bits, delta = 0.9/2 = 0.45: 0.9 -> 2.5 clamped to 1.5, -0.2 -> -0.5; the second filter is all below
    # delta/2 (and holds an exact zero), so the mid-rise rule prunes it.
    net = _linear_net([[0.9, -0.2], [0.1, 0.0]])
    layer = measure_cost(net, input_shape=(2, 1, 1), layers={"1": LayerQuant(w_bits=2, a_bits=4)}, input_bits=8).layers[0]
    assert layer.params == 2 and layer.dense_params == 4 and layer.w_sparsity == 0.5
    assert layer.esn_a == 1.5**2 + 0.5**2
    assert layer.esn_d == 2 + 1
    assert layer.macs == 2
    assert layer.esn_d_prime == 2 * 2
    assert layer.a_bits == 8, "a flattened view of the network input is read at input_bits"
    assert layer.bops == 2 * 2 * 8
    assert layer.memory_mb == pytest.approx((2 * 2 + 2 * 8) / 1e6)


@pytest.mark.parametrize(
    ("delta", "esn_a", "esn_d", "esn_d_prime"),
    [
        # delta = 1/8: levels 7.5 (clamped), 4.5 | 2.5, -2.5 -> bits 4, 4 | 3, 3
        (None, 7.5**2 + 4.5**2 + 2 * 2.5**2, 4 + 4 + 3 + 3, 2 * 4 + 2 * 3),
        # the quantizer's own delta = 1/4: levels 4.5, 2.5 | 1.5, -1.5 -> bits 4, 3 | 2, 2
        (0.25, 4.5**2 + 2.5**2 + 2 * 1.5**2, 4 + 3 + 2 + 2, 2 * 4 + 2 * 2),
    ],
)
def test_filter_of_smaller_range_counts_fewer_bits(delta: float | None, esn_a: float, esn_d: float, esn_d_prime: float) -> None:
    net = _linear_net([[1.0, 0.5], [0.3, -0.3]])
    layer = measure_cost(net, input_shape=(2, 1, 1), layers={"1": LayerQuant(w_bits=4, delta=delta)}).layers[0]
    assert (layer.esn_a, layer.esn_d, layer.esn_d_prime) == (esn_a, esn_d, esn_d_prime)
    assert layer.esn_d_prime < layer.macs * 4


@pytest.mark.parametrize("bits", range(1, 9))
def test_esn_d_prime_is_macs_times_bits_when_every_filter_reaches_the_top_level(bits: int) -> None:
    torch.manual_seed(bits)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        w = conv.weight.uniform_(-0.5, 0.5)
        w[:, 1, 0, :] = 0.0  # unstructured zeros, so filters differ from the dense shape
        w[0, 0, 0, 0], w[1, 0, 1, 1], w[2, 1, 2, 2] = 1.0, -1.0, 1.0
    layer = measure_cost(nn.Sequential(conv), input_shape=(2, 5, 5), layers={"0": LayerQuant(w_bits=bits)}).layers[0]
    nonzero = int(torch.count_nonzero(conv.weight))
    assert layer.params == nonzero == 3 * 2 * 9 - 3 * 3
    assert layer.macs == nonzero * 25
    assert layer.esn_d_prime == layer.macs * bits


def test_float_bops_are_macs_times_1024_on_zoo_models() -> None:
    vgg = measure_cost(build_model("vgg7"), input_shape=(3, 32, 32))
    assert vgg.total.macs == 607_600_640
    # digits_cnn by hand: 16*1*9*64 + 32*16*9*64 + 64*32*9*16 + 10*256
    digits = measure_cost(build_model("digits_cnn"), input_shape=(1, 8, 8))
    assert digits.total.macs == 9_216 + 294_912 + 294_912 + 2_560
    for name in ("resnet20", "mobilenetv2"):
        report = measure_cost(build_model(name), input_shape=(3, 32, 32))
        assert report.total.macs > 0
        assert report.total.bops == report.total.macs * 1024, name
    for report in (vgg, digits):
        assert report.total.bops == report.total.macs * 1024
        assert all(layer.w_bits == layer.a_bits == 32 for layer in report.layers)


def _two_convs(mid: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, mid, 3, padding=1), nn.ReLU(), nn.Conv2d(mid, 5, 3, padding=1))


def test_a_removed_output_channel_leaves_this_layer_and_the_next() -> None:
    full = measure_cost(_two_convs(4), input_shape=(3, 6, 6))
    pruned = measure_cost(_two_convs(3), input_shape=(3, 6, 6))
    assert [layer.macs for layer in full.layers] == [4 * 3 * 9 * 36, 5 * 4 * 9 * 36]
    assert full.layers[0].macs - pruned.layers[0].macs == 1 * 3 * 9 * 36
    assert full.layers[1].macs - pruned.layers[1].macs == 5 * 1 * 9 * 36


def test_grouped_and_depthwise_conv_macs() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    layer = measure_cost(grouped, input_shape=(4, 5, 5)).layers[0]
    assert (layer.groups, layer.out_hw, layer.macs) == (2, (5, 5), 6 * (4 // 2) * 9 * 25)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4))
    layer = measure_cost(depthwise, input_shape=(4, 6, 6)).layers[0]
    assert (layer.groups, layer.out_hw, layer.macs) == (4, (3, 3), 4 * 1 * 9 * 9)


@pytest.mark.parametrize("bits", [6, 7, 8])
def test_esn_a_agrees_with_its_snr_estimate(bits: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.normal_()
    report = measure_cost(nn.Sequential(nn.Flatten(), linear), input_shape=(256, 1, 1), layers={"1": LayerQuant(w_bits=bits)})
    delta = midrise_delta(linear.weight, bits)
    estimate = esn_a_from_snr(linear.weight, midrise_int(linear.weight, delta, bits), delta)
    assert report.total.esn_a == pytest.approx(estimate, rel=0.02)


def test_input_bits_apply_to_the_layer_reading_the_network_input() -> None:
    net = _two_convs(4)
    quant = {"0": LayerQuant(w_bits=4, a_bits=6), "2": LayerQuant(w_bits=4, a_bits=6)}
    first, second = measure_cost(net, input_shape=(3, 6, 6), layers=quant, input_bits=8).layers
    assert (first.a_bits, first.bops) == (8, first.macs * 4 * 8)
    assert (second.a_bits, second.bops) == (6, second.macs * 4 * 6)

    resnet = measure_cost(build_model("resnet20"), input_shape=(3, 32, 32), input_bits=8)
    readers = [layer.name for layer in resnet.layers if layer.a_bits == 8]
    assert readers == ["conv1"]
    assert resnet.total.bops == resnet.layers[0].macs * 32 * 8 + (resnet.total.macs - resnet.layers[0].macs) * 1024


def test_weight_and_feature_sparsity_scale_macs() -> None:
    net = _two_convs(4)
    dense = 5 * 4 * 9 * 36
    with torch.no_grad():
        net[2].weight[:, :, :, 1:] = 0.0  # keeps one kernel column of three
    sparse = measure_cost(net, input_shape=(3, 6, 6), layers={"2": LayerQuant(masked=True)}).layers[1]
    assert sparse.w_sparsity == pytest.approx(2 / 3)
    assert sparse.macs == dense / 3
    both = measure_cost(net, input_shape=(3, 6, 6), layers={"2": LayerQuant(masked=True, f_sparsity=0.25)}).layers[1]
    assert both.macs == dense / 3 * 0.75
    assert both.bops == both.macs * 1024


def test_a_float_weight_that_happens_to_be_zero_is_not_pruned() -> None:
    # Issue 10 bug 6: random init draws exact zeros (3 of 20 seeded VGG7 builds); only a mask or a quantizer prunes.
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(0.1, 1.0)
        conv.weight[0, 0, 0, 0] = 0.0
        conv.weight[1] = 0.0  # a whole float filter of zeros is still a float filter
    net = nn.Sequential(conv)
    dense = 3 * 2 * 9 * 25
    float_layer = measure_cost(net, input_shape=(2, 5, 5)).layers[0]
    assert (float_layer.params, float_layer.macs, float_layer.w_sparsity) == (54, dense, 0.0)
    assert float_layer.bops == dense * 1024
    masked = measure_cost(net, input_shape=(2, 5, 5), layers={"0": LayerQuant(masked=True)}).layers[0]
    assert masked.macs == dense - 19 * 25
    quantized = measure_cost(net, input_shape=(2, 5, 5), layers={"0": LayerQuant(w_bits=8)}).layers[0]
    assert quantized.macs == dense - 19 * 25, "a quantized layer's zeros are pruned weights"


def test_a_float_policy_with_weight_sparsity_is_charged_what_its_mask_removed() -> None:
    from autoprune.compress import static_compress
    from autoprune.policy import Policy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 25, 3, bias=False))
    result = static_compress(net, Policy.from_dict({"layers": {"0": {"w_sparsity": 0.5}}}), input_shape=(2, 5, 5))
    conv, linear = result.cost((2, 5, 5)).layers
    assert (conv.w_bits, conv.params, conv.macs) == (32, 36, 36 * 25)
    assert (linear.params, linear.macs) == (300, 300)


def test_memory_by_hand_on_two_layers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(100, 10, bias=False))
    quant = {"0": LayerQuant(w_bits=4, a_bits=6), "2": LayerQuant(w_bits=2, a_bits=4, f_sparsity=0.5)}
    report = measure_cost(net, input_shape=(3, 5, 5), layers=quant, input_bits=8)
    conv_mb = (4 * 3 * 9 * 4 + 3 * 25 * 8) / 1e6  # weights at 4 bits + the 8-bit network input
    linear_mb = (100 * 10 * 2 + 100 * 4 * 0.5) / 1e6  # weights at 2 bits + half the features at 4 bits
    assert [layer.memory_mb for layer in report.layers] == pytest.approx([conv_mb, linear_mb])
    assert report.total.memory_mb == pytest.approx(conv_mb + linear_mb)
    assert report.performance_density(90.0) == pytest.approx(90.0 / (conv_mb + linear_mb))


def test_report_serialises_and_renders() -> None:
    report = measure_cost(build_model("digits_cnn"), input_shape=(1, 8, 8))
    data = json.loads(json.dumps(report.to_dict()))
    assert [layer["name"] for layer in data["layers"]] == ["features.0", "features.3", "features.7", "classifier"]
    assert data["layers"][1]["out_hw"] == [8, 8]
    assert data["total"]["macs"] == sum(layer["macs"] for layer in data["layers"]) == 601_600
    assert data["total"]["params"] == 25_744
    out = io.StringIO()
    Console(file=out, width=220).print(format_cost_table(report, title="digits"))
    text = out.getvalue()
    assert "601.60 K" in text and "total" in text and "digits" in text
    assert [format_count(v) for v in (512, 0.5, 999.7, 1_234_567, 607_600_640 * 1024)] == ["512", "0.5", "1.00 K", "1.23 M", "622.18 G"]


def test_mode_is_restored_and_bad_input_is_named() -> None:
    net = _two_convs(4)
    net.train()
    net[0].eval()
    measure_cost(net, input_shape=(3, 6, 6))
    assert net.training and not net[0].training and net[2].training
    with pytest.raises(AutopruneError, match="nope"):
        measure_cost(net, input_shape=(3, 6, 6), layers={"nope": LayerQuant()})
    with pytest.raises(AutopruneError, match="w_bits"):
        LayerQuant(w_bits=0)
    with pytest.raises(AutopruneError, match="f_sparsity"):
        LayerQuant(f_sparsity=1.0)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    # a layer called twice (as an unrolled recurrent layer's hidden Linear is, once per step) counts both calls
    (layer,) = measure_cost(nn.Sequential(shared, shared), input_shape=(3, 4, 4)).layers
    assert layer.macs == 2 * 3 * 3 * 9 * 16 and layer.out_hw == (32,) and layer.in_elements == 2 * 3 * 16
