"""A compression policy is data: per-layer settings keyed by module name, plus global choices.

Layer keys are an exact module name, a ``re:`` pattern (full match) or ``_default``. For a given
layer the exact name wins, then the first matching pattern in file order, then ``_default``, then
"leave the layer alone". Bits of 32 mean "not quantized".

``a_bits`` and ``f_sparsity`` describe the activations a layer *reads* (its input features): they are
quantized / sparsified right before the layer, which works for any graph (residual adds included).
A layer that reads the network input uses ``input_bits`` instead (DJPQ B.3: 8 bits by default).

Operator settings are typed configs (``autoprune.operators``): ``quantizer`` (weights), ``act_quantizer``
and ``pruner`` each take a config, its bare kind or a mapping with a kind. Version 1 files, whose operators
were bare names beside the flat ``quant_delay`` / ``saturation_quantile`` / ``pfq_eps``, are migrated on read
(``migrate_v1``) and replay as they did.

The fine-tune follows one recipe (version 3): distillation from the float base model (soft targets at a
temperature beside the task's loss) when the task's outputs are class logits, a learning rate that warms up
then follows a cosine, the checkpoint with the best validation metric once every transform has reached its
final form, and never a model worse on validation than the policy's own post-training result. Version 2
files, fine-tuned without any of these, are migrated with the recipe off (``migrate_v2``) and replay as they did.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Mapping, Sequence, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from autoprune.bits import FLOAT_BITS
from autoprune.errors import AutopruneError
from autoprune.files import write_atomic
from autoprune.operators import (
    ACT_QUANTIZER, PRUNER, WEIGHT_QUANTIZER, ActQuantizerConfig, ClipUniformAct, Midrise, PfQ, PrunerConfig, SignalNorm,
    WeightQuantizerConfig, parse_config,
)

POLICY_VERSION = 3
V1_PFQ_EPS = 1e-6
"""Version 1's default PfQ threshold: a migrated v1 file keeps it so that it replays as it did."""
Order = Literal["prune_then_quantize", "quantize_then_prune", "joint"]
ORDERS: tuple[str, ...] = get_args(Order)
DEFAULT_KEY = "_default"
PATTERN_PREFIX = "re:"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerPolicy(_Frozen):
    keep_ratio: float = Field(1.0, gt=0.0, le=1.0, description="fraction of output channels kept")
    w_bits: int = Field(FLOAT_BITS, ge=1, le=FLOAT_BITS, description="weight bits (32 = float)")
    a_bits: int = Field(FLOAT_BITS, ge=1, le=FLOAT_BITS, description="bits of the input activations")
    w_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="unstructured weight sparsity target")
    f_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="input feature sparsity target")

    def summary(self, *, a_bits: int | None = None) -> str:
        """``k0.5W4A8``; ``a_bits``: the activation bits applied when they differ from the policy's (the layer
        reading the network input gets ``input_bits``)."""
        a_bits = self.a_bits if a_bits is None else a_bits
        parts = []
        if self.keep_ratio < 1.0:
            parts.append(f"k{self.keep_ratio:.2g}")
        parts.append(f"W{self.w_bits if self.w_bits < FLOAT_BITS else 'f'}")
        parts.append(f"A{a_bits if a_bits < FLOAT_BITS else 'f'}")
        if self.w_sparsity > 0:
            parts.append(f"sw{self.w_sparsity:.2g}")
        if self.f_sparsity > 0:
            parts.append(f"sf{self.f_sparsity:.2g}")
        return "".join(parts)


UNTOUCHED = LayerPolicy()


