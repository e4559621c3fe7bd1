"""compress(base_model, policy, task): apply a Policy in the order it names, with fine-tuning or PTQ.

The schedule of ``finetune_steps`` (T) steps introduces the two families of transforms at the step
their ``order`` gives (seed 004 sec. 4.1):

- ``prune_then_quantize``: pruning (structured at once, unstructured along its schedule) from step 0,
  quantization from step T/2;
- ``quantize_then_prune``: quantization from step 0, pruning from step T/2;
- ``joint``: both from step 0.

With T = 0 this is post-training compression: the order then decides whether the quantization
step sizes are computed before pruning (``quantize_then_prune``) or after it. Either way the model
ends with BatchNorm statistics re-estimated on unlabeled training data (seed 000 sec. 3) and its
weights baked to their quantized values, which are what the cost model reads.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from autoprune.errors import AutopruneError
from autoprune.models import check_supported, compressible_layers, input_readers
from autoprune.policy import FLOAT_BITS, LayerPolicy, Policy, write_atomic


@dataclass
class CompressionResult:
    """The compressed model and what was done to it, keyed by layer name."""

    model: nn.Module
    policy: Policy
    layers: dict[str, LayerPolicy]
    weight_steps: dict[str, float] = field(default_factory=dict)
    act_bits: dict[str, int] = field(default_factory=dict)
    structured: Any = None
    seconds: float = 0.0

    def cost_layers(self) -> dict[str, Any]:
        from autoprune.cost import LayerQuant

        return {
            name: LayerQuant(
                w_bits=lp.w_bits,
                a_bits=self.act_bits.get(name, FLOAT_BITS),
                f_sparsity=lp.f_sparsity,
                delta=self.weight_steps.get(name),
            )
            for name, lp in self.layers.items()
        }

    def cost(self, input_shape: tuple[int, ...]) -> Any:
        from autoprune.cost import measure_cost

        # The cost model reads weights and shapes only: a CPU copy of a model on a GPU gives the same numbers.
        model = self.model if _on_cpu(self.model) else copy.deepcopy(self.model).cpu()
        return measure_cost(model, input_shape=input_shape, layers=self.cost_layers(), input_bits=input_bits_of(self.policy))

    def summary(self) -> dict[str, Any]:
        layers = compressible_layers(self.model)
        return {
            name: {
                **lp.model_dump(),
                "delta": self.weight_steps.get(name),
                "a_bits_applied": self.act_bits.get(name, FLOAT_BITS),
                "out_channels": _out_channels(layers[name]),
                "zero_fraction": float((layers[name].weight == 0).float().mean()),
            }
            for name, lp in self.layers.items()
        }


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in model.state_dict().values())


def _out_channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def input_bits_of(policy: Policy) -> int:
    from autoprune.quant import pow2_bits

    return pow2_bits(policy.input_bits) if policy.pow2_bits else policy.input_bits


def check_policy(model: nn.Module, policy: Policy, *, input_shape: tuple[int, int, int]) -> dict[str, LayerPolicy]:
    """Everything the policy names must exist before any work starts; returns per-layer settings.

    A keep ratio reaching a layer whose outputs cannot be pruned (the classifier) through ``_default``
    or a pattern is set to 1 in the returned settings; naming such a layer explicitly is an error.
    """
    from autoprune.prune import channel_groups, pruner
    from autoprune.quant import ACT_QUANTIZERS, WEIGHT_QUANTIZERS

    check_supported(model)
    resolved = policy.resolve(list(compressible_layers(model)))
    WEIGHT_QUANTIZERS.lookup(policy.quantizer)
    ACT_QUANTIZERS.lookup(policy.act_quantizer)
    pruner(policy.pruner)
    prunable = {n for g in channel_groups(model, example_input=torch.zeros(1, *input_shape)) for n in g.layers}
    for name, lp in list(resolved.items()):
        if lp.keep_ratio < 1.0 and name not in prunable:
            if name in policy.layers:
                raise AutopruneError(f"policy.layers[{name!r}].keep_ratio", lp.keep_ratio, "cannot apply: the layer's outputs are the model's output or cannot be pruned")
            resolved[name] = lp.model_copy(update={"keep_ratio": 1.0})
    if policy.pruner != "signal_norm":
        narrowed = sorted(n for n, lp in resolved.items() if lp.keep_ratio < 1.0)
        if narrowed:
            raise AutopruneError(f"policy.layers[{narrowed[0]!r}].keep_ratio", resolved[narrowed[0]].keep_ratio, f"must be 1 with pruner {policy.pruner!r}, which chooses channels by itself")
    if policy.pow2_bits:
        from autoprune.quant import pow2_bits

        resolved = {n: lp.model_copy(update={"w_bits": pow2_bits(lp.w_bits), "a_bits": pow2_bits(lp.a_bits)}) for n, lp in resolved.items()}
    return resolved


# --- the pieces the schedule introduces -----------------------------------------------------------


class _Session:
    """One compression run: the model copy, its data, and the transforms introduced so far."""

    def __init__(self, model: nn.Module, policy: Policy, layers: dict[str, LayerPolicy], *, input_shape: tuple[int, int, int], task: Any, device: torch.device | None = None) -> None:
        self.model = model
        self.policy = policy
        self.layers = layers
        self.input_shape = input_shape
        self.task = task
        self.device = device or torch.device("cpu")
        self.readers = input_readers(model, input_shape=input_shape)
        model.to(self.device)
        self.input_bits = input_bits_of(policy)
        self.weight_masker: Any = None
        self.feature_masker: Any = None
        self.structured: Any = None
        self.weight_quant: dict[str, nn.Module] = {}
        self.act_quant: dict[str, nn.Module] = {}
        self.pruned = False
        self.quantized = False

    # pruning ---------------------------------------------------------------------------------

    def introduce_pruning(self, *, at_step: int) -> None:
        from autoprune.prune import FeatureMasker, WeightMasker, prune_structured

        keep = {n: lp.keep_ratio for n, lp in self.layers.items()}
        needs_structured = any(k < 1.0 for k in keep.values()) or self.policy.pruner == "pfq"
        if needs_structured:
            with self._float_weights():
                self.structured = prune_structured(
                    self.model,
                    keep={n: k for n, k in keep.items() if k < 1.0},
                    example_input=torch.zeros(1, *self.input_shape, device=self.device),
                    method=self.policy.pruner,
                    pfq_eps=self.policy.pfq_eps,
                )
        schedule = {"start": at_step + self.policy.sparsity_start, "interval": self.policy.sparsity_interval, "updates": self.policy.sparsity_updates}
        w_targets = {n: lp.w_sparsity for n, lp in self.layers.items() if lp.w_sparsity > 0}
        if w_targets:
            self.weight_masker = WeightMasker(self.model, w_targets, **schedule)
        f_targets = {n: lp.f_sparsity for n, lp in self.layers.items() if lp.f_sparsity > 0 and n not in self.readers}
        if f_targets:
            self.feature_masker = FeatureMasker(self.model, f_targets, window=self.policy.feature_window, **schedule)
        self.model.to(self.device)  # masks and replaced parameters land on the session's device
        self.pruned = True

    def _float_weights(self) -> "_FloatWeights":
        return _FloatWeights(self)

    # quantization ----------------------------------------------------------------------------

    def attach_weight_quantizers(self, *, at_step: int) -> None:
        from autoprune.quant import make_weight_quantizer

        layers = compressible_layers(self.model)
        for name, lp in self.layers.items():
            if lp.w_bits < FLOAT_BITS:
                quantizer = make_weight_quantizer(self.policy, bits=lp.w_bits, start_step=at_step)
                parametrize.register_parametrization(layers[name], "weight", quantizer.to(self.device))
                self.weight_quant[name] = quantizer

    def act_bits(self) -> dict[str, int]:
        """Bits of the activations each layer reads: the input's for the layers reading the network input."""
        return {n: (self.input_bits if n in self.readers else lp.a_bits) for n, lp in self.layers.items()}

    def introduce_quantization(self, *, at_step: int) -> None:
        from autoprune.quant import attach_act_quantizer, make_act_quantizer

        self.attach_weight_quantizers(at_step=at_step)
        layers = compressible_layers(self.model)
        for name, bits in self.act_bits().items():
            if bits < FLOAT_BITS:
                quantizer = make_act_quantizer(self.policy, bits=bits, start_step=at_step)
                attach_act_quantizer(layers[name], quantizer.to(self.device))
                self.act_quant[name] = quantizer
        self.calibrate_activations()
        self.quantized = True

    def calibrate_activations(self) -> None:
        """Observe activation ranges on unlabeled training batches, then fix them."""
        from autoprune.quant import calibrate

        if self.act_quant:
            calibrate(self.model, list(self.act_quant.values()), self._unlabeled_batches())

    def _unlabeled_batches(self) -> Iterator[torch.Tensor]:
        from autoprune.task import batch_inputs

        loader = self.task.loader("train", batch_size=self.policy.batch_size, shuffle=True, seed=self.policy.seed + 1)
        for i, batch in enumerate(loader):
            if i >= self.policy.calibration_batches:
                return
            yield batch_inputs(batch)

    def step_hooks(self, step: int) -> None:
        from autoprune.quant import advance_quantizers

        advance_quantizers(self.model, step=step)
        if self.weight_masker is not None:
            self.weight_masker.update(step)
            self.weight_masker.apply()
        if self.feature_masker is not None:
            self.feature_masker.update(step)

    def final_weight_sparsity(self) -> None:
        if self.weight_masker is not None:
            self.weight_masker.final()
            self.weight_masker.apply()

    def finish(self) -> dict[str, float]:
        """Final sparsity, BN re-estimation, activation ranges, then quantized weights baked in."""
        from autoprune.quant import bake_weights, recalibrate_batchnorm

        self.final_weight_sparsity()
        if self.feature_masker is not None:
            self.feature_masker.final()
        if self.policy.bn_recalibration and self.task is not None:
            recalibrate_batchnorm(self.model, self._unlabeled_batches(), max_batches=self.policy.calibration_batches)
            self.calibrate_activations()
        baked = bake_weights(self.model)
        self.model.eval()
        return {name: info["delta"] for name, info in baked.items()}


