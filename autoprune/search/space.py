"""Search-space specs: YAML -> validated spec -> (bound to a model) Optuna distributions -> Policy.

This is the one place where a spec becomes distributions and a trial's parameters become a Policy;
the local study and the Ray Tune executor both go through it.

A spec has three blocks (a learned strategy, below, has its own)::

    shared:   {w_bits: {low: 2, high: 8}}          # one parameter for every unpinned layer (uniform)
    layers:                                       # one parameter per matching layer
      _default: {keep_ratio: {low: 0.25, high: 1.0, step: 0.125}, w_bits: {choices: [2, 4, 8]}}
      re:features\\.0: {w_bits: 8}                # fixed values are plain scalars
    pin: [first, last]                            # layers left untouched (float, full width)
    policy:   {order: {choices: [prune_then_quantize, joint]}, finetune_steps: 150}

A dimension is a scalar (fixed), ``{choices: [...]}`` or a range ``{low, high[, step][, log]}``. An operator
field (``quantizer``, ``act_quantizer``, ``pruner``) is fixed to a kind or a config mapping, or chooses among
them (``{choices: [midrise, {kind: delayed, delay: 50}]}``); Optuna sees each choice as its label
(``delayed(delay=50)``), mapped back to the config when a trial becomes a Policy.
Keep ratios are sampled once per group of coupled channels (a residual add or a depthwise conv ties
layers together), under the group's name, so that no sampled parameter is ignored by the pruner.

``strategy: djpq`` (or ``two_stage``) makes each trial a DJPQ run (``search.strategies``): its parameters are
the settings of the ``djpq:`` block (``DJPQConfig`` fields, dimensions as above, Optuna names ``djpq.<field>``),
``policy:`` may only fix fields that the learned policy carries for its replay (``finetune_steps``), and the
layer blocks are not allowed (the run learns bits and widths)::

    strategy: djpq
    djpq: {beta: {low: 1.0e-9, high: 1.0e-5, log: true}, gamma: 1.0e-6, steps: 150, pow2: false}
    policy: {finetune_steps: 150}
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import TypeAdapter
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.operators import OperatorConfig, parse_config
from autoprune.bits import POW2_BITS
from autoprune.policy import LayerPolicy, Policy, check_layer_keys, layer_key, load_mapping, pattern_error
from autoprune.search.strategies import LEARNED, STRATEGY_NAMES, UNSEARCHED, TrialJob, artifact_path, learned_config

LAYER_FIELDS: dict[str, type] = {"keep_ratio": float, "w_bits": int, "a_bits": int, "w_sparsity": float, "f_sparsity": float}
POLICY_FIELDS = set(Policy.model_fields) - {"version", "layers"}
CONFIG_FIELDS = ("quantizer", "act_quantizer", "pruner")
"""Policy fields holding an operator config; the family of each config is named like its field."""
SPEC_KEYS = {"shared", "layers", "pin", "policy", "description", "narrow_bits_to_prior", "strategy", "djpq"}
LEARN_PREFIX = "djpq."


@dataclass(frozen=True)
class Dimension:
    """One searchable (or fixed) value with the rules of its field."""

    field: str
    fixed: Any = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    options: tuple[tuple[str, Any], ...] | None = None
    """For operator configs: (label, config) per choice; ``choices`` then holds the labels."""

    @property
    def is_fixed(self) -> bool:
        return self.choices is None and self.low is None

    def value_of(self, param: Any) -> Any:
        """The policy value of an Optuna parameter (a config for a label)."""
        return dict(self.options)[param] if self.options is not None else param

    def param_of(self, value: Any) -> Any:
        """The Optuna parameter of a policy value (the label of a config)."""
        if self.options is None:
            return value
        return next((label for label, config in self.options if config == value), value.label() if isinstance(value, OperatorConfig) else value)

    def distribution(self) -> BaseDistribution:
        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)  # type: ignore[arg-type]
        return FloatDistribution(float(self.low), float(self.high), step=self.step, log=self.log)  # type: ignore[arg-type]

    def values(self) -> list[Any]:
        """Every value a finite dimension can take (for clipping priors into the space)."""
        if self.is_fixed:
            return [self.fixed]
        if self.choices is not None:
            return list(self.choices)
        if self.integer:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))  # type: ignore[arg-type]
        if self.step:
            n = int(round((self.high - self.low) / self.step))  # type: ignore[operator]
            return [round(self.low + i * self.step, 10) for i in range(n + 1)]  # type: ignore[operator]
        return [self.low, self.high]

    def clip(self, value: Any) -> Any:
        """The allowed value nearest to ``value`` (continuous ranges clamp)."""
        if self.is_fixed:
            return self.fixed
        if self.choices is None and not self.integer and not self.step:
            return min(max(float(value), float(self.low)), float(self.high))  # type: ignore[arg-type]
        options = self.values()
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in options):
            return min(options, key=lambda v: (abs(float(v) - float(value)), v))
        return value if value in options else options[0]

    def narrowed(self, center: int, width: int) -> "Dimension":
        """Bits within +-width of a prior (the spec option ``narrow_bits_to_prior``)."""
        kept = [v for v in self.values() if abs(int(v) - center) <= width] or [self.clip(center)]
        if len(kept) == 1:
            return Dimension(self.field, fixed=kept[0], integer=self.integer)
        return Dimension(self.field, choices=tuple(kept), integer=self.integer)


def parse_dimension(raw: Any, *, field: str, where: str, kind: type, pow2: bool = False, owner: type = Policy) -> Dimension:
    """``owner``: the pydantic model whose field types check a value that is not a layer field."""
    path = f"{where}.{field}"
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"choices", "low", "high", "step", "log"}
        if unknown:
            raise AutopruneError(path, sorted(unknown)[0], "is not a dimension key (use choices, or low/high/step/log)")
        if "choices" in raw:
            if set(raw) != {"choices"}:
                raise AutopruneError(path, dict(raw), "mixes choices with a range")
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices:
                raise AutopruneError(f"{path}.choices", choices, "must be a non-empty list")
            values = tuple(_check_value(v, field=field, path=f"{path}.choices", kind=kind, owner=owner) for v in choices)
            if pow2 and field in ("w_bits", "a_bits"):
                _check_pow2(values, path)
            return Dimension(field, choices=values, integer=kind is int)
        if "low" not in raw or "high" not in raw:
            raise AutopruneError(path, dict(raw), "needs both low and high")
        low = _check_value(raw["low"], field=field, path=f"{path}.low", kind=kind, owner=owner)
        high = _check_value(raw["high"], field=field, path=f"{path}.high", kind=kind, owner=owner)
        if low > high:
            raise AutopruneError(path, f"low={low} > high={high}", "is an empty range")
        step, log = raw.get("step"), raw.get("log", False)
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0):
            raise AutopruneError(f"{path}.step", step, "must be a positive number")
        if step is not None and kind is int and step != int(step):
            raise AutopruneError(f"{path}.step", step, f"must be a whole number: {field} takes whole values")
        if not isinstance(log, bool):
            raise AutopruneError(f"{path}.log", log, "must be true or false")
        if log and step not in (None, 1):
            raise AutopruneError(f"{path}.step", step, "cannot go with log: true (a log-scaled range has no step)")
        if log and low <= 0:
            raise AutopruneError(f"{path}.low", low, "must be above 0 with log: true")
        if pow2 and field in ("w_bits", "a_bits"):
            return Dimension(field, choices=tuple(b for b in POW2_BITS if low <= b <= high) or (low,), integer=True)
        if low == high:
            return Dimension(field, fixed=low, integer=kind is int)
        return Dimension(field, low=low, high=high, step=step, log=log, integer=kind is int)
    value = _check_value(raw, field=field, path=path, kind=kind, owner=owner)
    if pow2 and field in ("w_bits", "a_bits"):
        _check_pow2((value,), path)
    return Dimension(field, fixed=value, integer=kind is int)


def parse_config_dimension(raw: Any, *, field: str, where: str) -> Dimension:
    """An operator field: one config (a kind or a mapping with ``kind``) or ``{choices: [...]}`` of them."""
    path = f"{where}.{field}"
    if isinstance(raw, Mapping) and "choices" in raw:
        if set(raw) != {"choices"}:
            raise AutopruneError(path, dict(raw), "mixes choices with config fields")
        if not isinstance(raw["choices"], list) or not raw["choices"]:
            raise AutopruneError(f"{path}.choices", raw["choices"], "must be a non-empty list")
        configs = [_config_at(choice, field=field, path=f"{path}.choices") for choice in raw["choices"]]
        labels = [config.label() for config in configs]
        if len(set(labels)) != len(labels):
            raise AutopruneError(f"{path}.choices", labels, "name the same config twice")
        if len(configs) == 1:
            return Dimension(field, fixed=configs[0])
        return Dimension(field, choices=tuple(labels), options=tuple(zip(labels, configs)))
    return Dimension(field, fixed=_config_at(raw, field=field, path=path))


def _config_at(raw: Any, *, field: str, path: str) -> OperatorConfig:
    try:
        return parse_config(field, raw)
    except AutopruneError as exc:
        raise AutopruneError(path, exc.value, f"{exc.rule} ({exc.field})") from None


def _check_value(value: Any, *, field: str, path: str, kind: type, owner: type = Policy) -> Any:
    if field in LAYER_FIELDS and owner is Policy:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AutopruneError(path, value, "must be a number")
        try:
            LayerPolicy(**{field: value})
        except Exception:
            rule = {"keep_ratio": "must be in (0, 1]", "w_bits": "must be in 1..32", "a_bits": "must be in 1..32"}.get(field, "must be in [0, 1)")
            raise AutopruneError(path, value, rule) from None
        return int(value) if kind is int else float(value)
    info = owner.model_fields[field]
    try:
        # The field's own type and bounds; rules across fields (workflow pfq needs pruner pfq) are the Policy's.
        TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation).validate_python(value)
    except Exception as exc:
        msg = str(exc).splitlines()
        raise AutopruneError(path, value, f"is not a valid {field} ({msg[2].strip() if len(msg) > 2 else msg[0]})") from None
    return value


def _check_pow2(values: Sequence[Any], path: str) -> None:
    for v in values:
        if v not in POW2_BITS:
            raise AutopruneError(path, v, f"is not a power-of-two bit-width {POW2_BITS} while pow2_bits is on")


@dataclass(frozen=True)
class SpaceSpec:
    """A validated spec, not yet bound to a model."""

    shared: dict[str, Dimension]
    layers: dict[str, dict[str, Dimension]]
    pin: tuple[str, ...]
    policy: dict[str, Dimension]
    narrow_bits_to_prior: int | None
    raw: dict[str, Any]
    strategy: str = "sampled"
    learn: dict[str, Dimension] | None = None
    """A learned strategy's settings (the ``djpq:`` block) by DJPQConfig field."""

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "space") -> "SpaceSpec":
        if not isinstance(data, Mapping):
            raise AutopruneError(source, type(data).__name__, "must be a mapping with shared/layers/pin/policy blocks")
        for key in data:
            if key not in SPEC_KEYS:
                raise AutopruneError(source, key, f"is not a spec key (keys: {', '.join(sorted(SPEC_KEYS))})")
        policy_raw = data.get("policy") or {}
        if not isinstance(policy_raw, Mapping):
            raise AutopruneError(f"{source}.policy", policy_raw, "must be a mapping")
        policy: dict[str, Dimension] = {}
        for name, raw in policy_raw.items():
            if name not in POLICY_FIELDS:
                raise AutopruneError(f"{source}.policy", name, f"is not a policy field (fields: {', '.join(sorted(POLICY_FIELDS))})")
            if name in CONFIG_FIELDS:
                policy[name] = parse_config_dimension(raw, field=name, where=f"{source}.policy")
                continue
            kind = type(Policy.model_fields[name].default)
            policy[name] = parse_dimension(raw, field=name, where=f"{source}.policy", kind=kind)
        pow2_dim = policy.get("pow2_bits")
        pow2 = bool(pow2_dim is not None and pow2_dim.is_fixed and pow2_dim.fixed)
        shared = _parse_layer_block(data.get("shared") or {}, where=f"{source}.shared", pow2=pow2)
        layers_raw = data.get("layers") or {}
        if not isinstance(layers_raw, Mapping):
            raise AutopruneError(f"{source}.layers", layers_raw, "must be a mapping of layer keys")
        layers = {}
        for key, block in layers_raw.items():
            problem = pattern_error(key)
            if problem is not None:
                raise AutopruneError(f"{source}.layers", key, f"is not a regular expression ({problem})")
            layers[key] = _parse_layer_block(block or {}, where=f"{source}.layers[{key!r}]", pow2=pow2)
        overlap = set(shared) & {f for block in layers.values() for f in block}
        if overlap:
            raise AutopruneError(f"{source}.shared", sorted(overlap)[0], "is set both in shared and in layers")
        pin = data.get("pin") or []
        if not isinstance(pin, list) or not all(isinstance(p, str) for p in pin):
            raise AutopruneError(f"{source}.pin", pin, "must be a list of layer names, 'first' or 'last'")
        narrow = data.get("narrow_bits_to_prior")
        if narrow is not None and (isinstance(narrow, bool) or not isinstance(narrow, int) or narrow < 0):
            raise AutopruneError(f"{source}.narrow_bits_to_prior", narrow, "must be a bit distance >= 0 (or absent: off)")
        strategy = data.get("strategy", "sampled")
        if strategy not in STRATEGY_NAMES:
            raise AutopruneError(f"{source}.strategy", strategy, f"is not a strategy ({', '.join(STRATEGY_NAMES)})")
        learn = _parse_learn_block(data, policy, source=source) if strategy in LEARNED else None
        if learn is None and "djpq" in data:
            raise AutopruneError(f"{source}.djpq", "djpq", "configures a learned strategy: add strategy: djpq or two_stage")
        return cls(shared, layers, tuple(pin), policy, narrow, dict(data), strategy, learn)

    @classmethod
    def load(cls, path: str | Path) -> "SpaceSpec":
        return cls.from_dict(load_mapping(path), source=str(path))

    def bind(self, model: nn.Module, *, input_shape: tuple[int, int, int]) -> "SearchSpace":
        return SearchSpace(self, model, input_shape=input_shape)


