"""Fake quantization with STE: mid-rise (seed 000 App. A), clip-range uniform (seed 003 eq. 20-21),
delayed and saturated (seed 004 eq. 5-7), power-of-two bits (seed 002 Alg. 2), BN recalibration."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from autoprune.errors import AutopruneError
from autoprune.quant import (
    ACT_QUANT, ClipUniformWeight, DelayedWeight, MidriseWeight, act_quantizer, advance_quantizers, attach_act_quantizer, bake_weights,
    WEIGHT_QUANTIZERS, calibrate, make_act_quantizer, make_weight_quantizer, pow2_bit_map, pow2_bits, recalibrate_batchnorm, weight_quantizer,
)
from autoprune.policy import Policy
from autoprune.cost import LayerQuant, measure_cost
from autoprune.quant.midrise import midrise_delta, midrise_int, tread_int


def appendix_a(w: np.ndarray, delta: float, bits: int) -> np.ndarray:
    """Seed 000 App. A's numpy code, plus the clamp to the b-bit range."""
    pruned = np.all(abs(w) < delta / 2, axis=(1, 2, 3))
    w_int = np.floor(w / delta) + 0.5
    w_int[pruned, :, :, :] = 0
    top = 2.0 ** (bits - 1) - 0.5
    return np.clip(w_int, -top, top)


def quantized(name: str, w: torch.Tensor, *, bits: int, **options: float) -> tuple[torch.Tensor, float]:
    q = weight_quantizer(name, bits=bits, **options)
    return q(w), q.delta


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_midrise_equals_appendix_a_reference(bits: int) -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    w[2] *= 1e-3 / w[2].abs().max()  # every weight of filter 2 within +-delta/2 at any bits
    w_q, delta = quantized("midrise", w, bits=bits)
    assert delta == midrise_delta(w, bits)
    expected = (delta * appendix_a(w.numpy().astype(np.float64), delta, bits)).astype(np.float32)
    assert np.array_equal(w_q.detach().numpy(), expected)
    assert torch.all(w_q[2] == 0)
    assert torch.all(w_q[[0, 1, 3, 4, 5]].flatten(1).abs().amax(1) > 0)
    assert w_q.abs().max().item() == pytest.approx(delta * (2 ** (bits - 1) - 0.5))  # clamped top level


def test_midrise_frozen_step_clamps_grown_weights_and_keeps_pruned_zeros() -> None:
    q = weight_quantizer("midrise", bits=3)
    w = torch.tensor([[0.1, -0.3, 0.5, 0.9], [1.0, -1.0, 0.0, 0.2]])
    q(w)
    q.freeze()
    assert q.delta == 0.25
    grown = w * 3  # beyond the frozen range: levels clamp to +-3.5 delta
    expected = q.delta * appendix_a(grown.numpy()[:, :, None, None].astype(np.float64), q.delta, 3)[:, :, 0, 0]
    expected[grown.numpy() == 0] = 0  # a weight removed by pruning stays zero (midrise_int, DESIGN)
    assert np.array_equal(q(grown).numpy(), expected.astype(np.float32))
    assert q(grown).abs().max().item() == 3.5 * q.delta
    given = MidriseWeight(bits=3, delta=0.5)
    assert given.frozen and torch.equal(given(w), (0.5 * midrise_int(w, 0.5, 3)).float())


@pytest.mark.parametrize("name", ["clip_uniform", "delayed", "saturated"])
@pytest.mark.parametrize("bits", [3, 4, 8, 16])
def test_cost_model_reads_mid_tread_levels_exactly(name: str, bits: int) -> None:
    # W_q is k * delta exactly from 3 bits on; the cost model reads the integers k back (grid "midtread").
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(bits))
    w_q, delta = quantized(name, w, bits=bits)
    k = w_q.detach().to(torch.float64) / delta
    assert torch.equal(k, k.round())
    assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1
    assert WEIGHT_QUANTIZERS.lookup(name).grid_for(bits).name == "midtread"
    assert torch.equal(tread_int(w_q, delta, bits), k)


