"""Activation calibration never produces NaN or inf (issue 23 item 3): a zero or degenerate range gets a
defined step, a range holding inf or NaN is refused in one line naming the layer and the range."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.quant import act_quantizer, attach_act_quantizer, calibrate
from autoprune.quant.uniform import uniform_step


class Scaled(nn.Module):
    """A model whose second layer reads ``factor`` times the first layer's output (0, inf or NaN)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x) * self.factor)


def quantized_model(factor: float, kind: str) -> Scaled:
    torch.manual_seed(0)
    model = Scaled(factor)
    for layer in (model.first, model.second):
        attach_act_quantizer(layer, act_quantizer(kind, bits=4))
    return model


def test_degenerate_ranges_take_a_unit_range() -> None:
    # 1.0 signed at 4 bits: 2 / 16 = 0.125; a range of 1e-40 would round the step to a float32 zero.
    assert uniform_step(0.0, bits=4, signed=True) == 0.125
    assert uniform_step(1e-40, bits=4, signed=True) == 0.125
    assert uniform_step(3.0, bits=4, signed=False) == 3.0 / 16


@pytest.mark.parametrize("clip", [float("inf"), float("nan")])
def test_a_range_that_is_not_finite_has_no_step(clip: float) -> None:
    with pytest.raises(AutopruneError, match="quantization range: .* is not finite"):
        uniform_step(clip, bits=4, signed=True)


@pytest.mark.parametrize("kind", ["clip_uniform", "delayed", "saturated"])
def test_all_zero_activations_calibrate_to_a_finite_step(kind: str) -> None:
    model = quantized_model(0.0, kind)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    calibrate(model, None, [x])
    step = model.second.input_quant.delta
    assert step == 1.0 / 16  # unsigned (the minimum seen is 0), unit range
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, model.second.bias.expand(16, 2))  # zero stays exactly zero


@pytest.mark.parametrize(("factor", "shown"), [(float("inf"), r"\[-inf, inf\]"), (float("nan"), r"\[nan, nan\]")])
def test_a_non_finite_activation_is_refused_naming_the_layer_and_range(factor: float, shown: str) -> None:
    model = quantized_model(factor, "clip_uniform")
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AutopruneError, match=rf"^activation range of layer 'second': {shown} is not finite") as caught:
        calibrate(model, None, [x])
    assert "\n" not in str(caught.value)
    assert model.first.input_quant.calibrated  # the layer before it was fine


def test_a_nan_in_a_later_batch_is_not_forgotten() -> None:
    quantizer = act_quantizer("clip_uniform", bits=4)
    quantizer.observing = True
    quantizer(torch.tensor([float("nan"), 1.0]))
    quantizer(torch.tensor([2.0, 3.0]))  # min(nan, 2.0) is nan but min(2.0, nan) is 2.0: order must not matter
    with pytest.raises(AutopruneError, match="not finite"):
        quantizer.fix_range()


def _apply_half_w4a4(model: nn.Module) -> object:
    import autoprune
    from torch.utils.data import TensorDataset

    from autoprune.task import Task

    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    policy = {"layers": {"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 4}}, "finetune_steps": 0, "batch_size": 8}
    return autoprune.apply(model, policy, task=Task.from_model(model, train=data, val=data, signal_steps=0))


def test_apply_on_a_model_whose_activation_is_all_zeros_gives_finite_outputs() -> None:
    torch.manual_seed(0)
    result = _apply_half_w4a4(Scaled(0.0))
    assert result.model.first.out_features == 2  # keep 0.5 of 4
    assert torch.isfinite(result.model(torch.randn(4, 4))).all()


def test_apply_on_a_model_whose_activation_is_inf_names_the_layer_in_one_line() -> None:
    torch.manual_seed(0)
    with pytest.raises(AutopruneError, match=r"^activation range of layer 'second': \[-inf, inf\] is not finite"):
        _apply_half_w4a4(Scaled(float("inf")))
