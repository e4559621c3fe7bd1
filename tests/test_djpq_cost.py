"""DJPQ's BOPs and what it quantizes: a depthwise Conv1d takes its keep ratio once, the network input is
quantized at the ``input_bits`` its cost charges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.djpq import DJPQModel, build_layout

SHAPE = (1, 16)


def _net(*, input_bits: int) -> DJPQModel:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 4),
    ).eval()
    layout = build_layout(
        model, input_shape=SHAPE, batches=[torch.randn(16, *SHAPE)], input_bits=input_bits, init_w_bits=6,
        init_a_bits=5, q_s_ratio=1e-3, pow2=False, alpha_th=1e-3, tau=1.0, init_log_sigma2=-9.0,
    )
    return DJPQModel(model, layout).eval()


def test_a_depthwise_conv1d_takes_its_keep_ratio_once() -> None:
    net = _net(input_bits=8)
    assert net.layout.layers["3"].depthwise
    with torch.no_grad():
        net.gate("0").mu[::2] = 0.0  # half the channels of the group the depthwise conv reads and writes
    bits = net.bits(soft=False)
    # 8 channels x 3 taps x 16 positions = 384 MACs, half of them left: 192 x b_w x b_a (it was a quarter)
    per_layer = 192 * bits["3"][0] * bits["3"][1]
    others = sum(net.layout.layers[n].macs * 0.5 * bits[n][0] * bits[n][1] for n in ("0", "7"))
    assert float(net.bops(soft=False)) == pytest.approx(per_layer + others)


@pytest.mark.parametrize("input_bits", [2, 4])
def test_the_network_input_is_quantized_at_input_bits(input_bits: int) -> None:
    net = _net(input_bits=input_bits)
    seen = []
    net.model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    net(torch.randn(32, *SHAPE))
    assert len(torch.unique(seen[0])) <= 2**input_bits
    assert net.bits(soft=False)["0"][1] == input_bits
    net.quantized = False  # the first stage of the two-stage baseline trains the float model
    seen.clear()
    net(torch.randn(32, *SHAPE))
    assert len(torch.unique(seen[0])) > 2**input_bits
