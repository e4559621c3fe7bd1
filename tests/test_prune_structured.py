"""Structured pruning: channel groups, signal-norm and PfQ pruners, BN folding, records and replay."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import build_model, compressible_layers, default_input_shape
from autoprune.prune import (
    ChannelGroup,
    StructuredRecord,
    channel_groups,
    fold_batchnorm,
    keep_count,
    prune_structured,
    PfQ,
    pruner,
    replay_structured,
)

ZOO = ["digits_cnn", "vgg7_x0.25", "resnet20", "mobilenetv2"]


def _model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(name).eval()
    _randomise_bn(model)
    return model, torch.randn(2, *default_input_shape(name))


def _randomise_bn(model: nn.Module) -> None:
    # Untrained BNs are the identity; random statistics make folding and pruning visible in the outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            assert module.running_var.shape == (n,)


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv2d + Linear multiply-accumulates of one sample, counted by hooks (DESIGN's MACs definition)."""
    total = 0

    def count(layer: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else layer.in_features
        total += out[0].numel() * per_output

    handles = [m.register_forward_hook(count) for m in compressible_layers(model).values()]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mac_counter_matches_the_design_reference() -> None:
    model = build_model("vgg7").eval()
    assert _macs(model, torch.zeros(1, 3, 32, 32)) == 607_600_640


@pytest.mark.parametrize("name", ZOO)
def test_every_group_prunes_to_its_rounded_keep_ratio_and_runs(name: str) -> None:
    model, x = _model(name)
    groups = channel_groups(model, example_input=x)
    layers = compressible_layers(model)
    classifier = list(layers)[-1]
    grouped = [layer for g in groups for layer in g.layers]
    assert len(grouped) == len(set(grouped)), "a layer sits in two groups"
    assert set(grouped) == set(layers) - {classifier}, "every layer but the classifier is searched"
    assert all(layers[layer].weight.shape[0] == g.channels for g in groups for layer in g.layers)
    params, macs = _params(model), _macs(model, x)

    record = prune_structured(model, keep={layer: 0.3 for layer in grouped}, example_input=x)

    layers = compressible_layers(model)
    for group in groups:
        for layer in group.layers:
            assert layers[layer].weight.shape[0] == keep_count(0.3, group.channels) == round(0.3 * group.channels)
            assert record.layers[layer].after == len(record.layers[layer].kept) == round(0.3 * group.channels)
            assert record.layers[layer].before == group.channels
    assert model(x).shape == (2, 10)
    assert _params(model) < 0.2 * params
    assert _macs(model, x) < 0.2 * macs


def test_macs_fall_as_predicted_on_vgg7() -> None:
    model, x = _model("vgg7_x0.25")
    widths = [32, 32, 64, 64, 128, 128]
    sizes = [32, 32, 16, 16, 8, 8]

    def predicted(c: list[int]) -> int:
        ins = [3, *c[:-1]]
        return sum(ci * co * s * s * 9 for ci, co, s in zip(ins, c, sizes)) + c[-1] * 4 * 4 * 10

    assert _macs(model, x) == predicted(widths)
    names = [g.name for g in channel_groups(model, example_input=x)]
    keep = dict(zip(names, [0.5, 0.25, 0.75, 0.5, 0.3, 0.6], strict=True))
    prune_structured(model, keep=keep, example_input=x)
    assert _macs(model, x) == predicted([16, 8, 48, 32, 38, 77])


def test_groups_couple_residual_adds_and_depthwise_convs() -> None:
    resnet, x = _model("resnet20")
    by_name = {g.name: g for g in channel_groups(resnet, example_input=x)}
    assert by_name["conv1"].layers == ("conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2")
    assert by_name["layers.3.conv2"].layers == ("layers.3.conv2", "layers.3.shortcut.0", "layers.4.conv2", "layers.5.conv2")
    assert by_name["layers.0.conv1"].layers == ("layers.0.conv1",)
    assert len(by_name) == 12

    mobilenet, x = _model("mobilenetv2")
    by_name = {g.name: g for g in channel_groups(mobilenet, example_input=x)}
    assert by_name["features.0"].layers == ("features.0", "features.3.conv.0")  # stem and the first depthwise
    assert by_name["features.4.conv.0"].layers == ("features.4.conv.0", "features.4.conv.3")
    assert by_name["features.4.conv.6"].layers == ("features.4.conv.6", "features.5.conv.6")  # residual add


def test_residual_group_is_pruned_consistently() -> None:
    model, x = _model("resnet20")
    members = ("conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2")
    record = prune_structured(model, keep={m: 0.5 for m in members}, example_input=x)
    assert set(record.layers) == set(members)
    assert len({tuple(record.layers[m].kept) for m in members}) == 1
    assert model.bn1.num_features == model.layers[2].bn2.num_features == model.layers[3].conv1.in_channels == 8
    assert model(x).shape == (2, 10)


def test_conflicting_ratios_in_a_residual_group_raise_and_leave_the_model_alone() -> None:
    model, x = _model("resnet20")
    params = _params(model)
    with pytest.raises(AutopruneError) as err:
        prune_structured(model, keep={"conv1": 0.5, "layers.1.conv2": 0.75}, example_input=x)
    message = str(err.value)
    assert "conv1" in message and "layers.1.conv2" in message and "0.5" in message and "0.75" in message
    assert _params(model) == params
    with pytest.raises(AutopruneError, match=r"'layers.0.conv2': 1.0"):  # a member not named keeps 1.0
        prune_structured(model, keep={"conv1": 0.5, "layers.1.conv2": 0.5, "layers.2.conv2": 0.5}, example_input=x)
    with pytest.raises(AutopruneError, match="model's output"):
        prune_structured(model, keep={"fc": 0.5}, example_input=x)
    with pytest.raises(AutopruneError, match="not a Conv1d / Conv2d / Linear layer"):
        prune_structured(model, keep={"layers.0.bn1": 0.5}, example_input=x)
    with pytest.raises(AutopruneError, match=r"\(0, 1\]"):
        prune_structured(model, keep={"conv1": 0.0}, example_input=x)
    prune_structured(model, keep={"fc": 1.0, "conv1": 1.0, "layers.0.conv2": 1.0}, example_input=x)
    assert _params(model) == params


def test_unknown_pruner_names_the_registered_ones() -> None:
    with pytest.raises(AutopruneError, match=r"is not registered \(registered: signal_norm, pfq, none\)"):
        pruner("l1")


@pytest.mark.parametrize("method", ["pfq", "none"])
def test_pruners_that_choose_channels_refuse_keep_ratios(method: str) -> None:
    model, x = _model("digits_cnn")
    with pytest.raises(AutopruneError, match="ignored by pruner"):
        prune_structured(model, keep={"features.0": 0.5}, example_input=x, method=method)


def test_signal_norm_removes_the_smallest_norm_filters() -> None:
    model, x = _model("digits_cnn")
    scales = torch.randperm(16).double() + 1.0
    with torch.no_grad():
        model.features[0].weight.copy_(torch.randn(16, 1, 3, 3).sign() * scales.view(-1, 1, 1, 1))
    original = model.features[0].weight.detach().clone()
    record = prune_structured(model, keep={"features.0": 0.25}, example_input=x)
    largest = sorted(torch.argsort(scales, descending=True)[:4].tolist())
    assert record.layers["features.0"].kept == largest
    assert torch.equal(model.features[0].weight, original[largest])
    assert model.features[3].in_channels == 4


def test_signal_norm_sums_the_signal_over_a_coupled_group() -> None:
    model, x = _model("resnet20")
    members = [model.conv1, model.layers[0].conv2, model.layers[1].conv2, model.layers[2].conv2]
    with torch.no_grad():
        for layer in members:
            layer.weight.mul_(1e-3)
        members[0].weight[0].fill_(1.0)  # the strongest filter of conv1 alone: 27 * 1.0 = 27
        members[1].weight[5].fill_(0.4)  # channel 5 in two members: 2 * 144 * 0.16 = 46 > 27
        members[2].weight[5].fill_(0.4)
    names = ("conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2")
    record = prune_structured(model, keep={name: 1 / 16 for name in names}, example_input=x)
    assert record.layers["conv1"].kept == [5]


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "mobilenetv2"])
def test_fold_batchnorm_leaves_outputs_unchanged(name: str) -> None:
    model, x = _model(name)
    before = model(x)
    folded = fold_batchnorm(model)
    assert folded is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


