"""DJPQ (seed 002): eq. 2-7 on hand-computed values, the VIB term, group gates and pruning, the BOPs estimate,
the DJPQ model file, and DJPQ / two-stage runs on digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from autoprune.cost import measure_cost
from autoprune.djpq import (
    DJPQConfig, DJPQModel, Gate, LearnedQuantizer, NonlinearQuant, build_layout, learn_policy, learn_two_stage,
    vib_term,
)
from autoprune.errors import AutopruneError
from autoprune.models import ResNetCifar, compressible_layers
from autoprune.bits import POW2_BITS
from autoprune.prune import channel_groups
from autoprune.task import Task, TrainSettings, accuracy, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine is shared: one torch thread is several times faster than a contended pool for these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- eq. 2 and its gradients eq. 5-7 --------------------------------------------------------------------

Q_S, Q_M, T, D = 0.1, 0.74, 0.5, 0.15
# By hand, q_m - q_s = 0.64 and (0.64)^0.5 = 0.8:
#   x = 0.26:  |x| - q_s = 0.16, u = 0.16^0.5 = 0.4, u/d = 2.6667, round 3, x_q = 3 * 0.15 = 0.45
#              eq. 5: 3 - 2.6667 = 0.33333;  eq. 6: 0 (|x| <= q_m);  eq. 7: 0.4 * ln 0.16 = -0.73303
#              dx_q/dx = t (|x| - q_s)^(t-1) = 0.5 / 0.4 = 1.25
#   x = -0.26: the same magnitudes, odd in sign(x): x_q = -0.45, eq. 5 -0.33333, eq. 7 +0.73303, dx_q/dx 1.25
#   x = 2.0:   above q_m: u = 0.8, u/d = 5.3333, round 5, x_q = 0.75
#              eq. 5: 5 - 5.3333 = -0.33333;  eq. 6: 0.5 * 0.64^-0.5 = 0.625;  eq. 7: 0.8 * ln 0.64 = -0.35703
#   x = 0.05:  below q_s: x_q = 0 and every gradient 0
HAND = [
    # x, x_q, d/dd, d/dq_m, d/dt, d/dx
    (0.26, 0.45, 1 / 3, 0.0, -0.7330326, 1.25),
    (-0.26, -0.45, -1 / 3, 0.0, 0.7330326, 1.25),
    (2.0, 0.75, -1 / 3, 0.625, -0.3570297, 0.0),
    (0.05, 0.0, 0.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("x, x_q, grad_d, grad_q_m, grad_t, grad_x", HAND)
def test_quantizer_and_its_straight_through_gradients_match_eq_2_and_5_to_7(x, x_q, grad_d, grad_q_m, grad_t, grad_x) -> None:
    xs = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    q_m, t, d = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (Q_M, T, D))
    out = NonlinearQuant.apply(xs, q_m, t, d, Q_S)
    out.sum().backward()
    assert out.item() == pytest.approx(x_q, abs=1e-12)
    assert d.grad.item() == pytest.approx(grad_d, abs=1e-6)
    assert q_m.grad.item() == pytest.approx(grad_q_m, abs=1e-6)
    assert t.grad.item() == pytest.approx(grad_t, abs=1e-6)
    assert xs.grad.item() == pytest.approx(grad_x, abs=1e-6)


def test_gradients_of_a_tensor_sum_over_its_elements() -> None:
    xs = torch.tensor([row[0] for row in HAND], dtype=torch.float64, requires_grad=True)
    q_m, t, d = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (Q_M, T, D))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (NonlinearQuant.apply(xs, q_m, t, d, Q_S) * weights).sum().backward()
    assert d.grad.item() == pytest.approx(sum(w * row[2] for w, row in zip(weights.tolist(), HAND)), abs=1e-6)
    assert t.grad.item() == pytest.approx(sum(w * row[4] for w, row in zip(weights.tolist(), HAND)), abs=1e-6)
    assert xs.grad.tolist() == pytest.approx([row[5] * w for row, w in zip(HAND, weights.tolist())], abs=1e-6)


def _quantizer(*, q_s: float, q_m: float, t: float, d: float, signed: bool, pow2: bool = False) -> LearnedQuantizer:
    q = LearnedQuantizer(q_m=1.0, bits=4, signed=signed, learn_t=signed, q_s_ratio=0.01, pow2=pow2)
    with torch.no_grad():
        q.q_s.fill_(q_s)
        q.q_m.fill_(q_m)
        q.t.fill_(t)
        q.d.fill_(d)
    return q


def test_bit_widths_of_eq_3_and_4() -> None:
    # eq. 3: (0.74 - 0.1)^0.5 / 0.15 = 5.3333, ceil(6.3333) = 7, log2 7 + 1 = 3.8074 -> 4 bits recorded
    weights = _quantizer(q_s=Q_S, q_m=Q_M, t=T, d=D, signed=True)
    assert weights.continuous_bits().item() == pytest.approx(math.log2(7) + 1, abs=1e-6)
    assert weights.bits() == 4
    # eq. 4: (6.5 - 0.5) / 0.5 = 12, log2 12 = 3.585 -> 4 bits
    acts = _quantizer(q_s=0.5, q_m=6.5, t=1.0, d=0.5, signed=False)
    assert acts.continuous_bits().item() == pytest.approx(math.log2(12), abs=1e-6)
    assert acts.bits() == 4
    # The ceil passes gradients straight through: db/dd = -(u / d^2) / (7 ln 2) = -35.5556 / 4.85203 = -7.32798
    weights.continuous_bits().backward()
    assert weights.d.grad.item() == pytest.approx(-7.32798, abs=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 6, 8, 16])
def test_initial_step_gives_the_initial_bits(bits: int) -> None:
    assert LearnedQuantizer(q_m=0.37, bits=bits, signed=True, learn_t=True, q_s_ratio=1e-3, pow2=False).bits() == bits
    assert LearnedQuantizer(q_m=5.1, bits=bits, signed=False, learn_t=False, q_s_ratio=1e-3, pow2=False).bits() == bits


def test_power_of_two_bits_follow_alg_2() -> None:
    # 3.807 bits: s = log2 3.807 = 1.93, floor 1, b' = 2; d' = 0.8 / (2^(2-1) - 1) = 0.8, q_m kept
    weights = _quantizer(q_s=Q_S, q_m=Q_M, t=T, d=D, signed=True, pow2=True)
    assert weights.bits() == 2
    assert weights.step().item() == pytest.approx(0.8)
    # x = 0.5: u = 0.4^0.5 = 0.63246, u / d' = 0.79057, round 1, x_q = 0.8; eq. 5 at d': 1 - 0.79057 = 0.20943
    out = weights(torch.tensor([0.5]))
    out.sum().backward()
    assert out.item() == pytest.approx(0.8)
    assert weights.d.grad.item() == pytest.approx(0.20943, abs=1e-4)
    # unsigned 3.585 bits: floor(log2 3.585) = 1, b' = 2, d' = 6 / 2^2 = 1.5
    acts = _quantizer(q_s=0.5, q_m=6.5, t=1.0, d=0.5, signed=False, pow2=True)
    assert acts.bits() == 2 and acts.continuous_bits().item() == pytest.approx(2.0)
    assert acts.step().item() == pytest.approx(1.5)


def test_projection_keeps_a_top_level_and_t_positive() -> None:
    q = _quantizer(q_s=0.1, q_m=0.05, t=-1.0, d=50.0, signed=True)
    q.constrain()
    assert q.q_m.item() > 0.1 and q.t.item() >= 0.1
    assert q.bits() == 2  # the grid {-d, 0, d}: d = (q_m - q_s)^t, top level round(1) = 1


# --- VIBNet gates, eq. 9-13 and 18 -----------------------------------------------------------------------


def test_vib_term_of_eq_13_on_hand_values() -> None:
    # mu = 2, sigma^2 = 1: log(1 + 4) = log 5; mu = 0.5, sigma^2 = 0.25: log(1 + 1) = log 2; mu = 0: 0. Sum = log 10.
    mu = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    log_sigma2 = torch.tensor([0.0, math.log(0.25), 0.0], dtype=torch.float64, requires_grad=True)
    term = vib_term(mu, log_sigma2)
    assert term.item() == pytest.approx(math.log(10.0))
    term.backward()
    # d/dmu = 2 mu / (sigma^2 + mu^2) = 4 / 5; d/dlog sigma^2 = -alpha / (1 + alpha) = -4 / 5 for the first gate
    assert mu.grad[0].item() == pytest.approx(0.8)
    assert log_sigma2.grad[0].item() == pytest.approx(-0.8)


def test_gate_prunes_below_alpha_th_and_is_its_mean_in_evaluation() -> None:
    gate = Gate(3, log_sigma2=0.0, alpha_th=1e-3)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([1.0, 0.01, 0.1]))  # alpha = 1, 1e-4, 1e-2
    assert gate.kept().tolist() == [True, False, True]
    gate.eval()
    gate.sample(2)
    h = torch.ones(2, 3, 4, 4)
    assert gate(h)[:, :, 0, 0].tolist() == [pytest.approx([1.0, 0.0, 0.1])] * 2
    gate.train()
    torch.manual_seed(0)
    gate.sample(4000)
    z = gate.current
    assert z.mean(0).tolist() == pytest.approx([1.0, 0.01, 0.1], abs=0.06)
    assert z.std(0).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.06)


# --- the DJPQ model on small graphs: group gates, pruning, BOPs, file ---------------------------------------


def _depthwise() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


MODELS = {"resnet8": lambda: ResNetCifar(depth=8, width=0.25, num_classes=4), "depthwise": _depthwise}
SHAPE = (3, 8, 8)


def _net(kind: str) -> tuple[nn.Module, DJPQModel]:
    torch.manual_seed(0)
    base = MODELS[kind]().eval()
    for module in base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    layout = build_layout(
        copy.deepcopy(base), input_shape=SHAPE, batches=[torch.randn(8, *SHAPE)], input_bits=8, init_w_bits=6,
        init_a_bits=5, q_s_ratio=1e-3, pow2=False, alpha_th=1e-3, tau=1.0, init_log_sigma2=-9.0,
    )
    return base, DJPQModel(copy.deepcopy(base), layout).eval()


def _close_channels(net: DJPQModel) -> dict[str, list[int]]:
    """Drive alpha of every other channel of each group to zero (mu = 0): eq. 18 prunes them."""
    closed = {}
    with torch.no_grad():
        for group in net.layout.gates:
            mu = net.gate(group).mu
            closed[group] = list(range(0, mu.numel(), 2))
            mu[closed[group]] = 0.0
    return closed


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gates_are_per_group_and_pruning_makes_a_smaller_model_computing_the_same(kind: str) -> None:
    base, net = _net(kind)
    groups = channel_groups(base, example_input=torch.zeros(1, *SHAPE))
    assert {g.name: g.layers for g in groups} == {name: spec.layers for name, spec in net.layout.gates.items()}
    if kind == "resnet8":
        assert any(len(spec.layers) > 1 for spec in net.layout.gates.values())  # a residual add shares one gate
    closed = _close_channels(net)
    x = torch.randn(5, *SHAPE)
    before = net(x)
    record = net.prune(example_input=torch.zeros(1, *SHAPE))
    layers = compressible_layers(net.model)
    for group, spec in net.layout.gates.items():
        kept = [i for i in range(spec.channels) if i not in closed[group]]
        for layer in spec.layers:
            assert record.layers[layer].kept == kept
            assert layers[layer].weight.shape[0] == len(kept)
    assert torch.allclose(net(x), before, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bops_estimate_is_eq_16_on_the_pruned_model(kind: str) -> None:
    base, net = _net(kind)
    dense = float(net.bops(soft=False))
    report = measure_cost(base, input_shape=SHAPE)
    bits = net.bits(soft=False)
    assert dense == pytest.approx(sum(row.macs * bits[row.name][0] * bits[row.name][1] for row in report.layers))
    _close_channels(net)
    estimate = float(net.bops(soft=False))
    net.prune(example_input=torch.zeros(1, *SHAPE))
    pruned = measure_cost(net.model, input_shape=SHAPE)
    assert estimate == pytest.approx(sum(row.macs * bits[row.name][0] * bits[row.name][1] for row in pruned.layers))
    assert estimate < dense
    # The soft estimate of eq. 19 is differentiable in the gates and the quantizers.
    net.train()
    net.bops(soft=True).backward()
    assert all(q.d.grad is not None for q in net.quantizers())
    assert all(g.mu.grad is not None for g in net.gates.values())


def test_saved_djpq_model_loads_and_computes_the_same(tmp_path) -> None:
    base, net = _net("resnet8")
    _close_channels(net)
    net.prune(example_input=torch.zeros(1, *SHAPE))
    with torch.no_grad():
        for q in net.quantizers():
            q.d.mul_(1.3)  # learned parameters differ from the ones a fresh model starts with
    x = torch.randn(5, *SHAPE)
    path = net.save(tmp_path / "djpq.safetensors")
    loaded = DJPQModel.load(path, base)
    assert torch.equal(loaded(x), net(x))
    assert loaded.policy() == net.policy()
    assert path.with_suffix(".policy.json").is_file()


def test_config_from_a_mapping_names_the_bad_field() -> None:
    assert DJPQConfig.from_dict({"beta": 1e-7, "pow2": True}) == DJPQConfig(beta=1e-7, pow2=True)
    with pytest.raises(AutopruneError, match="init_w_bits"):
        DJPQConfig.from_dict({"init_w_bits": 1})
    with pytest.raises(AutopruneError, match="betta"):
        DJPQConfig.from_dict({"betta": 1e-7})


def test_cost_model_traces_a_pruned_djpq_model_at_its_learned_bits() -> None:
    _, net = _net("resnet8")
    _close_channels(net)
    net.prune(example_input=torch.zeros(1, *SHAPE))
    report = measure_cost(net.model, input_shape=SHAPE, layers=net.cost_layers(), input_bits=8)
    assert report.total.macs > 0
    assert {row.name: row.w_bits for row in report.layers} == {n: lp.w_bits for n, lp in net.policy().layers.items()}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("learn", [learn_policy, learn_two_stage])
def test_a_run_on_residual_and_depthwise_graphs_gives_a_replayable_policy_and_model(kind: str, learn, tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from autoprune.compress import check_policy

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, *SHAPE), torch.randint(0, 4, (32,)))
    base = MODELS[kind]()
    task = Task.from_model(base, train=data, val=data, signal_steps=0, device="cpu")
    # alpha_th far above every alpha: eq. 18 prunes each group down to its one best channel
    result = learn(base, task=task, config=DJPQConfig(steps=2, batch_size=16, alpha_th=1e6))
    groups = result.model.layout.gates
    assert set(result.structured.layers) == {layer for spec in groups.values() for layer in spec.layers}
    assert all(entry.after == 1 for entry in result.structured.layers.values())
    resolved = check_policy(base, result.policy, input_shape=SHAPE)
    assert {n: lp.keep_ratio for n, lp in resolved.items()} == {n: lp.keep_ratio for n, lp in result.policy.layers.items()}
    x = torch.randn(3, *SHAPE)
    loaded = DJPQModel.load(result.model.save(tmp_path / "m.safetensors"), base)
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_a_run_is_reproducible_from_its_seed() -> None:
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, *SHAPE), torch.randint(0, 4, (32,)))
    base = MODELS["resnet8"]()
    task = Task.from_model(base, train=data, val=data, signal_steps=0, device="cpu")
    config = DJPQConfig(steps=4, batch_size=8, beta=1e-6, quant_lr_scale=5.0)
    first, second = (learn_policy(base, task=task, config=config) for _ in range(2))
    assert first.curve == second.curve and first.policy == second.policy
    assert learn_policy(base, task=task, config=config.model_copy(update={"seed": 1})).curve != first.curve


# --- DJPQ and the two-stage baseline on digits ---------------------------------------------------------------

LARGE_BETA = DJPQConfig(beta=1e-5, gamma=0.03, steps=150, quant_lr_scale=1.0)


@pytest.fixture(scope="module")
def digits() -> Task:
    return Task()


@pytest.fixture(scope="module")
def small(digits: Task) -> nn.Module:
    """A two-conv digits model trained in a few seconds (about 97 % validation accuracy)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    return train(model, digits.splits.train, TrainSettings(epochs=3, lr=0.05), seed=0, progress=False)


