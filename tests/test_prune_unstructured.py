"""Unstructured weight and feature pruning along the sparsification schedule of seed 004 (eq. 3-4, 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.prune.unstructured import FeatureMask, FeatureMasker, WeightMasker, keep_largest, sparsity_at

SCHEDULE = {"start": 10, "interval": 5, "updates": 4}


def zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).sum().item() / t.numel()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)  # 72 weights
        self.fc = nn.Linear(4 * 4 * 4, 5)  # 320 weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_schedule_values_by_hand() -> None:
    # Cubic ramp s_i = s_f (1 - (1 - i/n)^3) at start + i*interval, i = 1..4, held in between.
    expected = {0: 0.0, 10: 0.0, 14: 0.0, 15: 0.8 * (1 - 0.75**3), 19: 0.8 * (1 - 0.75**3),
                20: 0.8 * (1 - 0.5**3), 25: 0.8 * (1 - 0.25**3), 29: 0.8 * (1 - 0.25**3), 30: 0.8, 10_000: 0.8}
    for step, value in expected.items():
        assert sparsity_at(step, target=0.8, **SCHEDULE) == pytest.approx(value, abs=1e-12), step
    assert sparsity_at(30, target=0.8, **SCHEDULE) == 0.8  # exactly, not approximately
    values = [sparsity_at(t, target=0.8, **SCHEDULE) for t in range(40)]
    assert values == sorted(values)
    assert len(set(values)) == 5  # 0 and one value per update


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"interval": 0}, "sparsity_interval"), ({"updates": 0}, "sparsity_updates"),
     ({"start": -1}, "sparsity_start"), ({"target": 1.0}, "target")],
)
def test_schedule_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    args = {"target": 0.5, **SCHEDULE, **kwargs}
    with pytest.raises(AutopruneError, match=field):
        sparsity_at(0, **args)


def test_keep_largest_drops_exact_count_even_when_magnitudes_tie() -> None:
    assert (~keep_largest(torch.ones(10), 0.3)).sum().item() == 3
    score = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert keep_largest(score, 0.4).tolist() == [True, False, True, False, True]


def test_weight_sparsity_follows_schedule_and_stays_at_target_under_sgd() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    targets = {"conv": 0.5, "fc": 0.75}
    masker = WeightMasker(model, targets, **SCHEDULE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    layers = {"conv": model.conv, "fc": model.fc}
    refits = []
    for step in range(40):
        opt.zero_grad()
        model(torch.randn(8, 2, 6, 6)).square().mean().backward()
        opt.step()
        if masker.update(step):
            refits.append(step)
        masker.apply()
        for name, layer in layers.items():
            level = sparsity_at(step, target=targets[name], **SCHEDULE)
            assert zero_fraction(layer.weight) == round(level * layer.weight.numel()) / layer.weight.numel()
    assert refits == [15, 20, 25, 30]
    assert masker.levels == targets
    assert zero_fraction(model.conv.weight) == 0.5
    assert zero_fraction(model.fc.weight) == 0.75
    assert masker.masks["fc"].dtype == torch.bool and masker.masks["fc"].shape == model.fc.weight.shape

    # The optimizer moves pruned weights off zero; apply() is what puts them back.
    opt.zero_grad()
    model(torch.randn(8, 2, 6, 6)).square().mean().backward()
    opt.step()
    assert zero_fraction(model.fc.weight) < 0.75
    masker.apply()
    assert zero_fraction(model.fc.weight) == 0.75
    assert torch.equal(model.fc.weight == 0, ~masker.masks["fc"])


def test_weight_pruning_removes_smallest_magnitudes() -> None:
    layer = nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randperm(20).float().sub(9.5).reshape(5, 4))  # distinct magnitudes, both signs
    before = layer.weight.detach().clone()
    masker = WeightMasker(nn.Sequential(layer), {"0": 0.4}, **SCHEDULE)
    masker.final()
    smallest = before.abs().flatten().argsort()[:8]
    assert set(torch.nonzero(~masker.masks["0"].flatten()).flatten().tolist()) == set(smallest.tolist())
    kept = masker.masks["0"]
    assert torch.equal(layer.weight[kept], before[kept])
    assert zero_fraction(layer.weight) == 0.4


def test_pruned_weight_reactivates_when_live_weights_shrink_below_it() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    masker = WeightMasker(nn.Sequential(layer), {"0": 0.5}, start=0, interval=1, updates=2)
    masker.update(1)  # 0.5 * (1 - 0.5^3) of 4 weights -> 2 pruned: 1.0 and 2.0
    assert layer.weight.tolist() == [[0.0, 0.0, 3.0, 4.0]]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 0.5, 4.0]]))  # training shrank a live weight
    masker.update(2)
    assert layer.weight.tolist() == [[0.0, 2.0, 0.0, 4.0]]  # 2.0 is back with its value when pruned


def test_weight_masker_names_bad_layers_and_targets() -> None:
    model = TinyNet()
    with pytest.raises(AutopruneError, match="conv, fc"):
        WeightMasker(model, {"nope": 0.5}, **SCHEDULE)
    with pytest.raises(AutopruneError, match="weight sparsity of 'fc'"):
        WeightMasker(model, {"fc": 1.5}, **SCHEDULE)
    assert WeightMasker(model, {"conv": 0.0, "fc": 0.5}, **SCHEDULE).masks.keys() == {"fc"}


def scaled_features(batch: int, scale: torch.Tensor) -> torch.Tensor:
    return scale * torch.randn(batch, *scale.shape)


def test_feature_sparsity_reaches_target_in_eval_on_held_out_batches() -> None:
    torch.manual_seed(0)
    # 100 neurons per sample with well separated typical magnitudes: the ones to remove are known.
    scale = torch.logspace(-1.5, 1.5, 100)[torch.randperm(100)].reshape(4, 5, 5)
    model = nn.Sequential(nn.Conv2d(4, 3, 1))
    masker = FeatureMasker(model, {"0": 0.6}, **SCHEDULE, window=16)
    model.train()
    for step in range(35):
        model(scaled_features(64, scale))
        masker.update(step)
        mask = masker.masks["0"].mask
        level = sparsity_at(step, target=0.6, **SCHEDULE)
        assert (mask is None and level == 0) or zero_fraction(mask) == round(level * 100) / 100

    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            model(scaled_features(32, scale))
    assert zero_fraction(torch.cat(seen)) == pytest.approx(0.6, abs=0.02)
    kept = masker.masks["0"].mask
    ideal = keep_largest(scale, 0.6)
    assert (kept == ideal).float().mean().item() >= 0.96
    assert masker.masks["0"] in list(model.modules())  # train()/eval() and state_dict reach it


def test_feature_window_follows_recent_training_batches_only() -> None:
    # Neurons 0-1 are loud in an old batch, neurons 2-3 in the recent ones.
    old = torch.tensor([[10.0, 10.0, 1.0, 1.0]])
    recent = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    short, long = FeatureMask(window=2), FeatureMask(window=3)
    for fm in (short, long):
        for x in (old, recent, recent):
            fm(x)
        fm.eval()
        fm(torch.tensor([[0.0, 0.0, 100.0, 100.0]]) * 1e3)  # eval data must not enter the window
        fm.update(sparsity=0.5)
    assert short.mask.tolist() == [False, False, True, True]  # the old batch slid out
    assert long.mask.tolist() == [True, True, False, False]  # sums 12 vs 5
    assert short(torch.ones(3, 4)).tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3


def test_feature_mask_before_fit_and_on_wrong_shape() -> None:
    fm = FeatureMask(window=4)
    x = torch.randn(2, 3)
    assert torch.equal(fm(x), x)
    fm.update(sparsity=0.0)
    with pytest.raises(AutopruneError, match="fitted feature shape"):
        fm(torch.randn(2, 5))
    with pytest.raises(AutopruneError, match="training batch"):
        FeatureMask(window=4).update(sparsity=0.5)


def test_feature_masker_prunes_before_other_pre_hooks_and_removes_cleanly() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    seen: list[torch.Tensor] = []
    model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))  # e.g. an input quantizer
    masker = FeatureMasker(model, {"0": 0.5}, start=0, interval=1, updates=1, window=1)
    model(torch.tensor([[4.0, 1.0, 3.0, 2.0]]))
    masker.update(1)
    model(torch.tensor([[4.0, 1.0, 3.0, 2.0]]))
    assert seen[-1].tolist() == [[4.0, 0.0, 3.0, 0.0]]
    masker.remove()
    model(torch.tensor([[4.0, 1.0, 3.0, 2.0]]))
    assert seen[-1].tolist() == [[4.0, 1.0, 3.0, 2.0]]
    assert not hasattr(model[0], "feature_mask")
    with pytest.raises(AutopruneError, match="not a layer"):
        FeatureMasker(model, {"1": 0.5}, **SCHEDULE, window=2)