@pytest.mark.parametrize("name", ["clip_uniform", "delayed", "saturated"])
@pytest.mark.parametrize("bits", [1, 2])
def test_signed_low_bit_grids_keep_both_signs(name: str, bits: int) -> None:
    """Issue 10 bug 4: at 1 bit the old grid was {-M, 0} (every positive weight became 0), at 2 bits lopsided."""
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    w[0, 0, 0, 0] = 0.0  # a pruned weight stays pruned
    w_q, delta = quantized(name, w, bits=bits)
    levels = sorted(set((w_q.detach().double() / delta).flatten().tolist()))
    expected = {1: [-0.5, 0.0, 0.5], 2: [-1.5, -0.5, 0.0, 0.5, 1.5]}[bits]
    assert levels == expected
    assert w_q[0, 0, 0, 0] == 0 and float((w_q == 0).double().mean()) == 1 / w.numel()
    assert torch.equal(torch.sign(w_q[w != 0]), torch.sign(w[w != 0]))  # every weight keeps its sign
    # The cost model reads exactly these levels: nonzero count and bits per level.
    assert WEIGHT_QUANTIZERS.lookup(name).grid_for(bits).name == "midrise"
    assert torch.equal(midrise_int(w_q, delta, bits), (w_q.detach().double() / delta))
    conv = nn.Conv2d(8, 16, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w_q)
    report = measure_cost(nn.Sequential(conv).eval(), input_shape=(8, 5, 5), layers={"0": LayerQuant(w_bits=bits, delta=delta, grid="midrise")})
    row = report.layers[0]
    assert row.params == w.numel() - 1
    assert row.esn_d == sum({0.5: 1, 1.5: 2}[abs(v)] for v in (w_q.double() / delta).flatten().tolist() if v != 0)


def test_cost_model_counts_mid_tread_levels_in_twos_complement() -> None:
    """Issue 10 bug 4: a mid-tread layer is costed on its integers k (ESN_d: bits of each k), not on k + 0.5."""
    conv = nn.Conv2d(1, 2, (1, 4), bias=False)
    delta = 0.25
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1.0, 0.0, 0.75]]], [[[0.25, -0.25, -0.5, 0.0]]]]))
    report = measure_cost(nn.Sequential(conv).eval(), input_shape=(1, 1, 4), layers={"0": LayerQuant(w_bits=4, delta=delta, grid="midtread")})
    row = report.layers[0]
    # k = [4, -4, 0, 3] and [1, -1, -2, 0]: bits 4, 3, -, 3 and 2, 1, 2, -.
    assert row.params == 6 and row.esn_d == 4 + 3 + 3 + 2 + 1 + 2
    assert row.esn_a == 16 + 16 + 9 + 1 + 1 + 4
    assert row.esn_d_prime == 3 * 4 + 3 * 2  # per filter: nonzero count x widest level


@pytest.mark.parametrize("name", ["midrise", "clip_uniform"])
def test_ste_gradient_is_identity_inside_the_range(name: str) -> None:
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    (weight_quantizer(name, bits=3)(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_clip_uniform_gradient_is_zero_outside_the_clip_range() -> None:
    q = weight_quantizer("clip_uniform", bits=4)
    q(torch.tensor([-1.0, 1.0]))
    q.freeze()
    top = 8 * q.delta
    w = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5], requires_grad=True)
    out = q(w)
    out.sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert out[0].item() == -top and out[-1].item() == top - q.delta  # clipped to the two end levels


def test_weight_quantizer_as_parametrization_trains_the_float_weights() -> None:
    layer = nn.Linear(6, 3)
    parametrize.register_parametrization(layer, "weight", weight_quantizer("midrise", bits=2))
    original = layer.parametrizations.weight.original
    before = original.detach().clone()
    delta = layer.parametrizations.weight[0].delta
    assert torch.equal(layer.weight, (delta * midrise_int(before, delta, 2)).float())
    layer(torch.randn(4, 6)).square().sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(original.detach(), before)  # float shadow weights moved through the STE
    assert len(torch.unique(layer.weight.detach())) <= 4


def test_delayed_is_identity_before_tq_then_fixes_the_mse_optimal_step() -> None:
    layer = nn.Linear(64, 32)
    q = weight_quantizer("delayed", bits=3, delay=5)
    parametrize.register_parametrization(layer, "weight", q)
    for step in range(5):
        advance_quantizers(layer, step=step)
        assert torch.equal(layer.weight, layer.parametrizations.weight.original)
    with pytest.raises(AutopruneError, match="not known yet"):
        q.delta
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))
    w_tq = layer.parametrizations.weight.original.detach().clone()
    advance_quantizers(layer, step=5)
    w_q = layer.weight.detach()
    assert len(torch.unique(w_q)) <= 8 and q.frozen
    max_abs = ClipUniformWeight(bits=3)(w_tq)
    mse, mse_max_abs = (w_q - w_tq).square().sum().item(), (max_abs - w_tq).square().sum().item()
    assert mse < 0.6 * mse_max_abs  # Gaussian weights at 3 bits: clipping the tails pays
    fixed = q.delta
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(0.5)
    advance_quantizers(layer, step=50)
    assert q.delta == fixed and torch.equal(layer.weight / fixed, (layer.weight / fixed).round())


