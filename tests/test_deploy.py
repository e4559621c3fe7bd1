"""ONNX export with QDQ, packed weights, checks against PyTorch, the MLflow model registry, and docs/deploy.md.

Tolerance for the random-weight models (ResNet-20, MobileNetV2): |onnxruntime - PyTorch| <= 1e-3 on logits of
order 0.1. Both run the same quantized graph; they differ by float summation order, which can move an
activation across a rounding boundary (one step) now and then.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from autoprune.compress import CompressionResult, compress  # noqa: E402
from autoprune.deploy import (  # noqa: E402
    compare_onnx, export_onnx, float_copy, layer_levels, measure_latency, onnx_session, pack_weights, runtime_kernels,
    unpack_weights, write_packed_weights,
)
from autoprune.deploy.packed import pack_bits, unpack_bits  # noqa: E402
from autoprune.errors import AutopruneError  # noqa: E402
from autoprune.models import build_model, compressible_layers  # noqa: E402
from autoprune.policy import Policy  # noqa: E402
from autoprune.quant import midrise_int  # noqa: E402
from autoprune.task import Task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RANDOM_TOLERANCE = 1e-3

# W4A8 by default, W8 with 4-bit (QCDQ clip) input on one conv, 12-bit (float clip) input on the classifier;
# half the channels of every prunable group, feature and weight sparsity on the middle conv.
DIGITS_POLICY = {
    "finetune_steps": 20,
    "layers": {
        "_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 8},
        "features.3": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 4, "f_sparsity": 0.3, "w_sparsity": 0.5},
        "classifier": {"w_bits": 8, "a_bits": 12},
    },
}


def _graph(path: Path) -> object:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ops(model: object) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _initializers(model: object) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _check_pruned_shapes(model: object, result: CompressionResult, base: nn.Module) -> None:
    """Every weight in the file has the pruned model's shape, and pruning did shrink some layer."""
    inits = _initializers(model)
    pruned = compressible_layers(result.model)
    for name, layer in pruned.items():
        stored = inits.get(f"{name}.weight_quantized", inits.get(f"{name}.weight"))
        assert stored is not None and stored.shape == tuple(layer.weight.shape), name
    base_layers = compressible_layers(base)
    assert any(pruned[n].weight.shape[0] < base_layers[n].weight.shape[0] for n in pruned)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    task = Task()
    base = task.base(progress=False).model
    result = compress(base, Policy.from_dict(DIGITS_POLICY), task=task)
    path = tmp_path_factory.mktemp("digits") / "model.onnx"
    exported = export_onnx(result, path, input_shape=task.input_shape)
    return SimpleNamespace(task=task, base=base, result=result, path=path, exported=exported)


def test_digits_onnx_agrees_with_pytorch_on_the_test_split(digits: SimpleNamespace) -> None:
    model = _graph(digits.path)
    ops = _ops(model)
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 8
    assert ops.count("Clip") == 2 and ops.count("Mul") == 1
    # BN folded into the convs, the traced identities gone (there were 3 BatchNormalization nodes)
    assert ops.count("BatchNormalization") == 0 and ops.count("Identity") == 0
    assert sorted(digits.exported.cleanup.folded.values()) == ["features.0", "features.3", "features.7"]
    _check_pruned_shapes(model, digits.result, digits.base)
    comparison = compare_onnx(digits.result, digits.path, DataLoader(digits.task.splits.test, batch_size=128))
    assert comparison.samples == len(digits.task.splits.test)
    assert comparison.top1_agreement >= 99.5
    assert abs(comparison.onnx_accuracy - comparison.torch_accuracy) <= 0.5
    assert comparison.onnx_accuracy > 80