@pytest.fixture(scope="module")
def large_beta(small: nn.Module, digits: Task):
    return learn_policy(small, task=digits, config=LARGE_BETA)


@pytest.mark.e2e
def test_large_beta_learns_different_bits_per_layer_and_prunes_channels(small: nn.Module, large_beta) -> None:
    policy = large_beta.policy
    bits = [lp.w_bits for lp in policy.layers.values()] + [policy.layers[n].a_bits for n in ("3", "8")]
    assert len(set(bits)) > 1, policy.summary()
    assert max(lp.w_bits for lp in policy.layers.values()) < LARGE_BETA.init_w_bits  # BOPs pulled them down
    assert large_beta.structured.layers, "no channel was pruned"
    widths = {name: layer.weight.shape[0] for name, layer in compressible_layers(large_beta.model.model).items()}
    for name, entry in large_beta.structured.layers.items():
        assert widths[name] == entry.after < entry.before
        assert policy.layers[name].keep_ratio == pytest.approx(entry.after / entry.before)
    curve = large_beta.curve
    assert len(curve) == LARGE_BETA.steps and curve[-1].bops < curve[0].bops / 2
    assert large_beta.bops() < float(measure_cost(small, input_shape=(1, 8, 8)).total.macs) * 6 * 6


@pytest.mark.e2e
def test_tiny_beta_keeps_the_float_accuracy_within_one_point(small: nn.Module, digits: Task) -> None:
    result = learn_policy(small, task=digits, config=DJPQConfig(beta=1e-12, gamma=1e-8, steps=150, quant_lr_scale=1.0))
    assert accuracy(result.model, digits.splits.val) >= accuracy(small, digits.splits.val) - 1.0
    assert all(lp.w_bits < 32 and lp.a_bits < 32 for lp in result.policy.layers.values())