def test_freeze_before_tq_quantizes_the_weights_last_seen() -> None:
    layer = nn.Linear(16, 8)
    q = weight_quantizer("delayed", bits=2, delay=100)
    parametrize.register_parametrization(layer, "weight", q)  # runs the quantizer once: it has seen W
    w = layer.parametrizations.weight.original.detach().clone()
    q.freeze()  # post-training: no training step will ever reach t_q
    assert q.frozen and torch.equal(layer.weight, DelayedWeight(bits=2)(w))
    with pytest.raises(AutopruneError, match="seen none"):
        weight_quantizer("midrise", bits=4).freeze()


def test_saturated_clips_at_the_quantile() -> None:
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    w[0, 0, 0, 0] = 40.0  # an outlier that max-abs would let stretch the step
    limit = float(np.quantile(w.abs().numpy(), 0.99))
    w_q, delta = quantized("saturated", w, bits=8, quantile=0.99)
    assert w_q.abs().max().item() <= limit * (1 + 2**-8)
    assert w_q[0, 0, 0, 0].item() >= limit - 2 * delta  # the outlier sits at the top of the range
    assert delta < 2 * limit / 2**8 * 1.01
    _, delta_max_abs = quantized("clip_uniform", w, bits=8)
    assert delta_max_abs > 10 * delta


def test_pow2_bits_follows_algorithm_2() -> None:
    # s' = floor(log2 b), b' = 2^s': rounds down; 1 bit goes up to the smallest allowed width.
    expected = {1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 7: 4, 8: 8, 12: 8, 15: 8, 16: 16, 17: 16, 31: 16, 32: 32}
    assert {b: pow2_bits(b) for b in expected} == expected
    assert {pow2_bits(b) for b in range(1, 33)} == {2, 4, 8, 16, 32}
    assert pow2_bit_map({"conv1": 3, "fc": 32, "conv2": 6}) == {"conv1": 2, "fc": 32, "conv2": 4}
    for bad in (0, 33, 2.5):
        with pytest.raises(AutopruneError):
            pow2_bits(bad)  # type: ignore[arg-type]


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * math.log10(x.square().sum().item() / (y - x).square().sum().item())


def test_act_quantizer_sqnr_grows_6db_per_bit() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    sqnr = {}
    for bits in (4, 6, 8):
        q = act_quantizer("clip_uniform", bits=bits)
        q.observing = True
        assert q(x) is x  # observing passes the data through
        q.observing = False
        q.fix_range()
        sqnr[bits] = sqnr_db(x, q(x))
        assert q.signed and q.delta == pytest.approx(2 * x.abs().max().item() / 2**bits, rel=1e-3)
        uniform_noise = 10 * math.log10(x.var().item() / (q.delta**2 / 12))
        assert sqnr[bits] == pytest.approx(uniform_noise, abs=1.0)
    assert sqnr[8] > 40
    assert 5.5 < (sqnr[8] - sqnr[4]) / 4 < 6.5
    assert sqnr[4] < sqnr[6] - 10