def _parse_learn_block(data: Mapping[str, Any], policy: Mapping[str, Dimension], *, source: str) -> dict[str, Dimension]:
    """The ``djpq:`` block of a learned strategy; what the run learns itself cannot be sampled beside it."""
    from autoprune.djpq import DJPQConfig

    for key in ("shared", "layers", "pin", "narrow_bits_to_prior"):
        if data.get(key):
            raise AutopruneError(f"{source}.{key}", key, f"is not used by strategy {data['strategy']} (it learns bits and widths)")
    for name, dim in policy.items():
        if not dim.is_fixed:
            raise AutopruneError(f"{source}.policy.{name}", "choices", f"cannot be sampled by strategy {data['strategy']} (fix it for the replay)")
    block = data.get("djpq") or {}
    if not isinstance(block, Mapping):
        raise AutopruneError(f"{source}.djpq", block, "must be a mapping of DJPQ settings")
    fields = [f for f in DJPQConfig.model_fields if f not in UNSEARCHED]
    dims = {}
    for name, raw in block.items():
        if name not in fields:
            raise AutopruneError(f"{source}.djpq", name, f"is not a DJPQ setting (settings: {', '.join(fields)})")
        kind = type(DJPQConfig.model_fields[name].default)
        dims[name] = parse_dimension(raw, field=name, where=f"{source}.djpq", kind=kind, owner=DJPQConfig)
    return dims


