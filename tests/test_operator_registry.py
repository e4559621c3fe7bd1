"""One operator registry: a weight quantizer kind whose levels are new (power-of-two levels, defined in
``log2_quantizer``, one module) is compressed, costed and exported without a line changed elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import log2_quantizer
from autoprune.compress import compress
from autoprune.operators import WEIGHT_QUANTIZERS
from autoprune.policy import Policy
from autoprune.task import Task

SHAPE = (2, 6, 6)


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()


@pytest.fixture(scope="module")
def task() -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, *SHAPE, generator=generator)
    data = TensorDataset(x, two_layers()(x).argmax(1).detach())
    return Task.from_model(two_layers(), train=data, val=data, signal_steps=0, device="cpu")


def test_the_kind_is_registered_in_the_one_registry() -> None:
    assert "log2" in WEIGHT_QUANTIZERS.kinds()
    assert WEIGHT_QUANTIZERS.lookup("log2") is log2_quantizer.Log2Weight
    assert Policy.from_dict({"quantizer": "log2"}).quantizer.kind == "log2"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("steps", [0, 4])
def test_a_new_kind_of_levels_is_costed_and_exported_as_it_was_produced(task: Task, bits: int, steps: int, tmp_path: Path) -> None:
    from autoprune.deploy import compare_onnx, export_onnx, pack_weights, unpack_weights

    policy = Policy(layers={"_default": {"w_bits": bits, "a_bits": 8}}, quantizer="log2", finetune_steps=steps, batch_size=32, calibration_batches=2)
    result = compress(task.base(progress=False).model, policy, task=task)
    top = log2_quantizer.top_exponent(bits)
    report = {layer.name: layer for layer in result.cost(SHAPE).layers}
    for name, layer in {"0": result.model[0], "3": result.model[3]}.items():
        levels = layer.weight.detach().double() / result.weight_steps[name]
        nonzero = levels[levels != 0].abs()
        # the levels produced: powers of two from 1 to 2^top, the top one reached by the largest weight
        assert torch.equal(nonzero, torch.exp2(torch.log2(nonzero).round())) and nonzero.max() == 2**top
        assert set(torch.log2(nonzero).round().int().tolist()) <= set(range(top + 1))
        # the cost model reads them on the kind's grid: the nonzero weights, and ESN_a as their squares' sum
        assert report[name].params == int((levels != 0).sum())
        assert report[name].esn_a == pytest.approx(float(levels.square().sum()))
    loader = [(x, y) for x, y in torch.utils.data.DataLoader(task.splits.val, batch_size=32)]
    exported = export_onnx(result, tmp_path / "model.onnx", input_shape=SHAPE)
    assert exported.layers["0"].w_storage == "int8" and exported.layers["0"].w_bits == bits
    # The file computes what PyTorch does (onnxruntime without graph optimizations: the written graph op for op)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    x = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        assert np.abs(as_written.run(None, {"input": x.numpy()})[0] - result.model(x).numpy()).max() < 1e-3
    # optimized, the int8 levels read by 8-bit activations run on integer kernels, whose int32 bias and
    # requantization move an activation by one 8-bit step now and then (near-ties of this random model flip)
    comparison = compare_onnx(result, tmp_path / "model.onnx", loader)
    assert comparison.top1_agreement >= 97.0 and comparison.max_abs_diff < 2e-2
    pack_weights(result, tmp_path / "model.apw", input_shape=SHAPE)
    unpacked = unpack_weights(tmp_path / "model.apw")
    assert all(torch.equal(unpacked[name], layer.weight.detach()) for name, layer in {"0": result.model[0], "3": result.model[3]}.items())
