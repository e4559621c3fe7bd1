"""compress(model, policy, task) on the real digits task: accuracy, cost agreement, order, replay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoprune.compress import compress, load_compressed, save_compressed, static_compress
from autoprune.cost import measure_cost
from autoprune.errors import AutopruneError
from autoprune.models import build_model, compressible_layers
from autoprune.policy import LayerPolicy, Policy
from autoprune.quant.midrise import midrise_int
from autoprune.task import Task, accuracy


@pytest.fixture(scope="module")
def task() -> Task:
    return Task()


@pytest.fixture(scope="module")
def base(task: Task):
    return task.base(progress=False)


def test_base_model_trains_to_95_percent(base) -> None:
    assert base.val_accuracy >= 95.0


def test_w4a4_half_width_qat_keeps_accuracy_within_two_points(task: Task, base) -> None:
    policy = Policy(layers={"_default": LayerPolicy(keep_ratio=0.5, w_bits=4, a_bits=4)}, finetune_steps=150)
    result = compress(base.model, policy, task=task)
    acc = accuracy(result.model, task.splits.val)
    assert acc >= base.val_accuracy - 2.0, (acc, base.val_accuracy)
    # Post-training only, 2-bit everything, loses more: the fine-tune is doing the work.
    crushed = compress(base.model, Policy(layers={"_default": LayerPolicy(w_bits=2, a_bits=2)}, finetune_steps=0), task=task)
    assert accuracy(crushed.model, task.splits.val) < acc - 1.0


def test_cost_of_the_compressed_model_matches_its_policy(task: Task, base) -> None:
    policy = Policy(
        layers={"_default": LayerPolicy(keep_ratio=0.5, w_bits=3, a_bits=6, w_sparsity=0.4, f_sparsity=0.2), "classifier": LayerPolicy(w_bits=5, a_bits=8)},
        finetune_steps=40,
        sparsity_interval=5,
        sparsity_updates=3,
    )
    result = compress(base.model, policy, task=task)
    report = result.cost(task.input_shape)
    layers = compressible_layers(result.model)
    full = compressible_layers(base.model)
    for row in report.layers:
        lp = result.layers[row.name]
        assert row.w_bits == lp.w_bits
        if row.name != "features.0":
            assert row.a_bits == lp.a_bits
        if row.name in ("features.3", "features.7"):
            # keep ratio 0.5 on the layer's own filters, and on its inputs from the previous group
            assert row.out_channels == round(0.5 * full[row.name].out_channels)
        weight = layers[row.name].weight.detach()
        # the baked weights lie on the grid the cost model reads: delta * mid-rise levels
        levels = midrise_int(weight, result.weight_steps[row.name], lp.w_bits)
        assert torch.allclose(weight.double(), levels * result.weight_steps[row.name], atol=1e-6)
        assert row.w_sparsity >= lp.w_sparsity - 1.0 / row.dense_params
    assert report.layers[0].a_bits == policy.input_bits


def test_every_order_runs_and_introduces_both_transforms(task: Task, base) -> None:
    for order in ("prune_then_quantize", "quantize_then_prune", "joint"):
        policy = Policy(layers={"_default": LayerPolicy(keep_ratio=0.75, w_bits=4, a_bits=8)}, order=order, finetune_steps=20)
        result = compress(base.model, policy, task=task)
        assert result.structured is not None
        assert set(result.weight_steps) == set(result.layers)


def test_pow2_switch_rounds_bits(task: Task, base) -> None:
    result = compress(base.model, Policy(layers={"_default": LayerPolicy(w_bits=7, a_bits=3)}, pow2_bits=True, finetune_steps=0), task=task)
    assert {lp.w_bits for lp in result.layers.values()} <= {2, 4, 8, 16, 32}
    assert {row.w_bits for row in result.cost(task.input_shape).layers} == {4}


def test_policy_errors_before_any_work(task: Task, base) -> None:
    with pytest.raises(AutopruneError, match="conv9"):
        compress(base.model, Policy(layers={"conv9": LayerPolicy(w_bits=4)}), task=task)
    with pytest.raises(AutopruneError, match="registered"):
        compress(base.model, Policy(quantizer="fancy"), task=task)
    with pytest.raises(AutopruneError, match="classifier"):
        compress(base.model, Policy(layers={"classifier": LayerPolicy(keep_ratio=0.5)}), task=task)


def test_unsupported_layer_is_named(task: Task) -> None:
    # an LSTM is compressed as its Linear gates now; a transposed convolution is not compressed
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(AutopruneError, match="ConvTranspose2d"):
        static_compress(model, Policy(), input_shape=(1, 8, 8))


def test_saved_model_loads_back_without_pickle(task: Task, base, tmp_path: Path) -> None:
    policy = Policy(layers={"_default": LayerPolicy(keep_ratio=0.5, w_bits=4, a_bits=4, f_sparsity=0.2)}, finetune_steps=30)
    result = compress(base.model, policy, task=task)
    path = save_compressed(result, tmp_path / "model.safetensors", task=task)
    loaded = load_compressed(path, task=task)
    x = task.splits.val.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(result.model(x), loaded.model(x))
    assert loaded.cost(task.input_shape).to_dict() == result.cost(task.input_shape).to_dict()


def test_static_compress_cost_for_zoo_models() -> None:
    policy = Policy(layers={"_default": LayerPolicy(keep_ratio=0.5, w_bits=4, a_bits=4)})
    for name in ("resnet20", "mobilenetv2", "vgg7_x0.25"):
        model = build_model(name)
        full = measure_cost(model, input_shape=(3, 32, 32)).total.macs
        result = static_compress(model, policy, input_shape=(3, 32, 32))
        report = result.cost((3, 32, 32))
        assert report.total.macs < 0.4 * full
        assert {row.w_bits for row in report.layers} == {4}
        result.model(torch.zeros(2, 3, 32, 32))


def test_pfq_workflow_runs_through_compress_and_autoprune_apply(task: Task, base, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    policy = Policy(workflow="pfq", pruner="pfq", layers={"_default": LayerPolicy(w_bits=4, a_bits=4)}, finetune_steps=40)
    result = compress(base.model, policy, task=task)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())  # BN folded
    assert accuracy(result.model, task.splits.val) >= base.val_accuracy - 5.0
    path = policy.save(tmp_path / "pfq.yaml")
    out = tmp_path / "m.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "autoprune.cli", "apply", str(path), "--json", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert printed["metrics"]["accuracy"] >= base.val_accuracy - 5.0
    assert load_compressed(out, task=task).policy.workflow == "pfq"