def _parse_layer_block(block: Any, *, where: str, pow2: bool) -> dict[str, Dimension]:
    if not isinstance(block, Mapping):
        raise AutopruneError(where, block, "must be a mapping of layer fields")
    dims = {}
    for name, raw in block.items():
        if name not in LAYER_FIELDS:
            raise AutopruneError(where, name, f"is not a layer field (fields: {', '.join(LAYER_FIELDS)})")
        dims[name] = parse_dimension(raw, field=name, where=where, kind=LAYER_FIELDS[name], pow2=pow2)
    return dims


class SearchSpace:
    """A spec bound to a model's layer names and channel groups."""

    def __init__(self, spec: SpaceSpec, model: nn.Module, *, input_shape: tuple[int, int, int]) -> None:
        import torch

        from autoprune.models import compressible_layers, input_readers
        from autoprune.prune import searched_groups

        self.spec = spec
        self.layer_names = list(compressible_layers(model))
        self.pinned = self._resolve_pins()
        check_layer_keys(self.spec.layers, self.layer_names, field="space.layers")
        example = torch.zeros(1, *input_shape)
        self.groups = searched_groups(model, example_input=example)
        # A layer reading the network input gets the policy's input_bits: its a_bits and f_sparsity would
        # be parameters that change nothing, so they are not searched.
        self.input_readers = input_readers(model, input_shape=input_shape)
        self.layer_dims: dict[str, dict[str, Dimension]] = {
            n: {f: d for f, d in self._dims_for(n).items() if not (n in self.input_readers and f in ("a_bits", "f_sparsity"))}
            for n in self.layer_names
        }
        self._group_of = {layer: g for g in self.groups for layer in g.layers}

    def _resolve_pins(self) -> set[str]:
        pinned = set()
        for p in self.spec.pin:
            if p == "first":
                pinned.add(self.layer_names[0])
            elif p == "last":
                pinned.add(self.layer_names[-1])
            elif p in self.layer_names:
                pinned.add(p)
            else:
                raise AutopruneError("space.pin", p, f"is not a layer of the model (layers: {', '.join(self.layer_names)})")
        return pinned

    def _dims_for(self, name: str) -> dict[str, Dimension]:
        if name in self.pinned:
            return {}
        key = layer_key(self.spec.layers, name)
        return {**self.spec.shared, **(self.spec.layers[key] if key is not None else {})}

    def param_name(self, layer: str, field: str) -> str | None:
        """The Optuna parameter behind a layer's field, or None when it is fixed."""
        if field == "keep_ratio":
            group = self._group_of.get(layer)
            if group is None or any(m in self.pinned for m in group.layers):
                return None
            dim = self.layer_dims[group.layers[0]].get("keep_ratio") or self.layer_dims[layer].get("keep_ratio")
            if dim is None or dim.is_fixed:
                return None
            return "all.keep_ratio" if "keep_ratio" in self.spec.shared else f"group:{group.name}.keep_ratio"
        dim = self.layer_dims[layer].get(field)
        if dim is None or dim.is_fixed:
            return None
        return f"all.{field}" if field in self.spec.shared else f"{layer}.{field}"

    def _keep_dim(self, layer: str) -> Dimension | None:
        group = self._group_of.get(layer)
        if group is None or any(m in self.pinned for m in group.layers):
            return None
        return self.layer_dims[group.layers[0]].get("keep_ratio") or self.layer_dims[layer].get("keep_ratio")

    @property
    def learned(self) -> bool:
        """Whether trials learn their policy (DJPQ) instead of sampling it: no priors, no policy parameters."""
        return self.spec.learn is not None

    def job(self, params: Mapping[str, Any], *, seed: int, study_name: str) -> TrialJob:
        """What a trial with these parameters runs: its policy, or a learned strategy's run config (``seed``)
        and a fresh file for the model it learns."""
        if self.spec.learn is None:
            return TrialJob(policy=self.policy(params).to_dict())
        values = {f: (d.fixed if d.is_fixed else params[LEARN_PREFIX + f]) for f, d in self.spec.learn.items()}
        replay = {f: self.spec.raw["policy"][f] for f in self.spec.policy}
        return TrialJob(
            strategy=self.spec.strategy, learn=learned_config(values, seed=seed), artifact=str(artifact_path(study_name)), replay=replay or None  # type: ignore[arg-type]
        )

    def dimensions(self) -> dict[str, Dimension]:
        """Every searched parameter by its Optuna name (fixed values are not parameters)."""
        if self.spec.learn is not None:
            return {LEARN_PREFIX + f: d for f, d in self.spec.learn.items() if not d.is_fixed}
        dims: dict[str, Dimension] = {}
        for layer in self.layer_names:
            for field in LAYER_FIELDS:
                name = self.param_name(layer, field)
                if name is not None:
                    dims[name] = self._keep_dim(layer) if field == "keep_ratio" else self.layer_dims[layer][field]  # type: ignore[assignment]
        for field, dim in self.spec.policy.items():
            if not dim.is_fixed:
                dims[field] = dim
        return dims

    def distributions(self) -> dict[str, BaseDistribution]:
        return {name: dim.distribution() for name, dim in self.dimensions().items()}

    def policy(self, params: Mapping[str, Any]) -> Policy:
        """The Policy a trial's parameters describe: every layer explicit, by exact name."""
        layers: dict[str, LayerPolicy] = {}
        for layer in self.layer_names:
            values: dict[str, Any] = {}
            for field in LAYER_FIELDS:
                name = self.param_name(layer, field)
                if name is not None:
                    values[field] = params[name]
                    continue
                dim = self._keep_dim(layer) if field == "keep_ratio" else self.layer_dims[layer].get(field)
                if dim is not None and dim.is_fixed:
                    values[field] = dim.fixed
            layers[layer] = LayerPolicy(**values)
        globals_ = {f: (d.value_of(params[f]) if not d.is_fixed else d.fixed) for f, d in self.spec.policy.items()}
        return Policy(layers=layers, **globals_)

    def params_for(self, policy: Policy) -> dict[str, Any]:
        """Parameters that reproduce ``policy`` as closely as the space allows (priors are clipped)."""
        resolved = policy.resolve(self.layer_names)
        params: dict[str, Any] = {}
        dims = self.dimensions()
        for layer in self.layer_names:
            for field in LAYER_FIELDS:
                name = self.param_name(layer, field)
                if name is not None and name not in params:
                    params[name] = dims[name].clip(getattr(resolved[layer], field))
        for field, dim in self.spec.policy.items():
            if not dim.is_fixed:
                params[field] = dim.clip(dim.param_of(getattr(policy, field)))
        return params

    def narrowed_to(self, prior_bits: Mapping[str, int]) -> "SearchSpace":
        """Per-layer weight-bit ranges narrowed around a prior (spec option narrow_bits_to_prior)."""
        width = self.spec.narrow_bits_to_prior
        if width is None:
            return self
        for layer, bits in prior_bits.items():
            dim = self.layer_dims.get(layer, {}).get("w_bits")
            if dim is not None and not dim.is_fixed and "w_bits" not in self.spec.shared:
                self.layer_dims[layer]["w_bits"] = dim.narrowed(bits, width)
        return self

