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
