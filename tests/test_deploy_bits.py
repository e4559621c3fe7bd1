"""Every registered quantizer kind at every bit-width 1-8 exports, and onnxruntime computes what PyTorch does.

A tiny model on a signed input: the first conv reads the signed network input (``input_bits``), the second
reads signed features (no ReLU before it), the classifier reads unsigned ones. Below 3 bits the signed grids
are mid-rise, which the export carries op for op (no QDQ form exists): the logits agree exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autoprune.compress import compress  # noqa: E402
from autoprune.deploy import export_onnx, layer_levels, onnx_session  # noqa: E402
from autoprune.operators import ACT_QUANTIZERS, WEIGHT_QUANTIZERS  # noqa: E402
from autoprune.policy import Policy  # noqa: E402
from autoprune.task import Task  # noqa: E402

SHAPE = (1, 24)


@pytest.fixture(scope="module")
def signed_task() -> tuple[nn.Module, Task, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 6, 5), nn.Conv1d(6, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 18, 10),
    ).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, *SHAPE, generator=generator)
    # Labels a linear read-out can learn, and a short training: a trained model's top-1 has margins, where a
    # random one's near-ties flip on float summation order alone.
    y = (x.flatten(1) @ torch.randn(SHAPE[1], 10, generator=generator)).argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    task = Task.from_model(model, train=TensorDataset(x, y), val=TensorDataset(x, y), input_shape=SHAPE, signal_steps=0, device="cpu")
    return model, task, x


def _check(model: nn.Module, task: Task, x: torch.Tensor, policy: dict, path: Path) -> None:
    """Top-1 agreement >= 99.5 %; logits equal to 1e-4 (float summation order) on 99 % of the samples wherever
    no layer runs on an integer kernel, whose int32 bias and requantization round on their own (8-bit activations
    and weights). Not on all: a feature that lands within float rounding of a level boundary takes the other level
    in one runtime (1 sample of 1,024 on one CPU, none on another), where a wrong grid moves nearly every sample."""
    result = compress(model, Policy.from_dict({"finetune_steps": 0, **policy}), task=task)
    exported = export_onnx(result, path, input_shape=SHAPE)
    with torch.no_grad():
        expected = result.model(x).numpy()
    actual = onnx_session(path).run(None, {"input": x.numpy()})[0]
    assert expected.std() > 1e-3, "the logits depend on the input: the comparison can fail"
    agreement = float(np.mean(expected.argmax(1) == actual.argmax(1)))
    exact = float(np.mean(np.abs(expected - actual).max(1) <= 1e-4))
    integer = any(record.integer_candidate for record in exported.layers.values())
    assert agreement >= 0.995 and (integer or exact >= 0.99), (policy, agreement, exact)


@pytest.mark.e2e
@pytest.mark.parametrize("weight_kind", WEIGHT_QUANTIZERS.kinds())
def test_every_weight_kind_at_every_bit_width_agrees(weight_kind: str, signed_task: tuple, tmp_path: Path) -> None:
    model, task, x = signed_task
    act_kinds = ACT_QUANTIZERS.kinds()
    for bits in range(1, 9):
        act_kind = act_kinds[bits % len(act_kinds)]  # every activation kind meets every weight kind over the 8 widths
        policy = {"quantizer": weight_kind, "act_quantizer": act_kind, "input_bits": bits, "layers": {"_default": {"w_bits": bits, "a_bits": bits}}}
        _check(model, task, x, policy, tmp_path / f"w{bits}.onnx")


@pytest.mark.e2e
@pytest.mark.parametrize("act_kind", ACT_QUANTIZERS.kinds())
def test_every_activation_kind_at_every_bit_width_agrees(act_kind: str, signed_task: tuple, tmp_path: Path) -> None:
    model, task, x = signed_task
    for bits in range(1, 9):
        policy = {"act_quantizer": act_kind, "input_bits": bits, "layers": {"_default": {"w_bits": 8, "a_bits": bits}}}
        _check(model, task, x, policy, tmp_path / f"a{bits}.onnx")


def test_signed_two_bit_input_exports_exactly(signed_task: tuple, tmp_path: Path) -> None:
    """The network input and the hidden signed features on 2-bit mid-rise grids: was 40 % top-1 agreement."""
    model, task, x = signed_task
    policy = {"input_bits": 2, "layers": {"_default": {"w_bits": 4, "a_bits": 2}}}
    _check(model, task, x, policy, tmp_path / "s2.onnx")


@pytest.mark.parametrize("quantizer", ["clip_uniform", "midrise"])
def test_batchnorm_with_negative_gamma_folds_into_positive_scales(quantizer: str, tmp_path: Path) -> None:
    """A BN folds into the weight scales per channel; where gamma < 0 the levels are negated instead (a scale
    stays positive), except on a channel holding the lowest mid-tread level, whose negation has no b-bit twin."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 22, 3))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, *SHAPE, generator=generator)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.9, -1.2]))
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    model.eval()
    y = model(x).argmax(1).detach()  # labels the model itself gives: its top-1 has margins on most samples
    task = Task.from_model(model, train=TensorDataset(x, y), val=TensorDataset(x, y), input_shape=SHAPE, signal_steps=0, device="cpu")
    policy = Policy.from_dict({"finetune_steps": 0, "bn_recalibration": False, "quantizer": quantizer, "layers": {"_default": {"w_bits": 8, "a_bits": 8}}})
    result = compress(model, policy, task=task)
    exported = export_onnx(result, tmp_path / "bn.onnx", input_shape=SHAPE)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(tmp_path / "bn.onnx")).graph
    assert "BatchNormalization" not in [n.op_type for n in graph.node] and exported.cleanup.folded
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    levels, scale = inits["0.weight_quantized"].astype(np.int64), inits["0.weight_scale"]
    baked = result.model[0].weight.detach().double().numpy()
    bn = result.model[1]
    s = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().numpy()
    np.testing.assert_allclose(levels * scale.reshape(-1, 1, 1), baked * s.reshape(-1, 1, 1), rtol=1e-6)
    low, high = layer_levels(result)["0"].grid.bounds(8)
    assert levels.min() >= low and levels.max() <= high  # negated levels stay on the 8-bit grid
    lowest = levels.reshape(4, -1).min(1) == low
    assert np.all((scale > 0) | (lowest & (s < 0)))
    with torch.no_grad():
        expected = result.model(x).numpy()
    actual = onnx_session(tmp_path / "bn.onnx").run(None, {"input": x.numpy()})[0]
    assert np.mean(expected.argmax(1) == actual.argmax(1)) >= 0.995
