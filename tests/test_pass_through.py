"""Layers that pass through (issue 23): normalizations, a class token, a position embedding and a layer scale
are kept in float and listed, not refused; a parameter a model multiplies activations by is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.compress import static_compress
from autoprune.errors import UnsupportedLayerError
from autoprune.models import check_products, check_supported, float_parameters
from autoprune.policy import Policy

HALF = Policy(layers={"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 4}})


class Tokens(nn.Module):
    """A ViT without attention: patches, a class token, a position embedding, LayerNorm, an MLP with a layer
    scale, a GroupNorm'd conv stem; parameters of its own at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU())
        self.patch = nn.Conv2d(8, 8, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.position = nn.Parameter(torch.randn(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.layer_scale = nn.Parameter(torch.full((8,), 0.1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(self.stem(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        x = x + self.layer_scale * self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x[:, 0])


class Mixer(nn.Module):
    """Multiplies its input by a parameter of its own: a product autoprune would not count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.conv(x).mean((2, 3)), self.mix)


def test_normalizations_and_loose_parameters_pass_through_and_are_listed() -> None:
    torch.manual_seed(0)
    model = Tokens()
    check_supported(model)
    check_products(model, input_shape=(3, 8, 8))
    listed = float_parameters(model)
    assert set(listed) == {"class_token", "position", "layer_scale", "stem.1.weight", "stem.1.bias", "norm.weight", "norm.bias"}
    assert listed["stem.1.weight"] == "GroupNorm (a normalization)"
    assert listed["class_token"] == "Tokens (added or scaled by, no product)"


def test_a_model_with_tokens_and_norms_compresses_at_half_width() -> None:
    torch.manual_seed(0)
    model = Tokens()
    result = static_compress(model, HALF, input_shape=(3, 8, 8))
    assert result.model.fc1.out_features == 8  # the MLP's hidden width halves ...
    # ... and the token stream's, class token, position embedding, layer scale and LayerNorm with it
    assert (result.model.patch.out_channels, result.model.class_token.shape[-1], result.model.position.shape[-1]) == (4, 4, 4)
    assert (result.model.layer_scale.numel(), result.model.norm.normalized_shape) == (4, (4,))
    # GroupNorm(2 groups) would lose channels unevenly between its groups: the stem's width is pinned
    assert result.model.stem[0].out_channels == 8 and "GroupNorm stem.1 (2 groups)" in result.pinned["stem.0"]
    assert set(result.float_parameters) >= {"class_token", "position", "layer_scale"}
    out = result.model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_a_parameter_multiplying_activations_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"^model.mix: 'matmul' multiplies activations by this parameter"):
        check_products(Mixer(), input_shape=(3, 8, 8))
    with pytest.raises(UnsupportedLayerError, match=r"^model.mix: 'matmul'"):
        static_compress(Mixer(), HALF, input_shape=(3, 8, 8))


def test_attention_is_still_refused_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    with pytest.raises(UnsupportedLayerError, match=r"^model.1: 'MultiheadAttention' is a layer type autoprune cannot compress"):
        check_supported(model)


class Functional(nn.Module):
    """Uses its Linear's weight through ``F.linear`` (as torchvision's Swin does): the layer's forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.conv(x).mean((2, 3)), self.qkv.weight, self.qkv.bias)


def test_a_layer_used_outside_its_forward_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"^model.qkv: 'linear' reads this layer's weight outside the layer's own forward"):
        check_products(Functional(), input_shape=(3, 8, 8))


def test_a_task_around_a_model_with_an_unseen_product_is_refused_before_any_search() -> None:
    from torch.utils.data import TensorDataset

    from autoprune.task import Task

    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))
    with pytest.raises(UnsupportedLayerError, match=r"^model.qkv: 'linear' reads this layer's weight outside"):
        Task.from_model(Functional(), train=data, val=data, signal_steps=0)