class Policy(_Frozen):
    version: int = POLICY_VERSION
    layers: dict[str, LayerPolicy] = Field(default_factory=dict)
    order: Order = "prune_then_quantize"
    input_bits: int = Field(8, ge=1, le=FLOAT_BITS)
    pow2_bits: bool = Field(False, description="round every bit-width to a power of two (seed 002 Alg. 2)")
    workflow: Literal["standard", "pfq"] = Field("standard", description="pfq: the five steps of seed 003 sec. 3.3")
    quantizer: SerializeAsAny[WeightQuantizerConfig] = Field(default_factory=Midrise)
    act_quantizer: SerializeAsAny[ActQuantizerConfig] = Field(default_factory=ClipUniformAct)
    pruner: SerializeAsAny[PrunerConfig] = Field(default_factory=SignalNorm)
    finetune_steps: int = Field(150, ge=0, le=1_000_000)
    finetune_lr: float = Field(0.01, gt=0.0, le=10.0)
    batch_size: int = Field(64, ge=1)
    sparsity_start: int = Field(0, ge=0, description="step of the first sparsification (seed 004 eq. 3)")
    sparsity_interval: int = Field(10, ge=1, description="steps between sparsification updates")
    sparsity_updates: int = Field(5, ge=1, description="number of sparsification updates (eq. 4)")
    feature_window: int = Field(16, ge=1, description="sliding window of feature pruning (eq. 8)")
    bn_recalibration: bool = True
    calibration_batches: int = Field(8, ge=1)
    seed: int = 0
    distill: bool = Field(True, description="distil from the float base model when the task's outputs are class logits (or the task gives its own distillation loss)")
    distill_temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature T of the soft targets")
    distill_weight: float = Field(0.5, ge=0.0, le=1.0, description="share of T^2 KL(teacher || student) in the loss; the task's loss has the rest")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="share of the fine-tune steps the learning rate rises over before its cosine")
    keep_best: bool = Field(True, description="keep the best-validation checkpoint, or the post-training model when it is better")
    evaluations: int = Field(4, ge=1, le=1000, description="validation checks of keep_best, spread over the steps where every transform is final")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("version") == 1:
            data = migrate_v1(data)
        if isinstance(data, Mapping) and data.get("version") == 2:
            data = migrate_v2(data)
        return data

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != POLICY_VERSION:
            raise ValueError(f"must be {POLICY_VERSION} (or 1 or 2, migrated on read)")
        return version

    @field_validator("quantizer", mode="before")
    @classmethod
    def _weight_quantizer(cls, value: Any) -> WeightQuantizerConfig:
        return parse_config(WEIGHT_QUANTIZER, value)  # type: ignore[return-value]

    @field_validator("act_quantizer", mode="before")
    @classmethod
    def _act_quantizer(cls, value: Any) -> ActQuantizerConfig:
        return parse_config(ACT_QUANTIZER, value)  # type: ignore[return-value]

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner(cls, value: Any) -> PrunerConfig:
        return parse_config(PRUNER, value)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _workflow_has_its_pruner(self) -> "Policy":
        if self.workflow == "pfq" and not isinstance(self.pruner, PfQ):
            raise ValueError(f"workflow 'pfq' prunes with PfQ: set pruner to pfq (not {self.pruner.kind!r})")
        if self.workflow == "pfq":
            sparse = next((k for k, lp in self.layers.items() if lp.w_sparsity > 0 or lp.f_sparsity > 0), None)
            if sparse is not None:
                raise ValueError(f"workflow 'pfq' prunes whole channels only: layers[{sparse!r}] asks for weight or feature sparsity")
        return self

    @field_validator("layers")
    @classmethod
    def _valid_keys(cls, layers: dict[str, LayerPolicy]) -> dict[str, LayerPolicy]:
        for key in layers:
            problem = pattern_error(key)
            if problem is not None:
                raise ValueError(f"layer pattern {key!r} is not a regular expression ({problem})")
        return layers

    def for_layer(self, name: str) -> LayerPolicy:
        key = layer_key(self.layers, name)
        return UNTOUCHED if key is None else self.layers[key]

    def resolve(self, layer_names: list[str]) -> dict[str, LayerPolicy]:
        """Per-layer settings for a model's layers; a key naming no layer of the model is an error."""
        check_layer_keys(self.layers, layer_names, field="policy.layers")
        return {name: self.for_layer(name) for name in layer_names}

    def summary(self, layer_names: list[str] | None = None, *, applied: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """One line: order and each layer's settings (or each key's, without a model). ``applied``: a trial's
        recorded layers, whose ``a_bits_applied`` shows the bits the layer reading the input really got."""
        head = {"prune_then_quantize": "P>Q", "quantize_then_prune": "Q>P", "joint": "P+Q"}[self.order]
        if self.workflow == "pfq":
            head = "PfQ-workflow"
        if layer_names is None:
            items = [(k, v) for k, v in self.layers.items()]
        else:
            items = list(self.resolve(layer_names).items())
        applied = applied or {}
        body = " ".join(f"{k}:{v.summary(a_bits=applied.get(k, {}).get('a_bits_applied'))}" for k, v in items)
        return f"{head} {body}".strip()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "policy") -> "Policy":
        return parse_model(cls, data, source=source, shape="a mapping of policy fields")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        return cls.from_dict(load_mapping(path), source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write JSON or YAML by suffix, atomically (a half-written policy file never exists)."""
        path = Path(path)
        text = self.to_yaml() if path.suffix.lower() in (".yaml", ".yml") else self.to_json()
        write_atomic(path, text)
        return path




# --- layer keys, shared by policies and search spaces ------------------------------------------------


def pattern_error(key: str) -> str | None:
    """Why a ``re:`` key is not a regular expression; None for a valid pattern or any other key."""
    if not key.startswith(PATTERN_PREFIX):
        return None
    try:
        re.compile(key[len(PATTERN_PREFIX):])
    except re.error as exc:
        return str(exc)
    return None


def _matches(key: str, name: str) -> bool:
    return key.startswith(PATTERN_PREFIX) and re.fullmatch(key[len(PATTERN_PREFIX):], name) is not None


def layer_key(keys: Collection[str], name: str) -> str | None:
    """The key that governs layer ``name``: its exact name, else the first pattern (in file order) that
    fully matches it, else ``_default``; None when no key does (the layer is left alone)."""
    if name in keys:
        return name
    return next((key for key in keys if _matches(key, name)), DEFAULT_KEY if DEFAULT_KEY in keys else None)


def check_layer_keys(keys: Iterable[str], layer_names: Sequence[str], *, field: str) -> None:
    """Every key but ``_default`` names a layer of the model or, as a pattern, matches one."""
    listing = ", ".join(layer_names)
    for key in keys:
        if key == DEFAULT_KEY:
            continue
        if key.startswith(PATTERN_PREFIX):
            if not any(_matches(key, n) for n in layer_names):
                raise AutopruneError(field, key, f"matches no layer (layers: {listing})")
        elif key not in layer_names:
            raise AutopruneError(field, key, f"is not a layer of the model (layers: {listing})")


def migrate_v2(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version 2 policy mapping in version 3's shape: it was fine-tuned without the recipe (no
    distillation, no warmup, the last step kept), so it replays with the recipe off."""
    return {"distill": False, "warmup": 0.0, "keep_best": False, **data, "version": 3}


def migrate_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version 1 policy mapping in version 2's shape: operator names become configs carrying the flat
    ``quant_delay`` / ``saturation_quantile`` / ``pfq_eps`` that concerned them (a missing ``pfq_eps`` is v1's
    default 1e-6); fields no operator reads are dropped."""
    new = {k: v for k, v in data.items() if k not in ("quant_delay", "saturation_quantile", "pfq_eps")}
    new["version"] = 2
    delay = data.get("quant_delay", 0)
    quantile = data.get("saturation_quantile", 0.999)
    for field, default in (("quantizer", "midrise"), ("act_quantizer", "clip_uniform")):
        kind = data.get(field, default)
        if not isinstance(kind, str):
            continue
        config: dict[str, Any] = {"kind": kind}
        if kind in ("delayed", "saturated"):
            config["delay"] = delay
        if kind == "saturated":
            config["quantile"] = quantile
        new[field] = config
    pruner = data.get("pruner", "signal_norm")
    if isinstance(pruner, str):
        new["pruner"] = {"kind": pruner, "eps": data.get("pfq_eps", V1_PFQ_EPS)} if pruner == "pfq" else {"kind": pruner}
    return new


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_model(cls: type[ModelT], data: Any, *, source: str, shape: str) -> ModelT:
    """Validate a mapping read from a file into ``cls``; any failure is one AutopruneError line."""
    if not isinstance(data, Mapping):
        raise AutopruneError(source, type(data).__name__, f"must be {shape}")
    check_size(data, field=source, value=type(data).__name__)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise validation_error(exc, source) from None


def validation_error(exc: ValidationError, source: str) -> AutopruneError:
    """The first pydantic error as one line: the dotted field, the bad value, the rule."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ()))
    value = err.get("input")
    rule = err.get("msg", "is invalid")
    if err.get("type") == "extra_forbidden":
        rule = "is not a known field"
        value = field.rsplit(".", 1)[-1]
    return AutopruneError(f"{source}: {field}" if field else source, value, rule.replace("Value error, ", ""))


# A spec or policy file holds at most this many values once YAML's aliases are expanded: an alias bomb
# (a few lines whose anchors repeat each other) would otherwise expand to gigabytes when shown or stored.
MAX_VALUES = 100_000


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"the key {key!r} appears twice in one mapping (line {line})")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently).
    Keys a merge (``<<: *anchor``) brings in may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the safe constructor refuses it below
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key!r} appears twice in one object")
        found[key] = value
    return found


def check_size(data: Any, *, field: str, value: Any) -> None:
    """Refuse data of more than MAX_VALUES values counted as if every shared or repeated part were
    written out (what a YAML alias bomb, or a structure holding itself, expands to)."""
    count = 0
    stack = [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise AutopruneError(field, value, f"expands to more than {MAX_VALUES:,} values (YAML aliases that repeat each other?): refused")
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def load_mapping(path: str | Path) -> Any:
    """Read a JSON or YAML file; anything unreadable is an AutopruneError naming the file. A key given twice
    in one mapping and an alias bomb are refused rather than read as the last one or expanded."""
    path = Path(path)
    if not path.is_file():
        raise AutopruneError("file", str(path), "does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError, as is a duplicate key
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutopruneError("file", str(path), f"is not valid JSON/YAML ({first})") from None
    check_size(data, field="file", value=str(path))
    return data
