"""The model zoo: CNNs of Conv1d / Conv2d, BatchNorm, ReLU, pooling and Linear layers, and two sequence
models for MNIST-1D (a GRU and a small transformer encoder), whose recurrent and attention layers
``build_model`` turns into Linear layers and explicit products (``autoprune.models.convert``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, *, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def _conv_bn_relu_1d(cin: int, cout: int, *, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Three conv layers for 8x8 digits: small enough to train in seconds, deep enough to prune."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 64))
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c3 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MNIST1DCNN(nn.Module):
    """Four Conv1d layers for MNIST-1D's 1x40 signals (about 25k weights).

    Sized so compression has a price: about 99% float test accuracy after 20 epochs on 8,000 signals, which
    uniform W4A4 post-training quantization keeps to half a point, W3A3 loses 2 points and W2A2 about 30
    (the digits CNN keeps about 97% at W2).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = (max(1, round(c * width)) for c in (32, 32, 64, 64))
        self.features = nn.Sequential(
            *_conv_bn_relu_1d(in_channels, c1, kernel=5),
            *_conv_bn_relu_1d(c1, c2),
            nn.MaxPool1d(2),
            *_conv_bn_relu_1d(c2, c3),
            nn.MaxPool1d(2),
            *_conv_bn_relu_1d(c3, c4),
            nn.MaxPool1d(2),
        )
        self.classifier = nn.Linear(c4 * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG7(nn.Module):
    """VGG7 of seed 001 App. F Table 1 for 32x32 inputs: widths 128-128-256-256-512-512 at x1."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [max(1, round(w * width)) for w in (128, 128, 256, 256, 512, 512)]
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c[0]),
            *_conv_bn_relu(c[0], c[1]),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c[1], c[2]),
            *_conv_bn_relu(c[2], c[3]),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c[3], c[4]),
            *_conv_bn_relu(c[4], c[5]),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c[5] * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-20 of He et al. (2016) for 32x32 inputs (1x1 projection shortcuts)."""

    def __init__(self, *, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth}: ResNet for CIFAR needs depth = 6n + 2")
        n = (depth - 2) // 6
        widths = [max(1, round(w * width)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn_relu(cin, hidden, kernel=1)
        layers += _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs: stride 1 in the stem and first stages."""

    # expansion t, channels c, repeats n, stride s; strides of the ImageNet model reduced for 32x32
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = max(8, round(32 * width))
        layers: list[nn.Module] = [*_conv_bn_relu(in_channels, stem)]
        cin = stem
        for t, c, n, s in self.CONFIG:
            cout = max(8, round(c * width))
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = max(64, round(1280 * width))
        layers += _conv_bn_relu(cin, last, kernel=1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MNIST1DGRU(nn.Module):
    """The GRU of the MNIST-1D paper (Greydanus, 2020; its ``GRUBase``): a bidirectional GRU of hidden size 6
    over the 40 steps of the signal, every step's output flattened into one Linear classifier (5,134 weights)."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, hidden: int = 6, steps: int = 40) -> None:
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden * steps, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.gru(x.transpose(1, 2))[0], 1))


class MNIST1DTransformer(nn.Module):
    """A small pre-norm transformer encoder over the 40 steps of an MNIST-1D signal read as tokens: each step
    embedded by a convolution over its 5-step neighbourhood, a learned positional embedding, 2 layers of width
    32 with 2 heads and an MLP of 64, then the mean token into a Linear classifier.

    The convolution embedding matters: a Linear embedding of each step alone trained to 59% test accuracy in
    the built-in base training (20 epochs of SGD), the convolution to 95.5%."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 32, heads: int = 2, layers: int = 2,
                 hidden: int = 64, steps: int = 40) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, width, 5, padding=2)
        self.position = nn.Embedding(steps, width)
        layer = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[-1], device=x.device)
        tokens = self.embed(x).transpose(1, 2) + self.position(steps)
        return self.classifier(self.norm(self.encoder(tokens)).mean(dim=1))


ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, tuple[ModelFactory, tuple[int, ...]]] = {
    "digits_cnn": (DigitsCNN, (1, 8, 8)),
    "mnist1d_cnn": (MNIST1DCNN, (1, 40)),
    "mnist1d_gru": (MNIST1DGRU, (1, 40)),
    "mnist1d_transformer": (MNIST1DTransformer, (1, 40)),
    "vgg7": (VGG7, (3, 32, 32)),
    "vgg7_x0.5": (lambda **kw: VGG7(width=0.5, **kw), (3, 32, 32)),
    "vgg7_x0.25": (lambda **kw: VGG7(width=0.25, **kw), (3, 32, 32)),
    "resnet20": (ResNetCifar, (3, 32, 32)),
    "mobilenetv2": (MobileNetV2Cifar, (3, 32, 32)),
}