def test_act_quantizer_is_unsigned_after_relu_keeps_zero_and_32_bits_is_identity() -> None:
    x = torch.relu(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
    q = act_quantizer("clip_uniform", bits=4)
    y = q(x)  # no calibration: the first batch sets the range
    assert not q.signed and q.delta == pytest.approx(x.max().item() / 16, rel=1e-3)
    assert torch.all(y[x == 0] == 0)
    assert y.min() >= 0 and len(torch.unique(y)) <= 16
    signed = act_quantizer("saturated", bits=4)
    signed(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    assert signed.signed
    ident = act_quantizer("delayed", bits=32)
    assert ident(x) is x


def test_act_quantizer_ste_passes_inside_the_range_only() -> None:
    q = act_quantizer("clip_uniform", bits=2)
    q(torch.tensor([0.0, 4.0]))  # unsigned, range [0, 4]
    x = torch.tensor([-1.0, 0.5, 3.0, 4.0, 9.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_delayed_act_quantizer_waits_for_tq_even_when_calibrated() -> None:
    """Issue 10 bug 1: a calibrated delayed quantizer is still float before its t_q."""
    policy = Policy(act_quantizer={"kind": "delayed", "delay": 3})
    q = make_act_quantizer(policy, bits=4, start_step=10)
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    for step in range(13):
        q.advance(step)
        assert q(x) is x and not q.calibrated
    q.advance(13)
    assert len(torch.unique(q(x))) <= 16 and q.calibrated
    clip_max_abs = act_quantizer("clip_uniform", bits=4)
    mse = (q(x) - x).square().sum().item()
    assert mse < (clip_max_abs(x) - x).square().sum().item()
    early = make_act_quantizer(policy, bits=4)
    assert calibrate(nn.Sequential(early), None, [x, 2 * x]) == 2
    assert early.calibrated and early.current_step == 0  # calibration fixes the range before t_q ...
    assert early(x) is x  # ... but the features stay float until t_q
    early.advance(3)
    assert len(torch.unique(early(x))) <= 16


def test_act_quantizer_range_survives_state_dict() -> None:
    layer = nn.Linear(8, 2)
    attach_act_quantizer(layer, act_quantizer("saturated", bits=6))
    calibrate(layer, None, [torch.relu(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))])
    fresh = nn.Linear(8, 2)
    attach_act_quantizer(fresh, act_quantizer("saturated", bits=6))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.input_quant.delta == layer.input_quant.delta and not fresh.input_quant.signed
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(AutopruneError, match="no batches"):
        calibrate(layer, None, [])


def test_policy_factories_carry_delay_and_quantile() -> None:
    policy = Policy(quantizer={"kind": "saturated", "delay": 7, "quantile": 0.98})
    q = make_weight_quantizer(policy, bits=4, start_step=20)
    assert q.delay == 27 and q.quantile == 0.98 and q.bits == 4
    assert isinstance(make_weight_quantizer(Policy(), bits=8), MidriseWeight) and make_weight_quantizer(Policy(), bits=8).delay == 0


def test_unknown_quantizer_names_list_the_registered_ones() -> None:
    with pytest.raises(AutopruneError) as err:
        weight_quantizer("lloyd", bits=4)
    assert err.value.field == "policy.quantizer" and err.value.value == "lloyd"
    assert "is not registered (registered: midrise, clip_uniform, delayed, saturated" in str(err.value)
    with pytest.raises(AutopruneError, match=r"policy.act_quantizer: 'midrise' is not registered \(registered: clip_uniform"):
        act_quantizer("midrise", bits=4)


def separable_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)
    labels = torch.randint(0, 8, (2000,), generator=g)
    return centers[labels] + 0.9 * torch.randn(2000, 16, generator=g), labels


def quantize_mlp(model: nn.Sequential, bits: int, calibration: torch.Tensor) -> nn.Sequential:
    model = copy.deepcopy(model)
    for layer in (model[0], model[2]):
        parametrize.register_parametrization(layer, "weight", weight_quantizer("midrise", bits=bits))
        attach_act_quantizer(layer, act_quantizer("clip_uniform", bits=bits))
    assert calibrate(model, None, [calibration], max_batches=4) == 1
    return model


def test_quantized_mlp_accuracy_8_bits_close_2_bits_clearly_lower() -> None:
    x, y = separable_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = torch.randint(0, 1000, (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x[1000:]).argmax(1) == y[1000:]).float().mean().item()

    full = accuracy(model)
    assert full > 0.95
    eight, two = (accuracy(quantize_mlp(model, bits, x[:256])) for bits in (8, 2))
    assert abs(full - eight) <= 0.01
    assert full - two >= 0.04


def test_bake_weights_leaves_quantized_weights_and_reports_them() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    attach_act_quantizer(model[2], act_quantizer("clip_uniform", bits=8))
    parametrize.register_parametrization(model[0], "weight", weight_quantizer("midrise", bits=4))
    parametrize.register_parametrization(model[2], "weight", weight_quantizer("delayed", bits=3, delay=10**6))
    expected_conv = model[0].weight.detach().clone()
    conv_delta = midrise_delta(model[0].parametrizations.weight.original, 4)
    float_fc = model[2].weight.detach().clone()
    assert torch.equal(float_fc, model[2].parametrizations.weight.original)  # delay not reached
    baked = bake_weights(model)
    assert set(baked) == {"0", "2"}
    assert baked["0"] == {"w_bits": 4, "delta": conv_delta, "quantizer": "midrise"}
    assert baked["2"]["quantizer"] == "delayed" and baked["2"]["w_bits"] == 3
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    assert isinstance(model[0].weight, nn.Parameter) and torch.equal(model[0].weight, expected_conv)
    fc_levels = model[2].weight.detach() / baked["2"]["delta"]
    assert torch.equal(fc_levels, fc_levels.round()) and not torch.equal(model[2].weight, float_fc)
    assert hasattr(model[2], ACT_QUANT)  # activation quantizers stay
    model(torch.randn(2, 3, 6, 6))


def test_batchnorm_recalibration_matches_the_data_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.BatchNorm2d(4))
    model.train()
    bn = model[1]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 5, 5, generator=g) * 2 + 1 for _ in range(5)]
    recalibrate_batchnorm(model, [torch.randn(8, 3, 5, 5, generator=g)], max_batches=1)  # stale statistics
    used = recalibrate_batchnorm(model, [(b, torch.zeros(16)) for b in batches], max_batches=4)
    assert used == 4 and not model.training and bn.momentum == 0.3 and model[3].momentum == 0.1
    with torch.no_grad():
        features = [model[0](b) for b in batches[:4]]
    channel_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    channel_var = torch.stack([f.var(dim=(0, 2, 3)) for f in features]).mean(0)  # unbiased per batch, averaged
    assert torch.allclose(bn.running_mean, channel_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, channel_var, rtol=1e-4)
    everything = torch.cat(features)
    assert torch.allclose(bn.running_mean, everything.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, everything.var(dim=(0, 2, 3)), rtol=0.05)
    assert int(bn.num_batches_tracked) == 4
    with pytest.raises(AutopruneError, match="at least one batch"):
        recalibrate_batchnorm(model, [], max_batches=1)
    assert torch.allclose(bn.running_mean, channel_mean, atol=1e-5)  # untouched by the refused call


