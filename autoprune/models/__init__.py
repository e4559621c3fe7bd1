"""Model lookup: a zoo name or any user factory given as ``package.module:factory``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.models.convert import MatMul, convert_model
from autoprune.models.zoo import MODELS, MNIST1DCNN, MNIST1DGRU, MNIST1DTransformer, DigitsCNN, MobileNetV2Cifar, ResNetCifar, VGG7

# Layers autoprune compresses; modules that only reshape, pool, normalise or activate pass through.
COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
CONVS = (nn.Conv1d, nn.Conv2d)
PASSIVE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Sigmoid, nn.Tanh, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict,
    # normalizations pass through in float, as BatchNorm does; an embedding's table stays float (a lookup, no MACs)
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Embedding, nn.Softmax, MatMul,
)


def build_model(spec: str, *, num_classes: int = 10, in_channels: int | None = None, convert: bool = True) -> nn.Module:
    """Build a zoo model by name, or call a user factory ``package.module:factory``; its attention and
    recurrent layers come as their Linear-layer equivalents (``convert_model``) unless ``convert`` is false
    (a weights file of the layers as written loads into that, ``autoprune.weights.load_weights``)."""
    if spec in MODELS:
        factory, shape = MODELS[spec]
        model = factory(num_classes=num_classes, in_channels=in_channels or shape[0])
        return convert_model(model) if convert else model
    if ":" not in spec:
        raise AutopruneError("model", spec, f"is not a zoo model ({', '.join(MODELS)}) nor a package.module:factory")
    from autoprune.usercode import call_user, load_reference

    model = call_user("model", spec, load_reference(spec, field="model"))
    if not isinstance(model, nn.Module):
        raise AutopruneError("model", spec, f"returned {type(model).__name__}, not a torch.nn.Module")
    return convert_model(model) if convert else model


def default_input_shape(spec: str) -> tuple[int, ...] | None:
    return MODELS[spec][1] if spec in MODELS else None


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv1d, Conv2d and Linear layers by module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}


@contextmanager
def probing(model: nn.Module, handles: Iterable[RemovableHandle] = ()) -> Iterator[None]:
    """One traced forward pass: eval mode, no grad; hooks removed and every submodule's mode restored after."""
    import torch

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def reads_tensor(tensor: Any, model_input: Any) -> bool:
    """Whether a layer's input is the network input; a flatten or view of it (an MLP on images) shares its storage."""
    return tensor is model_input or (tensor.data_ptr() == model_input.data_ptr() and tensor.numel() == model_input.numel())


def input_readers(model: nn.Module, *, input_shape: tuple[int, ...]) -> set[str]:
    """Names of the layers that read the network input itself: their activation bits are the input's."""
    import torch

    readers: set[str] = set()
    x = torch.zeros(1, *input_shape)
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: readers.add(name) if args and reads_tensor(args[0], x) else None)
        for name, layer in compressible_layers(model).items()
    ]
    with probing(model, handles):
        model(x)
    return readers


def check_supported(model: nn.Module) -> None:
    """Refuse a model holding parametrised layers autoprune cannot see, naming the first one."""
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE) or isinstance(module, PASSIVE):
            continue
        own_params = [p for p_name, p in module.named_parameters(recurse=False)]
        if own_params:
            raise UnsupportedLayerError(f"model.{name}", type(module).__name__, "is a layer type autoprune cannot compress (supported: Conv1d, Conv2d, Linear, MultiheadAttention, GRU, LSTM, RNN, Embedding, BatchNorm, LayerNorm, GroupNorm, RMSNorm)")


__all__ = [
    "MODELS", "DigitsCNN", "MNIST1DCNN", "MNIST1DGRU", "MNIST1DTransformer", "convert_model", "VGG7", "ResNetCifar", "MobileNetV2Cifar", "build_model", "default_input_shape",
    "compressible_layers", "check_supported", "input_readers", "probing", "reads_tensor", "COMPRESSIBLE", "CONVS",
]