@pytest.mark.e2e
def test_saved_result_reproduces_its_accuracy(small: nn.Module, digits: Task, large_beta, tmp_path) -> None:
    path = large_beta.model.save(tmp_path / "djpq.safetensors")
    loaded = DJPQModel.load(path, small)
    assert accuracy(loaded, digits.splits.val) == accuracy(large_beta.model, digits.splits.val)
    x = digits.splits.val.tensors[0][:16]
    assert torch.equal(loaded.eval()(x), large_beta.model.eval()(x))


@pytest.mark.e2e
def test_learned_policy_applies_with_compress(small: nn.Module, digits: Task, large_beta) -> None:
    from autoprune.compress import compress

    policy = large_beta.policy.model_copy(update={"finetune_steps": 40})
    result = compress(small, policy, task=digits)
    djpq_widths = {n: m.weight.shape[0] for n, m in compressible_layers(large_beta.model.model).items()}
    assert {n: m.weight.shape[0] for n, m in compressible_layers(result.model).items()} == djpq_widths
    assert {n: lp.w_bits for n, lp in result.layers.items()} == {n: lp.w_bits for n, lp in policy.layers.items()}
    assert result.act_bits["8"] == policy.layers["8"].a_bits
    assert accuracy(result.model, digits.splits.val) > 80.0