@pytest.mark.parametrize("name", ["midrise", "clip_uniform", "delayed", "saturated"])
@pytest.mark.parametrize("bits", [2, 4])
def test_per_channel_steps_follow_each_channels_range(name: str, bits: int) -> None:
    """Issue 15 item 0: one step per output channel; each channel uses its own grid fully."""
    g = torch.Generator().manual_seed(bits)
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0]).view(-1, 1, 1, 1)
    w = torch.randn(4, 3, 3, 3, generator=g) * scales
    per_tensor = weight_quantizer(name, bits=bits)
    q = weight_quantizer(name, bits=bits, per_channel=True)
    w_q = q(w)
    steps = q.delta
    assert isinstance(steps, list) and len(steps) == 4
    assert steps == sorted(steps) and steps[-1] / steps[0] > 100  # each follows its channel's scale
    for c, step in enumerate(steps):
        alone = weight_quantizer(name, bits=bits)
        assert torch.equal(w_q[c], alone(w[c : c + 1])[0]) and alone.delta == step  # the per-tensor rule on the channel
        levels = torch.unique(w_q[c].double() / step)
        assert len(levels) <= 2**bits and (levels < 0).any() and (levels > 0).any()
    # per tensor, the small channels collapse onto a few levels (or zero); per channel they do not
    assert len(torch.unique(per_tensor(w)[0])) < len(torch.unique(w_q[0]))


@pytest.mark.parametrize("name", ["midrise", "clip_uniform"])
def test_cost_model_counts_per_channel_levels(name: str) -> None:
    """Issue 15 item 0: LayerQuant takes a step per channel and counts the levels really produced (ESN'_d per filter)."""
    from autoprune.compress import static_compress
    from autoprune.cost.esn import bits_of_levels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([0.01, 0.1, 1.0, 10.0]).view(-1, 1, 1, 1))
    policy = Policy(layers={"_default": {"w_bits": 4, "a_bits": 8}}, quantizer={"kind": name, "per_channel": True})
    result = static_compress(model, policy, input_shape=(2, 5, 5))
    steps = result.weight_steps["0"]
    assert isinstance(steps, list) and len(steps) == 4 and len(result.weight_steps["3"]) == 3
    row = next(r for r in result.cost((2, 5, 5)).layers if r.name == "0")
    weight = result.model[0].weight.detach().double()
    levels = weight / torch.tensor(steps, dtype=torch.float64).view(-1, 1, 1, 1)
    grid = WEIGHT_QUANTIZERS.lookup(name).grid_for(4)
    bits = bits_of_levels(levels, grid)
    assert row.params == int(torch.count_nonzero(weight))
    assert row.esn_d == float(bits.sum())
    per_filter = (levels != 0).flatten(1).sum(1).double() * bits.flatten(1).amax(1)
    assert row.esn_d_prime == pytest.approx(float(per_filter.sum()) * 25)
    assert bits.flatten(1).amax(1).tolist() == [4.0] * 4  # every channel reaches its top level