def test_weight_initializers_hold_the_integer_levels(digits: SimpleNamespace) -> None:
    inits = _initializers(onnx.load(str(digits.path)))
    layers = compressible_layers(digits.result.model)
    for name, record in digits.exported.layers.items():
        levels = inits[f"{name}.weight_quantized"]
        bits = record.w_bits
        # Mid-rise levels are the odd integers 2k+1 at scale delta/2 (0 where pruned): b + 1 bits of storage.
        assert levels.dtype == (np.int8 if bits <= 7 else np.int16)
        assert set(np.unique(np.abs(levels) % 2)) <= {0, 1}
        assert np.all((levels % 2 == 1) | (levels == 0)) and np.abs(levels).max() <= 2**bits - 1
        assert np.abs(levels).max() > 2 ** (bits - 1)  # the top levels are used: not stored at a coarser grid
        scale = inits[f"{name}.weight_scale"]
        weight = layers[name].weight.detach().double().numpy()
        if record.batchnorm_folded:
            # the BN after the conv multiplies its scale per output channel (levels negated where gamma < 0)
            bn = digits.result.model.features[int(name.split(".")[1]) + 1]
            s = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().numpy()
            assert scale.shape == (len(s),)
            np.testing.assert_allclose(scale, np.float32(digits.result.weight_steps[name] / 2) * np.abs(s), rtol=1e-6)
            weight = weight * s.reshape(-1, 1, 1, 1)
        else:
            assert scale.shape == () and scale == np.float32(digits.result.weight_steps[name] / 2)
        np.testing.assert_allclose(levels * scale.reshape(-1, *[1] * (levels.ndim - 1)), weight, rtol=1e-6, atol=0)
    assert digits.exported.layers["features.3"].act.clip == (0, 15)
    assert digits.exported.layers["features.3"].feature_mask


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
def test_random_weight_models_export_with_pruning_and_mixed_bits(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_model(arch).eval()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=generator), torch.randint(0, 10, (48,), generator=generator)
    # Random weights with re-estimated BN statistics blow the logits up to 1e8: the BN layers keep their init.
    fake_task = Task.from_model(base, train=TensorDataset(x, y), val=TensorDataset(x, y), input_shape=(3, 32, 32), signal_steps=0, device="cpu")
    policy = Policy.from_dict({
        "finetune_steps": 0, "bn_recalibration": False, "batch_size": 16, "calibration_batches": 2,
        "layers": {
            "_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 8},
            r"re:(layers|features)\.1.*": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 6},
        },
    })
    result = compress(base, policy, task=fake_task)
    path = tmp_path / f"{arch}.onnx"
    exported = export_onnx(result, path, input_shape=(3, 32, 32))
    model = _graph(path)
    assert _ops(model).count("QuantizeLinear") == len(compressible_layers(result.model))
    assert "Clip" in _ops(model)
    # every BN folded into its conv, the residual shortcuts' and removed quantizers' Identity nodes gone
    assert _ops(model).count("BatchNormalization") == 0 and _ops(model).count("Identity") == 0
    assert len(exported.cleanup.folded) == sum(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    _check_pruned_shapes(model, result, base)
    with torch.no_grad():
        expected = result.model(x).numpy()
    actual = onnx_session(path).run(None, {"input": x.numpy()})[0]
    assert expected.std() > 1e-3  # the logits depend on the input: the comparison can fail
    assert np.abs(actual - expected).max() <= RANDOM_TOLERANCE


def _per_channel(result: CompressionResult, name: str) -> CompressionResult:
    """The result with one layer's weights re-quantized mid-rise with one step per output channel."""
    result = copy.copy(result)
    result.model = copy.deepcopy(result.model)
    result.weight_steps = dict(result.weight_steps)
    layer = compressible_layers(result.model)[name]
    bits = result.layers[name].w_bits
    weight = layer.weight.detach()
    deltas = [float(w.abs().max()) / 2 ** (bits - 1) for w in weight]
    rows = [(d * midrise_int(w[None], d, bits)[0]).to(torch.float32) for d, w in zip(deltas, weight)]
    with torch.no_grad():
        layer.weight.copy_(torch.stack(rows))
    result.weight_steps[name] = deltas
    return result


def test_per_channel_steps_become_per_axis_dequantization(digits: SimpleNamespace, tmp_path: Path) -> None:
    result = _per_channel(digits.result, "features.7")
    exported = export_onnx(result, tmp_path / "pc.onnx", input_shape=digits.task.input_shape)
    assert exported.layers["features.7"].per_channel and not exported.layers["features.3"].per_channel
    model = _graph(tmp_path / "pc.onnx")
    node = next(n for n in model.graph.node if n.name == "features.7/weight_dequantize")
    assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    scale = _initializers(model)["features.7.weight_scale"]
    assert scale.shape == (result.model.features[7].out_channels,) and len(set(scale.tolist())) > 1
    comparison = compare_onnx(result, tmp_path / "pc.onnx", DataLoader(digits.task.splits.test, batch_size=128))
    assert comparison.top1_agreement >= 99.5
    # The cost model reads per-channel steps once item 0 lands there: the file is written without the report.
    records = write_packed_weights(result, tmp_path / "pc.apw")
    assert records["features.7"].per_channel and len(records["features.7"].steps) == len(scale)
    weights = unpack_weights(tmp_path / "pc.apw")
    assert torch.equal(weights["features.7"], result.model.features[7].weight)


def test_packed_weights_round_trip_and_sizes(digits: SimpleNamespace, tmp_path: Path) -> None:
    report = pack_weights(digits.result, tmp_path / "w.apw", input_shape=digits.task.input_shape)
    weights = unpack_weights(tmp_path / "w.apw")
    layers = compressible_layers(digits.result.model)
    assert set(weights) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(weights[name], layer.weight.detach())
    for name, record in report.layers.items():
        numel, bits = layers[name].weight.numel(), record.bits
        nonzero = int((layers[name].weight != 0).sum())
        expected = -(-numel * bits // 8) if record.encoding == "dense" else -(-numel // 8) + -(-nonzero * bits // 8)
        assert record.nbytes == expected and record.nonzero == nonzero
    # 50 % weight sparsity on features.3 makes a bitmask pay; the dense layers have no zero.
    assert report.layers["features.3"].encoding == "bitmask" and report.layers["features.0"].encoding == "dense"
    assert report.measured_weight_mbit == 8 * sum(r.nbytes for r in report.layers.values()) / 1e6
    assert report.file_bytes > sum(r.nbytes for r in report.layers.values())
    assert 1.0 <= report.ratio < 1.2
    assert report.cost_memory_mbit > report.cost_weight_mbit


def test_packed_weights_of_mid_tread_and_float_layers(digits: SimpleNamespace, tmp_path: Path) -> None:
    policy = Policy.from_dict({
        "finetune_steps": 0, "quantizer": "clip_uniform",
        "layers": {"_default": {"w_bits": 3, "a_bits": 8}, "features.7": {"w_bits": 6, "w_sparsity": 0.6}, "classifier": {}},
    })
    result = compress(digits.base, policy, task=digits.task)
    report = pack_weights(result, tmp_path / "u.apw", input_shape=digits.task.input_shape)
    assert report.layers["classifier"].grid == "float" and report.layers["features.0"].grid == "midtread"
    assert report.layers["features.7"].encoding == "bitmask"
    weights = unpack_weights(tmp_path / "u.apw")
    for name, layer in compressible_layers(result.model).items():
        assert torch.equal(weights[name], layer.weight.detach()), name
    levels = layer_levels(result)
    assert levels["classifier"] is None and levels["features.0"].storage_bits == 3
    export_onnx(result, tmp_path / "u.onnx", input_shape=digits.task.input_shape)
    inits = _initializers(_graph(tmp_path / "u.onnx"))
    assert inits["classifier.weight"].dtype == np.float32
    assert inits["features.0.weight_quantized"].min() >= -4 and inits["features.0.weight_quantized"].max() <= 3
    comparison = compare_onnx(result, tmp_path / "u.onnx", DataLoader(digits.task.splits.test, batch_size=128))
    assert comparison.top1_agreement >= 99.5


def test_uniform_w8a8_runs_on_integer_kernels_and_midrise_8_bits_does_not(digits: SimpleNamespace, tmp_path: Path) -> None:
    """int8 weights (BN folded: per channel, zero point 0) reading 8-bit QDQ activations fuse into QLinearConv /
    QGemm; 8-bit mid-rise levels need int16 (b + 1 bits), for which onnxruntime has no kernel: float."""
    kernels = {}
    for quantizer in ("clip_uniform", "midrise"):
        policy = {"finetune_steps": 0, "quantizer": quantizer, "layers": {"_default": {"w_bits": 8, "a_bits": 8}}}
        result = compress(digits.base, Policy.from_dict(policy), task=digits.task)
        path = tmp_path / f"{quantizer}.onnx"
        exported = export_onnx(result, path, input_shape=digits.task.input_shape)
        kernels[quantizer] = runtime_kernels(path)
        assert all(record.integer_candidate == (quantizer == "clip_uniform") for record in exported.layers.values())
        comparison = compare_onnx(result, path, DataLoader(digits.task.splits.test, batch_size=256))
        assert comparison.top1_agreement >= 99.5 and abs(comparison.onnx_accuracy - comparison.torch_accuracy) <= 0.2
    convs = {"features.0": "QLinearConv", "features.3": "QLinearConv", "features.7": "QLinearConv"}
    assert kernels["clip_uniform"] == {**convs, "classifier": "QGemm"}
    assert not set(kernels["midrise"].values()) & {"QLinearConv", "QGemm"}, kernels["midrise"]


def test_bit_packing_by_hand() -> None:
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b01101100])
    assert pack_bits(np.array([5]), 3) == bytes([0b10100000])
    codes = np.array([0, 7, 3, 5, 1, 6, 2])
    assert unpack_bits(pack_bits(codes, 3), 3, len(codes)).tolist() == codes.tolist()


