"""Conv1d and BatchNorm1d through every transform, and MNIST-1D: values computed by hand, as the Conv2d tests."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.cli import parse_input_shape
from autoprune.cost import LayerQuant, measure_cost
from autoprune.errors import AutopruneError
from autoprune.models import build_model, check_supported, compressible_layers, default_input_shape
from autoprune.prune import FeatureMasker, PfQ, channel_groups, fold_batchnorm, keep_largest, prune_structured
from autoprune.quant import act_quantizer, weight_quantizer
from autoprune.signals import SignalTracker, layer_priors


def _conv1d(weight: list) -> nn.Conv1d:
    conv = nn.Conv1d(len(weight[0]), len(weight), len(weight[0][0]), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight))
    return conv


def test_conv1d_macs_bops_esn_by_hand() -> None:
    # One input channel of length 3, two filters of kernel 2: L_out = 2. At 4 bits delta = 1/8:
    # levels 7.5 (clamped), 4.5 | 2.5, -2.5 -> bits 4, 4 | 3, 3 (as the Linear case of test_cost).
    net = nn.Sequential(_conv1d([[[1.0, 0.5]], [[0.3, -0.3]]]))
    layer = measure_cost(net, input_shape=(1, 3), layers={"0": LayerQuant(w_bits=4)}, input_bits=8).layers[0]
    assert (layer.kind, layer.kernel, layer.out_hw, layer.in_elements) == ("conv", (2,), (2,), 3)
    assert layer.macs == 1 * 2 * 2 * 2  # c_in/groups x c_out x k x L_out
    assert layer.bops == 8 * 4 * 8  # reads the network input: input_bits
    assert layer.esn_a == 7.5**2 + 4.5**2 + 2 * 2.5**2
    assert layer.esn_d == 4 + 4 + 3 + 3
    assert layer.esn_d_prime == (2 * 4 + 2 * 3) * 2
    assert layer.esn_a_comp == layer.esn_a * 2 and layer.esn_d_comp == 14 * 2  # c^l = L_out
    assert layer.memory_mb == pytest.approx((4 * 4 + 3 * 8) / 1e6)


def test_grouped_strided_conv1d_and_the_mnist1d_cnn_macs() -> None:
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2))
    layer = measure_cost(grouped, input_shape=(4, 6)).layers[0]
    assert layer.out_hw == (3,) and layer.macs == 4 / 2 * 6 * 3 * 3
    report = measure_cost(build_model("mnist1d_cnn"), input_shape=(1, 40))
    # k5 1->32 at L 40, k3 32->32 at 40, 32->64 at 20, 64->64 at 10, then Linear 64*5 -> 10.
    expected = 1 * 32 * 5 * 40 + 32 * 32 * 3 * 40 + 32 * 64 * 3 * 20 + 64 * 64 * 3 * 10 + 320 * 10
    assert [lc.macs for lc in report.layers] == [6400, 122880, 122880, 122880, 3200]
    assert report.total.macs == expected and report.total.bops == expected * 1024


def test_esn_comp_weights_each_layer_by_its_computations_per_weight() -> None:
    # Conv2d 1->1 k1 on 3x3 (9 positions) with a quarter of its input features skipped: c = 9 x 0.75.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
    lin = nn.Linear(9, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    net = nn.Sequential(conv, nn.Flatten(), lin)
    report = measure_cost(net, input_shape=(1, 3, 3), layers={"0": LayerQuant(w_bits=2, f_sparsity=0.25), "2": LayerQuant(w_bits=2)})
    first, second = report.layers
    # 2 bits, delta = max / 2: every weight is at the top level 1.5 (2 bits).
    assert (first.esn_a, first.esn_d) == (1.5**2, 2)
    assert (first.esn_a_comp, first.esn_d_comp) == (1.5**2 * 9 * 0.75, 2 * 9 * 0.75)
    assert (second.esn_a_comp, second.esn_d_comp) == (9 * 1.5**2, 9 * 2)  # a Linear: c = 1
    assert report.total.esn_a_comp == 1.5**2 * 6.75 + 9 * 1.5**2


def test_input_shape_takes_cxl_and_cxhxw() -> None:
    assert parse_input_shape("1x40") == (1, 40) and parse_input_shape("3x32x32") == (3, 32, 32)
    for bad in ("40", "1x40x", "0x40", "1x2x3x4"):
        with pytest.raises(AutopruneError, match="--input"):
            parse_input_shape(bad)


def test_pruning_a_conv1d_group_removes_its_channels_and_their_macs() -> None:
    torch.manual_seed(0)
    model = build_model("mnist1d_cnn").eval()
    x = torch.randn(2, 1, 40)
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    assert set(groups) == {"features.0", "features.3", "features.7", "features.11"}
    before = measure_cost(model, input_shape=(1, 40)).layers
    record = prune_structured(model, keep={"features.3": 0.5, "features.11": 0.25}, example_input=x)
    assert record.layers["features.3"].after == 16 and record.layers["features.11"].after == 16
    assert model.features[3].out_channels == model.features[4].num_features == model.features[7].in_channels == 16
    assert model.classifier.in_features == 16 * 5
    assert model(x).shape == (2, 10)
    after = measure_cost(model, input_shape=(1, 40)).layers
    assert after[1].macs == before[1].macs / 2 and after[2].macs == before[2].macs / 2
    assert after[3].macs == before[3].macs / 4 and after[4].macs == before[4].macs / 4


def test_fold_batchnorm1d_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 3, 3, bias=False), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 2, 9)
    before = model(x)
    bn = model[1]
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    expected_weight = model[0].weight * scale[:, None, None]
    expected_bias = (model[0].bias - bn.running_mean) * scale + bn.bias
    fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    torch.testing.assert_close(model[0].weight, expected_weight)
    torch.testing.assert_close(model[0].bias, expected_bias)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_pfq_removes_constant_conv1d_channels_and_folds_their_response() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3),
    ).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        for c, beta in zip((1, 4), (0.8, -0.3)):  # dead filters: BN outputs beta, ReLU passes 0.8 and clips -0.3
            model[0].weight[c] = 0.0
            model[1].running_mean[c] = 0.0
            model[1].running_var[c] = 1e-8
            model[1].bias[c] = beta
    x = torch.randn(3, 2, 8)
    before = model(x)
    record = prune_structured(model, keep={}, example_input=x, method=PfQ(eps=1e-5))
    assert record.layers["0"].kept == [0, 2, 3, 5]
    assert model[0].out_channels == model[1].num_features == model[3].in_channels == 4
    assert set(record.folds) == {"4.running_mean"} and max(abs(v) for v in record.folds["4.running_mean"]) > 0.1
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["midrise", "clip_uniform", "delayed", "saturated"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_quantizers_give_b_bit_levels_on_conv1d_weights(name: str, bits: int) -> None:
    w = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(bits))
    q = weight_quantizer(name, bits=bits)
    w_q = q(w)
    assert w_q.shape == w.shape
    levels = torch.unique(w_q.detach().double() / q.delta)
    assert 2 < len(levels) <= 2**bits, "more than two levels used, never more than b bits hold"
    assert levels.min() < 0 < levels.max()
    torch.testing.assert_close(levels * 2, (levels * 2).round(), atol=1e-5, rtol=0, msg="on the half-integer (mid-rise) or integer grid")


def test_midrise_prunes_a_small_conv1d_filter() -> None:
    w = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    w[2] *= 1e-3 / w[2].abs().max()
    w_q = weight_quantizer("midrise", bits=3)(w)
    assert torch.all(w_q[2] == 0) and torch.all(w_q[[0, 1, 3]].flatten(1).abs().amax(1) > 0)


def test_act_quantizer_on_conv1d_features() -> None:
    q = act_quantizer("clip_uniform", bits=3)
    x = torch.relu(torch.randn(16, 4, 40, generator=torch.Generator().manual_seed(0)))
    q.observing = True
    q(x)
    q.observing = False
    q.fix_range()
    out = q(x)
    assert out.shape == x.shape and len(torch.unique(out)) <= 8 and torch.unique(out).min() == 0


def test_feature_mask_on_a_conv1d_reaches_its_sparsity() -> None:
    torch.manual_seed(0)
    scale = torch.logspace(-1.5, 1.5, 40)[torch.randperm(40)].reshape(4, 10)
    model = nn.Sequential(nn.Conv1d(4, 3, 1))
    masker = FeatureMasker(model, {"0": 0.5}, start=0, interval=1, updates=1, window=4)
    model.train()
    for step in range(3):
        model(torch.randn(32, 4, 10) * scale)
        masker.update(step)
    mask = masker.masks["0"].mask
    assert mask.shape == (4, 10) and (mask == 0).float().mean().item() == 0.5
    louder_half = keep_largest(scale, 0.5)
    assert (mask.bool() == louder_half).float().mean().item() >= 0.9, "the louder half of the (channel, position) features is kept"


def test_signal_tracking_and_priors_on_a_conv1d_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4 * 4, 3))
    check_supported(model)
    tracker = SignalTracker()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 1, 10), torch.randint(0, 3, (32,))
    for epoch in range(2):
        tracker.on_epoch_start(model, epoch)
        for step in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            tracker.on_step(model, epoch, step)
        tracker.on_epoch_end(model, epoch)
    signals = tracker.export()["signals"]
    assert set(signals["layers"]) == {"0", "5"}
    conv = signals["layers"]["0"]
    assert 0 < conv["N"][-1] < conv["S"][-1] and conv["snr"][-1] == conv["S"][-1] / conv["N"][-1]
    priors = layer_priors(model, signals)
    assert all(1 <= b <= 16 for p in priors.values() for b in p.bits_by_kappa.values())
    assert 0 < priors["0"].keep_hint <= 1


def test_1d_pooling_is_supported_and_compressible_layers_include_conv1d() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1), nn.AdaptiveMaxPool1d(1), nn.MaxPool1d(1))
    check_supported(model)
    assert list(compressible_layers(model)) == ["0"]


def test_mnist1d_is_generated_deterministically_and_split_8000_2000_2000() -> None:
    from autoprune.data import load_dataset
    from autoprune.task import task_for

    random.seed(7)
    np.random.seed(7)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    splits = load_dataset("mnist1d", seed=0)
    assert (random.random(), np.random.rand()) == (expected_py, expected_np), "the caller's random streams are untouched"
    assert splits.sizes() == (8000, 2000, 2000) and splits.input_shape == (1, 40) == default_input_shape("mnist1d_cnn")
    assert splits.num_classes == 10 and torch.bincount(splits.test.tensors[1]).tolist() == [200] * 10
    again = load_dataset("mnist1d", seed=0)
    assert torch.equal(splits.train.tensors[0], again.train.tensors[0])
    assert not torch.equal(load_dataset("mnist1d", seed=1).test.tensors[1], splits.test.tensors[1]), "the seed moves the split"
    task = task_for("mnist1d_cnn")
    assert task.spec.dataset == "mnist1d" and task_for("mnist1d_cnn", epochs=3).spec.train.epochs == 3


@pytest.mark.e2e
def test_mnist1d_cnn_has_a_slope_float_93_and_w2a2_ptq_losing_5_points() -> None:
    from autoprune.compress import compress
    from autoprune.policy import Policy
    from autoprune.task import accuracy, task_for

    task = task_for("mnist1d_cnn")
    start = time.process_time()
    base = task.base(progress=False)
    cpu_seconds = time.process_time() - start
    ptq = {}
    for bits in (2, 4):
        policy = Policy.from_dict({"layers": {"_default": {"w_bits": bits, "a_bits": bits}}, "finetune_steps": 0})
        ptq[bits] = accuracy(compress(base.model, policy, task=task).model, task.splits.test)
    print(
        f"\nmnist1d_cnn: float val {base.val_accuracy:.2f}% test {base.test_accuracy:.2f}%, "
        f"W2A2 PTQ test {ptq[2]:.2f}%, W4A4 PTQ test {ptq[4]:.2f}%, "
        f"training {base.train_seconds:.1f} s wall, {cpu_seconds:.1f} s CPU (cached: {base.from_cache})"
    )
    assert base.test_accuracy >= 93.0
    assert base.test_accuracy - ptq[2] >= 5.0