class _FloatWeights:
    """Structured pruning needs plain weights: take weight quantizers off, put fresh ones back after."""

    def __init__(self, session: _Session) -> None:
        self.session = session

    def __enter__(self) -> None:
        layers = compressible_layers(self.session.model)
        for name in self.session.weight_quant:
            parametrize.remove_parametrizations(layers[name], "weight", leave_parametrized=False)

    def __exit__(self, *exc: object) -> None:
        layers = compressible_layers(self.session.model)
        for name, quantizer in self.session.weight_quant.items():
            fresh = quantizer.resized() if hasattr(quantizer, "resized") else quantizer
            parametrize.register_parametrization(layers[name], "weight", fresh.to(self.session.device))


# --- entry points ---------------------------------------------------------------------------------


def compress(base_model: nn.Module, policy: Policy, *, task: Any, progress: bool = False) -> CompressionResult:
    """A compressed copy of ``base_model`` on the task's device; the base model is left untouched.

    Fine-tuning reads the task's train loader and minimises the task's loss (bf16 autocast if the task asks).
    """
    from autoprune.task import cycle

    layers = check_policy(base_model, policy, input_shape=task.input_shape)
    start = time.perf_counter()
    torch.manual_seed(policy.seed)
    model = copy.deepcopy(base_model)
    device = task.device
    session = _Session(model, policy, layers, input_shape=task.input_shape, task=task, device=device)
    total = policy.finetune_steps
    half = total // 2
    prune_at = half if policy.order == "quantize_then_prune" and total else 0
    quant_at = half if policy.order == "prune_then_quantize" and total else 0
    if total == 0:
        _post_training(session)
    else:
        batches = cycle(task.loader("train", batch_size=policy.batch_size, shuffle=True, seed=policy.seed))
        optimizer: torch.optim.Optimizer | None = None
        for step in range(total):
            if step == prune_at and not session.pruned:
                session.introduce_pruning(at_step=step)
                optimizer = None
            if step == quant_at and not session.quantized:
                session.introduce_quantization(at_step=step)
                optimizer = None
            if optimizer is None:
                # Pruning replaces parameters, so the optimizer is rebuilt whenever a transform arrives.
                optimizer = torch.optim.SGD(model.parameters(), lr=_cosine(policy.finetune_lr, step, total), momentum=0.9, weight_decay=5e-4)
            for group in optimizer.param_groups:
                group["lr"] = _cosine(policy.finetune_lr, step, total)
            model.train()
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=task.bf16):
                loss = task.loss(model, batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at fine-tune step {step}")
            loss.backward()
            optimizer.step()
            session.step_hooks(step)
    steps = session.finish()
    act_bits = {n: getattr(m, "bits", FLOAT_BITS) for n, m in session.act_quant.items()}
    return CompressionResult(model, policy, layers, steps, act_bits, session.structured, time.perf_counter() - start)


def _cosine(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * step / max(1, total)))