def test_off_grid_weights_and_bad_files_are_refused(digits: SimpleNamespace, tmp_path: Path) -> None:
    result = copy.copy(digits.result)
    result.model = copy.deepcopy(result.model)
    with torch.no_grad():
        result.model.features[0].weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(AutopruneError, match="grid"):
        export_onnx(result, tmp_path / "bad.onnx", input_shape=digits.task.input_shape)
    (tmp_path / "bad.apw").write_bytes(b"not packed weights")
    with pytest.raises(AutopruneError, match="packed weights"):
        unpack_weights(tmp_path / "bad.apw")
    with pytest.raises(AutopruneError, match="opset"):
        export_onnx(digits.result, tmp_path / "old.onnx", input_shape=digits.task.input_shape, opset=13)


def test_activation_bits_above_16_are_refused(digits: SimpleNamespace, tmp_path: Path) -> None:
    result = compress(digits.base, Policy.from_dict({"finetune_steps": 0, "layers": {"classifier": {"a_bits": 20}}}), task=digits.task)
    with pytest.raises(AutopruneError, match="at most 16 bits"):
        export_onnx(result, tmp_path / "a20.onnx", input_shape=digits.task.input_shape)


def test_latency_is_measured_side_by_side(digits: SimpleNamespace) -> None:
    latency = measure_latency(
        digits.path, torch_models={"base": digits.base, "pruned": float_copy(digits.result)},
        input_shape=digits.task.input_shape, batch_size=32, repeats=3, warmup=1,
    )
    assert latency.onnx_ms > 0 and set(latency.torch_ms) == {"base", "pruned"} and min(latency.torch_ms.values()) > 0


