"""The one module that turns specs into distributions and trial parameters into policies."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from autoprune.errors import AutopruneError
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.space import SpaceSpec

REPO = Path(__file__).resolve().parent.parent


def bind(spec: dict, model: str = "digits_cnn", shape: tuple[int, int, int] = (1, 8, 8)):
    return SpaceSpec.from_dict(spec).bind(build_model(model, in_channels=shape[0]), input_shape=shape)


@pytest.mark.parametrize("path", sorted((REPO / "autoprune/specs/search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_sample_valid_policies(path: Path) -> None:
    space = SpaceSpec.load(path).bind(build_model("digits_cnn"), input_shape=(1, 8, 8))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask(space.distributions())
        policy = space.policy(trial.params)
        assert isinstance(policy, Policy)
        assert set(policy.layers) == set(space.layer_names)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("path", sorted((REPO / "autoprune/specs/objectives").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_objectives_load(path: Path) -> None:
    spec = ObjectiveSpec.load(path)
    assert spec.metrics[0] == "accuracy" and len(spec.directions) == len(spec.metrics)


def test_keep_ratio_is_one_parameter_per_residual_group() -> None:
    space = bind({"layers": {"_default": {"keep_ratio": {"low": 0.25, "high": 1.0, "step": 0.25}}}}, "resnet20", (3, 32, 32))
    keep_params = [n for n in space.distributions() if n.endswith("keep_ratio")]
    assert len(keep_params) == len(space.groups)
    # ResNet-20 has 22 conv/linear layers but far fewer groups: the residual stages tie layers together.
    assert len(keep_params) < len(space.layer_names) - 1
    params = {n: 0.5 for n in keep_params}
    policy = space.policy(params)
    for group in space.groups:
        assert {policy.layers[m].keep_ratio for m in group.layers} == {0.5}


def test_every_sampled_parameter_changes_the_policy() -> None:
    space = bind(yaml.safe_load((REPO / "autoprune/specs/search_spaces/default.yaml").read_text()))
    dists = space.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    base = study.ask(dists).params
    for name, dist in dists.items():
        others = [v for v in (dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)) if v != base[name]]
        changed = dict(base, **{name: others[0]})
        assert space.policy(changed) != space.policy(base), name


def test_first_layer_reads_the_input_so_its_activation_bits_are_not_searched() -> None:
    space = bind({"layers": {"_default": {"a_bits": {"low": 2, "high": 8}}}})
    assert "features.0.a_bits" not in space.distributions()
    assert "features.3.a_bits" in space.distributions()


def test_pins_shared_and_fixed_values() -> None:
    space = bind({"shared": {"w_bits": {"choices": [2, 4]}}, "layers": {"features.3": {"a_bits": 6}}, "pin": ["first", "last"]})
    assert set(space.distributions()) == {"all.w_bits"}
    policy = space.policy({"all.w_bits": 2})
    assert policy.layers["features.0"].w_bits == 32 and policy.layers["classifier"].w_bits == 32
    assert policy.layers["features.3"].w_bits == 2 and policy.layers["features.3"].a_bits == 6


def test_pow2_ranges_become_powers_of_two() -> None:
    space = bind({"layers": {"_default": {"w_bits": {"low": 2, "high": 16}}}, "policy": {"pow2_bits": True}})
    assert space.distributions()["features.0.w_bits"].choices == (2, 4, 8, 16)


def test_params_for_clips_a_policy_into_the_space() -> None:
    space = bind({"layers": {"_default": {"w_bits": {"low": 3, "high": 6}}}})
    params = space.params_for(Policy.from_dict({"layers": {"_default": {"w_bits": 8}}}))
    assert set(params.values()) == {6}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"layers": {"conv9": {"w_bits": 4}}}, "'conv9'"),
        ({"layers": {"re:nothing.*": {"w_bits": 4}}}, "matches no layer"),
        ({"layers": {"_default": {"w_bits": {"choices": []}}}}, "non-empty"),
        ({"layers": {"_default": {"w_bits": {"low": 8, "high": 2}}}}, "low=8 > high=2"),
        ({"layers": {"_default": {"w_bits": 40}}}, "40"),
        ({"layers": {"_default": {"keep_ratio": 0}}}, "keep_ratio"),
        ({"layers": {"_default": {"colour": 1}}}, "'colour'"),
        ({"speed": 1}, "'speed'"),
        ({"policy": {"order": {"choices": ["sideways"]}}}, "sideways"),
        ({"pin": ["conv9"]}, "'conv9'"),
    ],
)
def test_bad_specs_name_the_field_and_value(spec: dict, needle: str) -> None:
    with pytest.raises(AutopruneError) as info:
        bind(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"objectives": [{"metric": "speed"}]}, "'speed'"),
        ({"objectives": [{"metric": "bops", "direction": "up"}]}, "direction"),
        ({"objectives": [{"metric": "accuracy"}], "constraints": ["latency <= 3"]}, "latency"),
        ({"objectives": []}, "objectives"),
    ],
)
def test_bad_objectives(spec: dict, needle: str) -> None:
    # A metric name is checked against the task's metric (here: accuracy), before any work.
    with pytest.raises(AutopruneError, match=needle):
        ObjectiveSpec.from_dict(spec).for_metric("accuracy")


def test_constraints_are_violations() -> None:
    spec = ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}], "constraints": ["accuracy_drop <= 1.5", "bops >= 10"]})
    assert spec.violations({"accuracy_drop": 2.0, "bops": 12.0}) == [0.5, -2.0]


def test_narrow_bits_to_prior_keeps_bits_near_the_prior() -> None:
    space = bind({"layers": {"_default": {"w_bits": {"low": 2, "high": 8}}}, "narrow_bits_to_prior": 1})
    space.narrowed_to({"features.0": 4, "features.3": 8})
    dists = space.distributions()
    assert dists["features.0.w_bits"].choices == (3, 4, 5)
    assert dists["features.3.w_bits"].choices == (7, 8)
    assert (dists["features.7.w_bits"].low, dists["features.7.w_bits"].high) == (2, 8)
    off = bind({"layers": {"_default": {"w_bits": {"low": 2, "high": 8}}}})
    off.narrowed_to({"features.0": 4})
    assert off.distributions()["features.0.w_bits"].low == 2


def test_operator_configs_are_fixed_or_chosen_by_label() -> None:
    from autoprune.quant import Delayed, Midrise, Saturated

    space = bind({"policy": {"quantizer": {"choices": ["midrise", {"kind": "delayed", "delay": 50}, {"kind": "saturated", "delay": 50}]}, "pruner": "none"}})
    dist = space.distributions()["quantizer"]
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)
    assert dist.choices == ("midrise", "delayed(delay=50)", "saturated(delay=50)")
    assert space.policy({"quantizer": "delayed(delay=50)"}).quantizer == Delayed(delay=50)
    assert space.policy({"quantizer": "midrise"}).quantizer == Midrise() and space.policy({"quantizer": "midrise"}).pruner.kind == "none"
    assert space.params_for(Policy(quantizer=Saturated(delay=50)))["quantizer"] == "saturated(delay=50)"
    fixed = bind({"policy": {"quantizer": {"kind": "delayed", "delay": 7}}})
    assert "quantizer" not in fixed.distributions() and fixed.policy({}).quantizer == Delayed(delay=7)
    with pytest.raises(AutopruneError, match="'lloyd' is not registered"):
        bind({"policy": {"quantizer": {"choices": ["midrise", "lloyd"]}}})
