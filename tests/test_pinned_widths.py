"""Widths Torch-Pruning cannot remove consistently are pinned with a stated reason, never a crash (issue 23):
grouped convolutions, a channel shuffle, a model whose graph cannot be traced. Depthwise convs stay prunable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.compress import static_compress
from autoprune.errors import AutopruneError
from autoprune.policy import Policy
from autoprune.prune import channel_groups, pinned_widths, prune_structured

HALF = Policy(layers={"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 4}})


class Grouped(nn.Module):
    """conv1 feeds a grouped conv (2 groups); a depthwise conv and conv4 follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv4 = nn.Conv2d(8, 16, 1)
        self.conv5 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.conv5(torch.relu(self.conv4(x))).mean((2, 3)))


class Shuffled(nn.Module):
    """conv1's channels pass a channel shuffle (view, transpose, view) before conv2 reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.conv2(x).mean((2, 3)))


class Untraceable(nn.Module):
    """A conv whose output Torch-Pruning's tracer cannot follow (it raises inside its graph build)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_layers_reaching_a_grouped_conv_are_pinned_and_a_depthwise_group_is_not() -> None:
    torch.manual_seed(0)
    model = Grouped()
    pinned = pinned_widths(model, example_input=X)
    assert set(pinned) == {"conv1", "conv2", "conv3"}  # conv3 (depthwise) shares conv2's channels
    assert "grouped convolution conv2 (groups=2)" in pinned["conv1"]
    assert [g.layers for g in channel_groups(model, example_input=X)] == [("conv4", "conv5")]
    result = static_compress(model, HALF, input_shape=(3, 8, 8))
    assert set(result.pinned) == {"conv1", "conv2", "conv3"}
    assert (result.model.conv1.out_channels, result.model.conv2.out_channels, result.model.conv4.out_channels) == (8, 8, 8)
    assert result.model.conv5.groups == 8 and result.model(X).shape == (2, 4)


def test_naming_a_pinned_layer_says_why() -> None:
    model = Grouped()
    with pytest.raises(AutopruneError, match=r"keep\['conv1'\]: 0.5 cannot be applied: its width is pinned: .*grouped convolution conv2"):
        prune_structured(model, keep={"conv1": 0.5}, example_input=X)
    policy = Policy(layers={"conv1": {"keep_ratio": 0.5}})
    with pytest.raises(AutopruneError, match=r"policy.layers\['conv1'\].keep_ratio: 0.5 cannot apply: its width is pinned"):
        static_compress(model, policy, input_shape=(3, 8, 8))


def test_a_channel_shuffle_pins_the_shuffled_channels() -> None:
    torch.manual_seed(0)
    model = Shuffled()
    # Torch-Pruning would remove conv2's input channels 0..3 for conv1's 0..3, which the shuffle sent to 0, 2, 4, 6.
    assert "reshaped (a channel shuffle?) before convolution conv2" in pinned_widths(model, example_input=X)["conv1"]
    result = static_compress(model, HALF, input_shape=(3, 8, 8))
    assert result.model.conv1.out_channels == 8 and result.model.conv2.out_channels == 4
    assert set(result.pinned) == {"conv1"}


def test_a_model_torch_pruning_cannot_trace_keeps_every_width(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_pruning as tp

    def failing(*_args: object, **_kwargs: object) -> None:
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", failing)
    model = Untraceable()
    pinned = pinned_widths(model, example_input=X)
    assert pinned == {name: "Torch-Pruning cannot trace the model's channel dependencies (ZeroDivisionError: integer division or modulo by zero)" for name in ("conv", "head")}
    result = static_compress(model, HALF, input_shape=(3, 8, 8))
    assert result.model.conv.out_channels == 8 and set(result.pinned) == {"conv", "head"}  # which is the output is not known either


class Scaled(nn.Module):
    """A layer scale laid out for the channels (``gamma.reshape(1, -1, 1, 1)``, as timm's ConvNeXt): a reshape that
    keeps the channel order, so the width stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x) * self.gamma.reshape(1, -1, 1, 1)
        return self.head(self.conv2(x).mean((2, 3)))


def test_a_layer_scale_reshaped_for_the_channels_leaves_them_prunable() -> None:
    torch.manual_seed(0)
    model = Scaled()
    assert pinned_widths(model, example_input=X) == {}
    result = static_compress(model, HALF, input_shape=(3, 8, 8))
    assert (result.model.conv1.out_channels, result.model.gamma.numel(), result.model.conv2.in_channels) == (4, 4, 4)


class HandAttention(nn.Module):
    """Attention written by hand, as Hugging Face's BERT is: q, k and v each reshaped into heads of 4 features
    (``view(n, length, -1, 4)``), then a feed-forward block whose hidden width is free."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(5))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        x = self.embed(x)
        q, k, v = (proj(x).view(n, length, -1, 4).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v
        x = x + self.out(attended.transpose(1, 2).reshape(n, length, -1))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_linear_reshaped_into_heads_is_pinned_and_the_mlp_stays_prunable() -> None:
    torch.manual_seed(0)
    model = HandAttention()
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    pinned = pinned_widths(model, example_input=tokens)
    assert set(pinned) == {"q", "k", "v"}
    assert "the output of q is reshaped into heads" in pinned["q"]
    assert ("fc1",) in [g.layers for g in channel_groups(model, example_input=tokens)]
    # Removed channel by channel, 6 of q's 8 features would not reshape into heads of 4: the forward pass would fail.
    three_quarters = Policy(layers={"_default": {"keep_ratio": 0.75, "w_bits": 4, "a_bits": 4}})
    result = static_compress(model, three_quarters, input_shape=(5, 8))
    assert (result.model.q.out_features, result.model.k.out_features, result.model.v.out_features, result.model.fc1.out_features) == (8, 8, 8, 12)
    assert set(result.pinned) >= {"q", "k", "v"} and result.model(tokens).shape == (2, 4)