def test_float_copy_drops_quantizers_and_masks_only(digits: SimpleNamespace) -> None:
    x = digits.task.splits.test.tensors[0][:64]
    plain = float_copy(digits.result)
    with torch.no_grad():
        assert not torch.equal(plain(x), digits.result.model(x))
        assert torch.equal(plain.features[0].weight, digits.result.model.features[0].weight)


def test_deploy_import_is_lean_and_missing_packages_name_the_extra() -> None:
    code = (
        "import sys, autoprune.deploy\n"
        "assert not {'onnx', 'onnxruntime', 'mlflow'} & set(sys.modules), sorted({'onnx', 'onnxruntime', 'mlflow'} & set(sys.modules))\n"
        "sys.modules['onnx'] = None\n"
        "from autoprune.deps import require\n"
        "from autoprune.errors import AutopruneError\n"
        "try:\n    require('onnx')\nexcept AutopruneError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "pip install 'autoprune[deploy]'" in out


def test_registered_model_loads_back_through_mlflow_onnx(digits: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from autoprune.tracking import default_tracking_uri
    from autoprune.tracking.models import load_registered_onnx, log_onnx_model, register_onnx_model, registry_tags
    from autoprune.tracking.store import fluent_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ours = default_tracking_uri()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("s", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    example = digits.task.splits.test.tensors[0][:4].numpy()
    from autoprune.deploy.verify import run_onnx

    model_uri = log_onnx_model(tracking_uri=uri, run_id=run_id, onnx_path=digits.path, input_example=example, output_example=run_onnx(digits.path, example))
    tags = registry_tags(study="s", policy_json=digits.result.policy.to_json(), metrics={"accuracy": 95.5, "bops": 1e6})
    version = register_onnx_model(tracking_uri=uri, model_uri=model_uri, name="digits", tags=tags)
    assert version == 1
    stored = client.get_model_version("digits", "1")
    assert stored.tags["autoprune.study"] == "s" and float(stored.tags["autoprune.metric.accuracy"]) == 95.5
    assert Policy.from_dict(json.loads(stored.tags["autoprune.policy"])) == digits.result.policy
    loaded = load_registered_onnx(tracking_uri=uri, name="digits", version=1)
    # MLflow's global URIs are unset again: the next search of this process tracks to its own ./mlruns store,
    # and a client opened on another store reads that store's registry
    assert not mlflow.tracking.is_tracking_uri_set() and default_tracking_uri() == ours
    assert "MLFLOW_REGISTRY_URI" not in os.environ and mlflow.get_registry_uri() == mlflow.get_tracking_uri()
    session = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"input": example})[0], onnx_session(digits.path).run(None, {"input": example})[0])
    with fluent_store(uri):
        logged = mlflow.models.get_model_info(model_uri)
    assert logged.signature is not None and logged.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)


def test_the_python_steps_of_docs_deploy_md_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), "docs/deploy.md", "exec"), namespace)
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.apw").is_file()
    assert namespace["version"] == 1