def _post_training(session: _Session) -> None:
    if session.policy.order == "quantize_then_prune":
        session.introduce_quantization(at_step=0)
        for quantizer in session.weight_quant.values():
            quantizer.freeze()
        session.introduce_pruning(at_step=0)
    else:
        session.introduce_pruning(at_step=0)
        session.final_weight_sparsity()
        session.introduce_quantization(at_step=0)


def static_compress(model: nn.Module, policy: Policy, *, input_shape: tuple[int, int, int]) -> CompressionResult:
    """Apply a policy with no data at all (for `autoprune cost`): no fine-tune, calibration or BN update."""
    layers = check_policy(model, policy, input_shape=input_shape)
    model = copy.deepcopy(model)
    from autoprune.quant import bake_weights

    session = _Session(model, policy, layers, input_shape=input_shape, task=None)
    session.introduce_pruning(at_step=0)
    session.final_weight_sparsity()
    session.attach_weight_quantizers(at_step=0)
    steps = {name: info["delta"] for name, info in bake_weights(model).items()}
    return CompressionResult(model.eval(), policy, layers, steps, session.act_bits(), session.structured)


# --- saving and loading ---------------------------------------------------------------------------


def save_compressed(result: CompressionResult, path: str | Path, *, task: Any) -> Path:
    """A safetensors file of the weights (and quantizer state), with the policy and record as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "policy": result.policy.to_json(),
        "weight_steps": json.dumps(result.weight_steps),
        "act_bits": json.dumps(result.act_bits),
        "structured": json.dumps(result.structured.to_dict() if result.structured is not None else None),
        "task": json.dumps(task.record()),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    write_atomic(path.with_suffix(".policy.json"), result.policy.to_json())
    return path


def load_compressed(path: str | Path, *, task: Any) -> CompressionResult:
    """Rebuild a saved compressed model: base architecture, recorded channels, quantizers, weights.

    Nothing is unpickled: safetensors holds tensors and strings only.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from autoprune.prune import StructuredRecord, replay_structured
    from autoprune.quant import attach_act_quantizer, make_act_quantizer

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "policy" not in meta:
        raise AutopruneError("model file", str(path), "is not a compressed model saved by autoprune")
    policy = Policy.from_dict(json.loads(meta["policy"]))
    model = task.build()
    layers = check_policy(model, policy, input_shape=task.input_shape)
    structured_data = json.loads(meta["structured"])
    structured = None
    if structured_data is not None:
        structured = StructuredRecord.from_dict(structured_data)
        replay_structured(model, structured, example_input=torch.zeros(1, *task.input_shape))
    act_bits = {k: int(v) for k, v in json.loads(meta["act_bits"]).items()}
    compressed_layers = compressible_layers(model)
    for name, bits in act_bits.items():
        if bits < FLOAT_BITS:
            attach_act_quantizer(compressed_layers[name], make_act_quantizer(policy, bits=bits))
    state = load_file(str(path))
    _prepare_feature_masks(model, state, policy)
    model.load_state_dict(state, strict=True)
    model.eval()
    steps = {k: float(v) for k, v in json.loads(meta["weight_steps"]).items()}
    return CompressionResult(model, policy, layers, steps, act_bits, structured)


def _prepare_feature_masks(model: nn.Module, state: dict[str, torch.Tensor], policy: Policy) -> None:
    """Fitted feature masks are buffers that a fresh model lacks: attach masks shaped like the saved ones."""
    from autoprune.prune import attach_feature_mask

    layers = compressible_layers(model)
    for key, tensor in state.items():
        if key.endswith(".feature_mask.mask"):
            attach_feature_mask(layers[key[: -len(".feature_mask.mask")]], mask=tensor, window=policy.feature_window)
