from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoprune.errors import AutopruneError
from autoprune.policy import LayerPolicy, Policy


def test_round_trip_json_and_yaml(tmp_path: Path) -> None:
    policy = Policy(
        layers={"_default": LayerPolicy(w_bits=4, a_bits=6), "re:features\\.[03]": LayerPolicy(keep_ratio=0.5), "classifier": LayerPolicy(w_bits=8)},
        order="joint",
        pow2_bits=False,
    )
    for suffix in (".json", ".yaml"):
        path = policy.save(tmp_path / f"p{suffix}")
        assert Policy.load(path) == policy


def test_precedence_exact_then_pattern_then_default() -> None:
    policy = Policy(layers={"_default": LayerPolicy(w_bits=4), "re:a.*": LayerPolicy(w_bits=6), "ab": LayerPolicy(w_bits=8)})
    assert policy.resolve(["ab", "ac", "zz"]) == {"ab": LayerPolicy(w_bits=8), "ac": LayerPolicy(w_bits=6), "zz": LayerPolicy(w_bits=4)}


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"layers": {"x": {"w_bits": 0}}}, "layers.x.w_bits", 0),
        ({"layers": {"x": {"w_bits": 33}}}, "layers.x.w_bits", 33),
        ({"layers": {"x": {"keep_ratio": 0}}}, "layers.x.keep_ratio", 0),
        ({"layers": {"x": {"keep_ratio": 1.5}}}, "layers.x.keep_ratio", 1.5),
        ({"order": "sideways"}, "order", "sideways"),
        ({"layers": {"x": {"colour": 1}}}, "layers.x.colour", "colour"),
    ],
)
def test_invalid_fields_name_field_and_value(data: dict, field: str, value: object) -> None:
    with pytest.raises(AutopruneError) as info:
        Policy.from_dict(data)
    message = str(info.value)
    assert field in message and repr(value) in message and "\n" not in message


def test_unknown_layer_name_is_an_error() -> None:
    with pytest.raises(AutopruneError, match="'conv9'"):
        Policy(layers={"conv9": LayerPolicy(w_bits=4)}).resolve(["conv1", "conv2"])


def test_file_that_is_not_json_or_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(AutopruneError, match="not valid JSON/YAML"):
        Policy.load(bad)
    (tmp_path / "q.yaml").write_text(json.dumps([1, 2]))
    with pytest.raises(AutopruneError, match="mapping"):
        Policy.load(tmp_path / "q.yaml")


def test_operator_fields_take_a_kind_a_mapping_or_a_config_and_serialise_as_mappings(tmp_path: Path) -> None:
    from autoprune.prune import PfQ, SignalNorm
    from autoprune.quant import Delayed, Midrise, SaturatedAct

    assert Policy(quantizer="midrise") == Policy(quantizer={"kind": "midrise"}) == Policy(quantizer=Midrise())
    policy = Policy(quantizer={"kind": "delayed", "delay": 50}, act_quantizer=SaturatedAct(delay=5, quantile=0.99), pruner="pfq")
    assert policy.quantizer == Delayed(delay=50) and policy.quantizer.kind == "delayed"
    assert policy.pruner == PfQ(eps=1e-5) and not policy.pruner.takes_keep_ratios and SignalNorm.takes_keep_ratios
    assert policy.to_dict()["act_quantizer"] == {"kind": "saturated", "delay": 5, "quantile": 0.99}
    for suffix in (".json", ".yaml"):
        assert Policy.load(policy.save(tmp_path / f"p{suffix}")) == policy


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"quantizer": "lloyd"}, "policy.quantizer: 'lloyd' is not registered (registered: midrise, clip_uniform, delayed, saturated"),
        ({"act_quantizer": "midrise"}, "policy.act_quantizer: 'midrise' is not registered"),
        ({"pruner": {"kind": "pfq", "eps": -1}}, "policy.pruner.eps: -1"),
        ({"quantizer": {"kind": "midrise", "delay": 3}}, "policy.quantizer.delay: 'delay' is not a known field"),
        ({"quantizer": {"delay": 3}}, "must be a kind or a mapping with a kind"),
        ({"workflow": "pfq"}, "set pruner to pfq"),
        ({"quant_delay": 5}, "quant_delay"),
    ],
)
def test_bad_operator_configs_are_one_line_errors(data: dict, message: str) -> None:
    with pytest.raises(AutopruneError) as info:
        Policy.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_version_1_policy_is_migrated_on_read(tmp_path: Path, suffix: str) -> None:
    from autoprune.prune import PfQ
    from autoprune.quant import ClipUniformAct, DelayedAct, Saturated

    v1 = {
        "version": 1, "order": "joint", "quantizer": "saturated", "act_quantizer": "delayed", "pruner": "pfq",
        "quant_delay": 7, "saturation_quantile": 0.98, "pfq_eps": 3e-4, "finetune_steps": 20,
        "layers": {"_default": {"w_bits": 4, "a_bits": 6}},
    }
    path = tmp_path / f"v1{suffix}"
    path.write_text(json.dumps(v1) if suffix == ".json" else __import__("yaml").safe_dump(v1))
    policy = Policy.load(path)
    assert policy.version == 3 and policy.order == "joint" and policy.finetune_steps == 20
    assert (policy.distill, policy.warmup, policy.keep_best) == (False, 0.0, False)
    assert policy.quantizer == Saturated(delay=7, quantile=0.98)
    assert policy.act_quantizer == DelayedAct(delay=7)
    assert policy.pruner == PfQ(eps=3e-4)
    assert policy.layers["_default"] == LayerPolicy(w_bits=4, a_bits=6)
    # v1 defaults replay as they did: PfQ's old 1e-6 threshold, delay 0, clip-uniform activations.
    old = Policy.from_dict({"version": 1, "pruner": "pfq", "quantizer": "delayed"})
    assert old.pruner == PfQ(eps=1e-6) and old.quantizer.delay == 0 and old.act_quantizer == ClipUniformAct()
    assert Policy.from_dict(old.to_dict()) == old  # saved again, it is a version 3 file


def test_version_2_policy_replays_without_the_fine_tune_recipe() -> None:
    """Version 2 fine-tuned with plain cross-entropy, a cosine from step 0 and the last step kept: migrated
    with the recipe off, a v2 file replays as it did; a new policy has it on."""
    v2 = Policy.from_dict({"version": 2, "finetune_steps": 30, "warmup": 0.3})
    assert v2.version == 3 and (v2.distill, v2.keep_best) == (False, False) and v2.warmup == 0.3
    assert (Policy().distill, Policy().keep_best, Policy().warmup) == (True, True, 0.1)
    with pytest.raises(AutopruneError, match="version"):
        Policy.from_dict({"version": 4})


def test_pfq_threshold_defaults_to_the_papers_eps() -> None:
    """Issue 10 bug 5: seed 003 uses eps = 1e-5 (was 1e-6)."""
    from autoprune.prune import PfQ

    assert Policy(pruner="pfq").pruner.eps == PfQ().eps == 1e-5