@pytest.mark.e2e
def test_two_stage_prunes_first_then_learns_bits_on_the_pruned_model(small: nn.Module, digits: Task) -> None:
    result = learn_two_stage(small, task=digits, config=LARGE_BETA)
    stages = [point.stage for point in result.curve]
    assert stages == ["prune"] * LARGE_BETA.steps + ["quantize"] * LARGE_BETA.steps
    assert result.structured.layers and result.strategy == "two_stage" and result.policy.order == "prune_then_quantize"
    # Stage 1 is float (32-bit weights and activations): its BOPs estimate starts at MACs x 1024, falls with pruning.
    assert result.curve[0].bops == pytest.approx(measure_cost(small, input_shape=(1, 8, 8)).total.macs * 1024, rel=1e-3)
    assert result.curve[LARGE_BETA.steps - 1].bops < result.curve[0].bops
    assert result.curve[-1].bops < result.curve[LARGE_BETA.steps].bops
    assert accuracy(result.model, digits.splits.val) > 80.0


@pytest.mark.e2e
def test_power_of_two_bits(small: nn.Module, digits: Task) -> None:
    result = learn_policy(small, task=digits, config=LARGE_BETA.model_copy(update={"pow2": True, "steps": 60}))
    assert result.policy.pow2_bits
    for lp in result.policy.layers.values():
        assert lp.w_bits in POW2_BITS and lp.a_bits in POW2_BITS
