"""The PfQ workflow of seed 003 sec. 3.3 (``workflow: pfq``) on a model with planted dead channels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import autoprune.prune
import autoprune.quant
from autoprune.compress import compress, load_compressed, save_compressed
from autoprune.errors import AutopruneError
from autoprune.models import compressible_layers
from autoprune.policy import LayerPolicy, Policy
from autoprune.specs import shipped
from test_fidelity import SHAPE, tiny_model, tiny_task

DEAD = 2
"""Channel of features.0 whose BN running variance is below eps from the start: the first PfQ removes it."""
FADING = 5
"""Channel of features.3 with a zero filter and a zero gamma: its running variance (1e-4, above eps) decays
by BN's momentum during the first fine-tune (0.9^30 x 1e-4 < 1e-5), so the second PfQ removes it."""


def planted() -> nn.Module:
    model = tiny_model()
    with torch.no_grad():
        model.features[1].running_var[DEAD] = 1e-8
        model.features[1].bias[DEAD] = 0.4
        model.features[3].weight[FADING] = 0.0
        model.features[4].weight[FADING] = 0.0
        model.features[4].running_var[FADING] = 1e-4
        model.features[4].bias[FADING] = 0.3
    return model


def policy(**fields: object) -> Policy:
    # keep_best off: the workflow alone, without the post-training model it would be compared with
    defaults = {"finetune_steps": 60, "batch_size": 32, "calibration_batches": 2, "keep_best": False}
    return Policy(workflow="pfq", pruner="pfq", layers={"_default": LayerPolicy(w_bits=4, a_bits=4)}, **{**defaults, **fields})


def test_both_pfq_steps_remove_dead_channels_and_folding_keeps_the_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    records = []
    folds: list[float] = []
    prune, fold, make = autoprune.prune.prune_structured, autoprune.prune.fold_batchnorm, autoprune.quant.make_weight_quantizer

    def recording_prune(*args: object, **kwargs: object):
        records.append(prune(*args, **kwargs))
        events.append("pfq")
        return records[-1]

    def checked_fold(model: nn.Module) -> nn.Module:
        was_training = model.training
        model.eval()
        x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = model(x)
            fold(model)
            after = model(x)
        model.train(was_training)
        folds.append(float((after - before).abs().max()))
        events.append("fold")
        return model

    def noted_quantizer(*args: object, **kwargs: object):
        events.append("weight quantizer")
        return make(*args, **kwargs)

    monkeypatch.setattr(autoprune.prune, "prune_structured", recording_prune)
    monkeypatch.setattr(autoprune.prune, "fold_batchnorm", checked_fold)
    monkeypatch.setattr(autoprune.quant, "make_weight_quantizer", noted_quantizer)
    result = compress(planted(), policy(), task=tiny_task())

    assert events[:3] == ["pfq", "pfq", "fold"] and set(events[3:]) == {"weight quantizer"}  # weights quantized after folding
    first, second = records
    assert DEAD not in first.layers["features.0"].kept and "features.3" not in first.layers
    assert second.layers["features.3"].kept == [c for c in range(8) if c != FADING]
    assert result.structured.kept_in_base() == {
        "features.0": [c for c in range(8) if c != DEAD], "features.3": [c for c in range(8) if c != FADING],
    }
    layers = compressible_layers(result.model)
    assert layers["features.0"].out_channels == layers["features.3"].out_channels == 7
    # Folding (done before any weight is quantized) changes the outputs only by float rounding.
    assert folds and folds[0] < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    for name in ("features.0", "features.3"):
        assert len(torch.unique(layers[name].weight)) <= 16, name
        assert layers[name].bias is not None  # the folded BN lives on as the conv's bias


def test_workflow_result_saves_and_loads_back(tmp_path: Path) -> None:
    from types import SimpleNamespace

    base = planted()
    task = tiny_task()
    task.spec = SimpleNamespace(dataset="synthetic", model="tiny", key=lambda: "tiny")
    task.build = planted
    result = compress(base, policy(finetune_steps=20), task=task)
    path = save_compressed(result, tmp_path / "m.safetensors", task=task)
    loaded = load_compressed(path, task=task)
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(loaded.model(x), result.model(x))


def test_workflow_needs_the_pfq_pruner_and_no_unstructured_sparsity() -> None:
    with pytest.raises(AutopruneError, match="set pruner to pfq"):
        Policy.from_dict({"workflow": "pfq"})
    with pytest.raises(AutopruneError, match="whole channels only"):
        Policy.from_dict({"workflow": "pfq", "pruner": "pfq", "layers": {"_default": {"w_sparsity": 0.5}}})


def test_data_free_cost_path_folds_like_the_workflow() -> None:
    from autoprune.compress import static_compress

    result = static_compress(planted(), policy(), input_shape=SHAPE)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert DEAD not in result.structured.kept_in_base()["features.0"]
    report = result.cost(SHAPE)
    layers = compressible_layers(result.model)
    assert all(row.params == int(torch.count_nonzero(layers[row.name].weight)) for row in report.layers)


def test_shipped_pfq_space_offers_the_workflow_beside_the_standard_path() -> None:
    from autoprune.search.space import SpaceSpec

    space = SpaceSpec.load(shipped("search_spaces", "pfq")).bind(planted(), input_shape=SHAPE)
    assert space.distributions()["workflow"].choices == ("standard", "pfq")
    params = {name: dim.values()[0] for name, dim in space.dimensions().items()}
    for workflow in ("standard", "pfq"):
        sampled = space.policy({**params, "workflow": workflow}).model_copy(update={"finetune_steps": 10, "batch_size": 32})
        result = compress(planted(), sampled, task=tiny_task())
        assert DEAD not in result.structured.kept_in_base()["features.0"]
        folded = not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
        assert folded == (workflow == "pfq")
