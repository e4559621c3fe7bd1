"""PfQ on the model's device: no tensor of the pruner or of the workflow's second pass is made on the CPU
when the model lives elsewhere. No GPU here: the ``meta`` device stands in for CUDA (a CPU tensor combined
with a meta one fails as with a CUDA one)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autoprune.prune
from autoprune.compress import _Session, check_policy
from autoprune.policy import Policy
from autoprune.prune.pfq import _group_variance
from autoprune.prune.structured import dependency_graph, groups_in_graph

SHAPE = (1, 12)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3)).eval()


def test_group_variance_is_built_on_the_bn_statistics_device() -> None:
    model = _model()
    graph = dependency_graph(model, torch.zeros(1, *SHAPE))
    group = groups_in_graph(model, graph)[0]
    root = dict(model.named_modules())[group.name]
    full = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(range(group.channels)))
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    assert _group_variance(graph, full, group.channels).tolist() == [1.0, 0.5, 2.0, 3.0]
    model.to("meta")  # the same modules, now off the CPU
    variance = _group_variance(graph, full, group.channels)
    assert variance is not None and variance.device.type == "meta" and variance.shape == (4,)


def test_prune_again_builds_its_example_input_on_the_session_device(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    policy = Policy.from_dict({"pruner": "pfq", "workflow": "pfq"})
    session = _Session(model, policy, check_policy(model, policy, input_shape=SHAPE), input_shape=SHAPE, task=None)
    session.device = torch.device("meta")
    seen = {}

    def prune_structured(model: nn.Module, *, keep: dict, example_input: torch.Tensor, method: object) -> SimpleNamespace:
        seen["device"] = example_input.device
        return SimpleNamespace(then=[], layers={})

    monkeypatch.setattr(autoprune.prune, "prune_structured", prune_structured)
    session.prune_again()
    assert seen["device"] == torch.device("meta")