class Chain(nn.Module):
    """conv -> BN -> ReLU -> head: PfQ prunes conv's channels and folds their constant into the head."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))))


HEADS = {
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5)), "head.1.bias"),
    "1x1_then_bn": (lambda: nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)), "head.1.running_mean"),
    "3x3_unpadded": (lambda: nn.Conv2d(8, 4, 3, padding=0, bias=False), "head.bias"),
    "3x3_zero_padded": (lambda: nn.Conv2d(8, 4, 3, padding=1, bias=True), "head.bias"),
}
DEAD = [1, 4, 6]


def _chain(head: str) -> tuple[Chain, torch.Tensor]:
    torch.manual_seed(1)
    model = Chain(HEADS[head][0]()).eval()
    _randomise_bn(model)
    with torch.no_grad():
        model.bn.running_var[2] = 2e-6  # just above eps: stays
        for c, beta in zip(DEAD, (0.7, 1.3, -0.4)):  # constant channels: beta through ReLU, one clipped to 0
            model.conv.weight[c] = 0.0
            model.bn.running_mean[c] = 0.0
            model.bn.running_var[c] = 1e-8
            model.bn.bias[c] = beta
    return model, torch.randn(3, 3, 6, 6)


@pytest.mark.parametrize("head", ["linear", "1x1_then_bn", "3x3_unpadded"])
def test_pfq_removes_constant_channels_without_changing_outputs(head: str) -> None:
    model, x = _chain(head)
    before = model(x)
    record = prune_structured(model, keep={}, example_input=x, method=PfQ(eps=1e-6))
    assert record.layers["conv"].kept == [0, 2, 3, 5, 7]
    assert model.conv.out_channels == model.bn.num_features == 5
    assert set(record.folds) == {HEADS[head][1]}
    assert max(abs(v) for v in record.folds[HEADS[head][1]]) > 0.1, "the fold must matter for this test to mean anything"
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_pfq_into_a_zero_padded_conv_changes_only_border_outputs() -> None:
    model, x = _chain("3x3_zero_padded")
    before = model(x)
    prune_structured(model, keep={}, example_input=x, method=PfQ(eps=1e-6))
    after = model(x)
    assert model.head.in_channels == 5
    torch.testing.assert_close(after[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
    assert (after - before).abs().amax() > 0.05


def test_pfq_threshold_is_strict() -> None:
    model, x = _chain("linear")
    var = float(model.bn.running_var[2])
    record = prune_structured(model, keep={}, example_input=x, method=PfQ(eps=var))
    assert record.layers["conv"].kept == [0, 2, 3, 5, 7]  # V < eps (eq. 17): V == eps stays
    model, x = _chain("linear")
    record = prune_structured(model, keep={}, example_input=x, method=PfQ(eps=var * 1.01))
    assert record.layers["conv"].kept == [0, 3, 5, 7]


def test_pfq_prunes_a_residual_channel_only_when_every_bn_of_its_group_is_constant() -> None:
    model, x = _model("resnet20")
    model.bn1.running_var[3] = 1e-8
    assert prune_structured(model, keep={}, example_input=x, method="pfq").layers == {}
    for block in model.layers[:3]:
        block.bn2.running_var[3] = 1e-8
    record = prune_structured(model, keep={}, example_input=x, method="pfq")
    assert set(record.layers) == {"conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2"}
    assert record.layers["conv1"].kept == [c for c in range(16) if c != 3]
    assert {"layers.0.bn1.running_mean", "layers.3.conv1", "layers.3.shortcut.1.running_mean"} - set(record.folds) == {"layers.3.conv1"}
    assert model(x).shape == (2, 10)


def _roundtrip(record: StructuredRecord) -> StructuredRecord:
    return StructuredRecord.from_dict(json.loads(json.dumps(record.to_dict())))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_replay_reproduces_a_signal_norm_pruned_model_exactly(name: str) -> None:
    model, x = _model(name)
    fresh = copy.deepcopy(model)
    groups = channel_groups(model, example_input=x)
    keep = {layer: (0.3, 0.5, 0.8)[i % 3] for i, g in enumerate(groups) for layer in g.layers}
    record = prune_structured(model, keep=keep, example_input=x)
    replay_structured(fresh, _roundtrip(record), example_input=x)
    assert torch.equal(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict())


def test_replay_reproduces_pfq_folds_and_created_biases_exactly() -> None:
    model, x = _chain("3x3_unpadded")
    fresh = copy.deepcopy(model)
    record = prune_structured(model, keep={}, example_input=x, method="pfq")
    assert fresh.head.bias is None
    replay_structured(fresh, _roundtrip(record), example_input=x)
    assert torch.equal(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict())


def test_replay_refuses_a_record_of_another_model() -> None:
    model, x = _model("resnet20")
    record = prune_structured(copy.deepcopy(model), keep={"layers.0.conv1": 0.5, "conv1": 1.0}, example_input=x)
    digits, dx = _model("digits_cnn")
    with pytest.raises(AutopruneError, match="not a prunable layer"):
        replay_structured(digits, record, example_input=dx)
    stream = {"conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2"}
    record = prune_structured(copy.deepcopy(model), keep=dict.fromkeys(stream, 0.5), example_input=x)
    partial = StructuredRecord(method=record.method, layers={"conv1": record.layers["conv1"]})
    with pytest.raises(AutopruneError, match="missing from group conv1"):
        replay_structured(model, partial, example_input=x)


def test_a_model_of_tabular_features_traced_on_one_sample_has_its_hidden_channels_pruned() -> None:
    """A 2-D input straight into a Linear, traced on a batch of one: Torch-Pruning failed on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x = torch.randn(1, 6)
    assert channel_groups(model, example_input=x) == [ChannelGroup(name="0", layers=("0",), channels=8)]
    record = prune_structured(model, keep={"0": 0.5}, example_input=x)
    assert (model[0].out_features, model[2].in_features) == (4, 4)
    assert (record.layers["0"].before, record.layers["0"].after) == (8, 4) and model(torch.randn(3, 6)).shape == (3, 1)
