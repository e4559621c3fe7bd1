"""Model lookup: a zoo name or any user factory given as ``package.module:factory``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.models.convert import convert_model
from autoprune.models.zoo import MODELS, MNIST1DCNN, MNIST1DGRU, MNIST1DTransformer, DigitsCNN, MobileNetV2Cifar, ResNetCifar, VGG7

# Layers autoprune compresses; modules that only reshape, pool, normalise or activate pass through.
COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
CONVS = (nn.Conv1d, nn.Conv2d)
PASSIVE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Sigmoid, nn.Tanh, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict,
)
# Normalizations pass through in float: their parameters scale and shift, they multiply no activation by a weight.
NORMS = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
)
# Layers that multiply activations by weights of theirs that autoprune cannot count or compress: refused by name
# (an attention or recurrent layer comes converted to Linear layers, ``autoprune.models.convert``; an
# embedding's table takes weight bits).
UNCOMPRESSIBLE = (
    nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.EmbeddingBag, nn.Bilinear,
    nn.modules.conv._ConvNd, nn.modules.conv._ConvTransposeNd,
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


def _field(name: str) -> str:
    return f"model.{name}" if name else "model"


def check_supported(model: nn.Module) -> None:
    """Refuse a model holding a layer that multiplies by weights autoprune cannot see, naming the first one.

    Normalizations and parameters of other modules (a class token, a position embedding, a layer scale) pass
    through in float: ``float_parameters`` lists them, and ``check_products`` refuses one that a traced
    forward multiplies activations by.
    """
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            continue
        if isinstance(module, UNCOMPRESSIBLE) and any(True for _ in module.parameters(recurse=False)):
            raise UnsupportedLayerError(_field(name), type(module).__name__, "is a layer type autoprune cannot compress (supported: Conv1d, Conv2d, Linear, MultiheadAttention, GRU, LSTM, RNN, Embedding; normalizations pass through)")


def float_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters kept in float, passed through uncompressed, by name: what holds them and why."""
    kept: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            continue
        why = f"{type(module).__name__} (a normalization)" if isinstance(module, NORMS) else f"{type(module).__name__} (added or scaled by, no product)"
        for p_name, _ in module.named_parameters(recurse=False):
            kept[f"{name}.{p_name}" if name else p_name] = why
    return kept


# Functions that multiply an activation by a weight: a float parameter handed to one is a product autoprune misses.
_PRODUCTS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "embedding", "__matmul__", "__rmatmul__",
})


def check_products(model: nn.Module, *, input_shape: tuple[int, ...]) -> None:
    """Refuse what one traced forward multiplies outside autoprune's sight, naming it: a float parameter handed
    to a product (a matmul, a linear, an einsum), whose multiplications would be neither counted nor
    compressed, and a Conv / Linear layer whose weight a product reads while its own forward never runs
    (``F.linear(x, self.qkv.weight)``), whose input no hook quantizes. Transformed before use (``W.t()``), a
    parameter is not recognised."""
    import torch
    from torch.overrides import TorchFunctionMode

    params = {id(p): name for name, p in model.named_parameters()}
    layers = compressible_layers(model)
    embeddings = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    owned = {id(layer.weight): name for name, layer in layers.items() if isinstance(layer.weight, nn.Parameter)}
    ran: set[str] = set()
    found: list[tuple[int, str]] = []

    class Products(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in _PRODUCTS:
                found.extend((id(arg), func.__name__) for arg in (*args, *(kwargs or {}).values()) if id(arg) in params)
            return func(*args, **(kwargs or {}))

    handles = [layer.register_forward_pre_hook(lambda _m, _a, name=name: ran.add(name)) for name, layer in layers.items()]
    try:
        with probing(model, handles), Products():
            model(torch.zeros(1, *input_shape))
    except Exception:  # noqa: BLE001 - a model that cannot run on zeros fails, and is reported, where it runs for real
        return
    for key, func in found:
        parameter, layer = params[key], owned.get(key)
        if layer is None and not any(parameter.startswith(f"{name}.") for name in (*layers, *embeddings)):
            raise UnsupportedLayerError(_field(parameter), func, "multiplies activations by this parameter, which autoprune cannot count or compress (only Conv1d, Conv2d and Linear weights)")
        if layer is not None and layer not in ran:
            raise UnsupportedLayerError(_field(layer), func, "reads this layer's weight outside the layer's own forward, where autoprune can neither quantize its input nor count it")


__all__ = [
    "MODELS", "DigitsCNN", "MNIST1DCNN", "MNIST1DGRU", "MNIST1DTransformer", "convert_model", "VGG7", "ResNetCifar", "MobileNetV2Cifar", "build_model", "default_input_shape",
    "compressible_layers", "check_supported", "check_products", "float_parameters", "input_readers", "probing", "reads_tensor",
    "COMPRESSIBLE", "CONVS", "NORMS", "UNCOMPRESSIBLE",
]
