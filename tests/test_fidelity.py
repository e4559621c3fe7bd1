"""Issue 10: each transform does what its seed says, in every mode compress runs it (tiny synthetic task)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.compress import compress, static_compress
from autoprune.models import compressible_layers
from autoprune.policy import ORDERS, LayerPolicy, Policy
from autoprune.quant import DelayedActQuantizer
from autoprune.quant.uniform import mse_optimal_step
from autoprune.task import Task

SHAPE = (2, 6, 6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.classifier = nn.Linear(8 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def tiny_task(samples: int = 256) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *SHAPE, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1].mean(dim=(1, 2)) > 0.2).long()
    data = TensorDataset(x, y)
    return Task.from_model(tiny_model(), train=data, val=data, input_shape=SHAPE, signal_steps=0, device="cpu")


def tiny_model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("w_bits", [32, 4])
@pytest.mark.parametrize("steps", [0, 60])
def test_every_order_reaches_its_weight_sparsity_and_the_cost_charges_what_remains(order: str, w_bits: int, steps: int) -> None:
    """Issue 10 bug 0: quantize_then_prune masked a computed tensor, not the parameter (0.08-0.17 zeros for 0.5)."""
    policy = Policy(
        layers={"_default": LayerPolicy(w_bits=w_bits, a_bits=8, w_sparsity=0.5)}, order=order, finetune_steps=steps,
        sparsity_interval=5, sparsity_updates=3, batch_size=32, calibration_batches=2,
    )
    result = compress(tiny_model(), policy, task=tiny_task())
    report = {row.name: row for row in result.cost(SHAPE).layers}
    for name, layer in compressible_layers(result.model).items():
        zeros = int((layer.weight == 0).sum())
        assert abs(zeros - round(0.5 * layer.weight.numel())) <= 1, (name, zeros, layer.weight.numel())
        assert report[name].params == int(torch.count_nonzero(layer.weight)), name


def test_delay_keeps_weights_and_activations_float_until_tq_then_ranges_come_from_that_step() -> None:
    """Issue 10 bug 1: with delay 5, steps 0-4 see float weights and activations, step 5 both quantized, with
    ranges measured at step 5 (activations used to be calibrated and quantized from step 0, weights a step late)."""
    model = tiny_model()
    seen: list[dict] = []
    layer = model.features[3]

    def raw(module: nn.Module, args: tuple) -> None:
        if module.training:
            seen.append({"raw": args[0].detach().clone(), "original": module.parametrizations.weight.original.detach().clone()})

    def used(module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        if module.training:
            quant = module.input_quant
            seen[-1].update(input=args[0].detach().clone(), weight=module.weight.detach().clone(),
                            act_delta=float(quant.step_size), w_delta=module.parametrizations.weight[0]._delta)

    layer.register_forward_pre_hook(raw, prepend=True)
    layer.register_forward_hook(used)
    policy = Policy(
        layers={"_default": LayerPolicy(w_bits=4, a_bits=4)}, order="joint", finetune_steps=8, batch_size=32,
        quantizer={"kind": "delayed", "delay": 5}, act_quantizer={"kind": "delayed", "delay": 5}, bn_recalibration=False,
    )
    compress(model, policy, task=tiny_task())
    assert len(seen) == 8
    for step in range(5):
        assert torch.equal(seen[step]["input"], seen[step]["raw"]), step
        assert torch.equal(seen[step]["weight"], seen[step]["original"]), step
    at = seen[5]
    assert not torch.equal(at["input"], at["raw"]) and len(torch.unique(at["input"])) <= 16
    assert not torch.equal(at["weight"], at["original"]) and len(torch.unique(at["weight"])) <= 16
    assert at["w_delta"] == mse_optimal_step(at["original"], bits=4, signed=True, clip=at["original"].abs().max().item())
    reference = DelayedActQuantizer(bits=4)
    reference.observing = True
    reference(at["raw"])
    reference.fix_range()
    assert at["act_delta"] == reference.delta
    assert all(s["act_delta"] == at["act_delta"] and s["w_delta"] == at["w_delta"] for s in seen[5:])


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_prune"])
def test_post_training_feature_sparsity_is_fitted_on_calibration_batches(order: str) -> None:
    """Issue 10 bug 3: finetune_steps 0 with f_sparsity crashed ("cannot be fitted before a training batch")."""
    policy = Policy(layers={"_default": LayerPolicy(w_bits=4, a_bits=4, f_sparsity=0.5)}, order=order, finetune_steps=0, batch_size=32, calibration_batches=3)
    result = compress(tiny_model(), policy, task=tiny_task())
    layers = compressible_layers(result.model)
    fitted = {name: layer.feature_mask.mask for name, layer in layers.items() if hasattr(layer, "feature_mask")}
    assert set(fitted) == {"features.3", "classifier"}  # features.0 reads the input: no feature sparsity there
    for name, mask in fitted.items():
        assert abs(int((~mask).sum()) - round(0.5 * mask.numel())) <= 1, name
    seen = []
    layers["features.3"].register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    result.model(torch.randn(4, *SHAPE))
    assert float((seen[0] == 0).double().mean()) >= 0.5


def test_post_training_quantize_then_prune_measures_activation_ranges_before_pruning() -> None:
    """Issue 10 bug 7: in post-training compression both orders recalibrated activation ranges after pruning."""
    def ranges(order: str, *, pruned: bool) -> dict[str, float]:
        lp = LayerPolicy(keep_ratio=0.5 if pruned else 1.0, w_bits=4, a_bits=4, w_sparsity=0.6 if pruned else 0.0)
        policy = Policy(layers={"_default": lp, "classifier": lp.model_copy(update={"keep_ratio": 1.0})}, order=order, finetune_steps=0, batch_size=32, calibration_batches=2)
        result = compress(tiny_model(), policy, task=tiny_task())
        return {n: m.input_quant.delta for n, m in compressible_layers(result.model).items() if hasattr(m, "input_quant")}

    q_then_p = ranges("quantize_then_prune", pruned=True)
    p_then_q = ranges("prune_then_quantize", pruned=True)
    unpruned = ranges("quantize_then_prune", pruned=False)
    assert q_then_p == unpruned  # measured on the unpruned model (with its weights quantized)
    assert all(q_then_p[n] != p_then_q[n] for n in ("features.3", "classifier"))


def test_cost_command_rounds_input_bits_like_every_other_path(tmp_path, capsys) -> None:
    """Issue 10 bug 2: `autoprune cost --policy` skipped the pow2 rounding of input_bits (6 counted as 6)."""
    from autoprune.cli import main
    from autoprune.models import build_model
    from autoprune.quant import pow2_bits

    rounded = pow2_bits(6)
    assert rounded != 6
    policy = Policy(layers={"_default": LayerPolicy(w_bits=4, a_bits=4)}, input_bits=6, pow2_bits=True)
    path = policy.save(tmp_path / "p.json")
    assert main(["cost", "--model", "digits_cnn", "--policy", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    first = printed["layers"][0]
    assert first["a_bits"] == rounded and first["bops"] == first["macs"] * 4 * rounded
    model = build_model("digits_cnn", in_channels=1)
    own = static_compress(model, policy, input_shape=(1, 8, 8)).cost((1, 8, 8)).to_dict()
    assert printed["total"]["bops"] == own["total"]["bops"]


@pytest.mark.parametrize("order", ORDERS)
def test_per_channel_steps_follow_structured_pruning_in_every_order(order: str) -> None:
    """Issue 15 item 0: a per-channel step list stays one step per remaining channel when channels go."""
    policy = Policy(
        layers={"_default": LayerPolicy(keep_ratio=0.5, w_bits=4, a_bits=8), "classifier": LayerPolicy(w_bits=4, a_bits=8)},
        order=order, finetune_steps=20, batch_size=32, calibration_batches=2,
        quantizer={"kind": "delayed", "per_channel": True},
    )
    result = compress(tiny_model(), policy, task=tiny_task())
    layers = compressible_layers(result.model)
    for name, steps in result.weight_steps.items():
        assert isinstance(steps, list) and len(steps) == layers[name].weight.shape[0], name
    report = {row.name: row for row in result.cost(SHAPE).layers}
    assert all(report[n].params == int(torch.count_nonzero(layers[n].weight)) for n in layers)
