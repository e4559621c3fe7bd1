"""compress(base_model, policy, task): apply a Policy in the order it names, with fine-tuning or PTQ.

The schedule of ``finetune_steps`` (T) steps introduces the two families of transforms at the step
their ``order`` gives (seed 004 sec. 4.1):

- ``prune_then_quantize``: pruning (structured at once, unstructured along its schedule) from step 0,
  quantization from step T/2;
- ``quantize_then_prune``: quantization from step 0, pruning from step T/2;
- ``joint``: both from step 0.

Every quantizer hears the step number before that step's forward, so a delay of d steps means the
forward of step ``start + d`` is the first quantized one, with ranges measured on that step's weights and
batch (seed 004 eq. 5).

With T = 0 this is post-training compression: the order then decides whether the quantization
step sizes and activation ranges are computed before pruning (``quantize_then_prune``) or after it; feature
masks are fitted on calibration batches. Either way the model
ends with BatchNorm statistics re-estimated on unlabeled training data (seed 000 sec. 3) and its
weights baked to their quantized values, which are what the cost model reads.

The fine-tune follows the policy's recipe (``Policy.distill``, ``warmup``, ``keep_best``): the loss distils
from the float base model when the task's outputs are class logits, the learning rate warms up then follows
a cosine, the best-validation checkpoint is kept among ``evaluations`` checks spread over the steps where
every transform has reached its final form, and the post-training result of the same policy is kept instead
when it scores better on validation: a policy never comes out worse than its own post-training compression.
``train_further`` continues a compressed model's training by more steps of the same recipe (final training).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from autoprune.errors import AutopruneError
from autoprune.models import check_products, check_supported, compressible_layers, float_parameters, input_readers
from autoprune.models.convert import MatMul, converted, product_sites
from autoprune.files import atomic_path, write_atomic
from autoprune.bits import FLOAT_ACT_BITS
from autoprune.policy import FLOAT_BITS, LayerPolicy, Policy
from autoprune.quant.model import ACT_QUANT, SECOND_ACT_QUANT


@dataclass
class CompressionResult:
    """The compressed model and what was done to it, keyed by layer name."""

    model: nn.Module
    policy: Policy
    layers: dict[str, LayerPolicy]
    weight_steps: dict[str, float | list[float]] = field(default_factory=dict)
    """Each quantized layer's weight step: one float, or one per output channel (per-channel quantizers)."""
    act_bits: dict[str, int] = field(default_factory=dict)
    structured: Any = None
    seconds: float = 0.0
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """What keep_best chose: ``kept`` ("post_training", "finetuned", "further", "start"), ``step``, the
    validation metric of each candidate compared (``post_training``, ``finetuned``, ``start``, ``further``) and
    ``val``, the kept model's (the task's metric on the validation search subset)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The task's metric and the cost, when the model was scored (``autoprune.apply(..., score=True)``)."""
    deployed: Any = None
    """The deployed files' measurements (``autoprune.deploy.point.DeployedPoint``), when exported to ONNX."""
    pinned: dict[str, str] = field(default_factory=dict)
    """Layers the policy narrowed whose width was kept, with why (a grouped convolution, a channel shuffle)."""
    float_parameters: dict[str, str] = field(default_factory=dict)
    """Parameters passed through uncompressed in float (normalizations, a class token, a layer scale), with what holds them."""

    def checksum(self) -> str:
        """SHA-256 (16 hex digits) of every tensor of the model's state, names and shapes included: what
        identifies the weights a later rung continues from."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            value = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def cost_layers(self) -> dict[str, Any]:
        """Each layer as the cost model reads it: its steps and the grid its weight quantizer produced."""
        from autoprune.cost import LayerQuant
        from autoprune.quant import WEIGHT_QUANTIZERS

        quantizer = WEIGHT_QUANTIZERS.lookup(self.policy.quantizer)
        return {
            name: LayerQuant(
                w_bits=lp.w_bits,
                a_bits=self.act_bits.get(name, FLOAT_BITS),
                f_sparsity=lp.f_sparsity,
                delta=self.weight_steps.get(name),
                grid=quantizer.grid_for(lp.w_bits),
                masked=lp.w_sparsity > 0,
            )
            for name, lp in self.layers.items()
        } | {
            # a product's two inputs: a_bits the first's, w_bits the second's
            name: LayerQuant(w_bits=bits, a_bits=bits) for name, bits in self.act_bits.items() if name not in self.layers
        } | {
            name: LayerQuant(w_bits=bits, delta=self.weight_steps.get(name), grid=quantizer.grid_for(bits))
            for name, bits in embedding_bits(self.model, self.policy).items()
        }

    def cost(self, input_shape: tuple[int, ...]) -> Any:
        """The one path from a compressed model to its cost (``autoprune cost``, search, apply, export): the
        baked weights, their steps and grids, and the input bits as the policy rounds them."""
        from autoprune.cost import measure_cost

        # The cost model reads weights and shapes only: a CPU copy of a model on a GPU gives the same numbers.
        model = self.model if _on_cpu(self.model) else copy.deepcopy(self.model).cpu()
        return measure_cost(model, input_shape=input_shape, layers=self.cost_layers(), input_bits=input_bits_of(self.policy))

    def summary(self) -> "LayerTable":
        """Per layer, what was applied: ``print(result.summary())`` shows a table; each row is also a mapping
        (``summary()["conv1"]["out_channels"]``). ``a_bits`` is the bits the layer's input got: the network
        input's (``input_bits``) for a layer reading it, whatever the policy's ``a_bits`` for that layer."""
        layers = compressible_layers(self.model)
        return LayerTable({
            name: {
                "out_channels": _out_channels(layers[name]),
                "keep_ratio": lp.keep_ratio,
                "w_bits": lp.w_bits,
                "a_bits": self.act_bits.get(name, lp.a_bits),
                "reads_input": self.act_bits.get(name, lp.a_bits) != lp.a_bits,
                "w_sparsity": lp.w_sparsity,
                "f_sparsity": lp.f_sparsity,
                "zero_fraction": float((layers[name].weight == 0).float().mean()),
                "delta": self.weight_steps.get(name),
            }
            for name, lp in self.layers.items()
        })


class LayerTable(dict):
    """Layer name -> what compression applied to it; printed as a table."""

    def __str__(self) -> str:
        def bits(value: int) -> str:
            return "float" if value >= FLOAT_BITS else str(value)

        def step(value: Any) -> str:
            if value is None:
                return "-"
            if isinstance(value, list):
                return f"{min(value):.3g}..{max(value):.3g}" if value else "-"
            return f"{value:.3g}"

        header = ("layer", "out channels", "keep", "W bits", "A bits", "w sparsity", "f sparsity", "zeros", "step")
        rows = [
            (
                name, str(row["out_channels"]), f"{row['keep_ratio']:.2g}", bits(row["w_bits"]),
                bits(row["a_bits"]) + (" (input)" if row["reads_input"] else ""), f"{row['w_sparsity']:.2g}",
                f"{row['f_sparsity']:.2g}", f"{row['zero_fraction']:.1%}", step(row["delta"]),
            )
            for name, row in self.items()
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])

    def __repr__(self) -> str:
        return str(self)


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in model.state_dict().values())


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def input_bits_of(policy: Policy) -> int:
    from autoprune.quant import pow2_bits

    return pow2_bits(policy.input_bits) if policy.pow2_bits else policy.input_bits


def product_bits(model: nn.Module, policy: Policy, layers: dict[str, LayerPolicy]) -> dict[str, int]:
    """The activation bits of each product's two inputs: the policy's entry naming the product (exactly or by
    a pattern), else those of the layer it follows (an attention's ``out_proj``, ``product_sites``), else the
    policy's ``_default``."""
    from autoprune.policy import DEFAULT_KEY, layer_key
    from autoprune.quant import pow2_bits

    bits = {}
    for name, owner in product_sites(model).items():
        key = layer_key(policy.layers, name)
        if key not in (None, DEFAULT_KEY) or owner is None:
            value = policy.for_layer(name).a_bits
            bits[name] = pow2_bits(value) if policy.pow2_bits else value
        else:
            bits[name] = layers[owner].a_bits
    return bits


def embedding_bits(model: nn.Module, policy: Policy) -> dict[str, int]:
    """Weight bits of each embedding's table (weight-only: a lookup reads no activation): the policy's entry
    for it, ``_default`` included."""
    from autoprune.quant import pow2_bits

    bits = {name: policy.for_layer(name).w_bits for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, value in bits.items():
        settings = policy.layers.get(name)
        if settings is not None and (settings.keep_ratio < 1 or settings.w_sparsity > 0 or settings.f_sparsity > 0):
            raise AutopruneError(f"policy.layers[{name!r}]", settings.summary(), "an embedding takes weight bits only (w_bits)")
    return {name: pow2_bits(value) if policy.pow2_bits else value for name, value in bits.items()}


def attach_act_quantizers(module: nn.Module, name: str, make: Callable[[], Any]) -> list[tuple[str, Any]]:
    """Quantizers on what ``module`` reads, keyed for the session: one on a layer's input, one on each input
    of a product (the second keyed ``name[b]``)."""
    from autoprune.quant import attach_act_quantizer

    first = make()
    attach_act_quantizer(module, first)
    if not isinstance(module, MatMul):
        return [(name, first)]
    second = make()
    attach_act_quantizer(module, second, second=True)
    return [(name, first), (f"{name}[b]", second)]


def check_policy(model: nn.Module, policy: Policy, *, input_shape: tuple[int, int, int]) -> dict[str, LayerPolicy]:
    """Everything the policy names must exist before any work starts; returns per-layer settings.

    A keep ratio reaching a layer whose outputs cannot be pruned (the classifier, a pinned layer) through
    ``_default`` or a pattern is set to 1 in the returned settings; naming such a layer explicitly is an error.
    """
    return _checked_policy(model, policy, input_shape=input_shape)[0]


def _checked_policy(model: nn.Module, policy: Policy, *, input_shape: tuple[int, ...]) -> tuple[dict[str, LayerPolicy], dict[str, str]]:
    """``check_policy``'s settings, and the layers whose keep ratio was set to 1 because their width is pinned
    (``autoprune.prune.pinned_in_graph``), with why."""
    from autoprune.policy import check_layer_keys
    from autoprune.prune import dependency_graph, groups_in_graph, pinned_in_graph, pruner
    from autoprune.prune.structured import head_groups
    from autoprune.quant import ACT_QUANTIZERS, WEIGHT_QUANTIZERS

    check_supported(model)
    check_products(model, input_shape=input_shape)
    names = list(compressible_layers(model))
    embeddings = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    check_layer_keys(policy.layers, names + list(product_sites(model)) + embeddings, field="policy.layers")
    embedding_bits(model, policy)
    resolved = {name: policy.for_layer(name) for name in names}
    WEIGHT_QUANTIZERS.lookup(policy.quantizer)
    ACT_QUANTIZERS.lookup(policy.act_quantizer)
    pruner(policy.pruner)
    graph = dependency_graph(model, torch.zeros(1, *input_shape))
    prunable = {n for g in groups_in_graph(model, graph) for n in g.layers}
    prunable |= {n for names in head_groups(model).values() for n in names}
    pins = pinned_in_graph(model, graph)
    pinned = {}
    for name, lp in list(resolved.items()):
        if lp.keep_ratio < 1.0 and name not in prunable:
            if name in policy.layers:
                why = f"its width is pinned: {pins[name]}" if name in pins else "the layer's outputs are the model's output or cannot be pruned"
                raise AutopruneError(f"policy.layers[{name!r}].keep_ratio", lp.keep_ratio, f"cannot apply: {why}")
            resolved[name] = lp.model_copy(update={"keep_ratio": 1.0})
            if name in pins:
                pinned[name] = pins[name]
    if not policy.pruner.takes_keep_ratios:
        narrowed = sorted(n for n, lp in resolved.items() if lp.keep_ratio < 1.0)
        if narrowed:
            rule = f"must be 1 with pruner {policy.pruner.kind!r}, which takes no keep ratios"
            raise AutopruneError(f"policy.layers[{narrowed[0]!r}].keep_ratio", resolved[narrowed[0]].keep_ratio, rule)
    if policy.pow2_bits:
        from autoprune.quant import pow2_bits

        resolved = {n: lp.model_copy(update={"w_bits": pow2_bits(lp.w_bits), "a_bits": pow2_bits(lp.a_bits)}) for n, lp in resolved.items()}
    return resolved, pinned


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
        self.product_bits = product_bits(model, policy, layers)
        self.embedding_bits = embedding_bits(model, policy)
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
        needs_structured = any(k < 1.0 for k in keep.values()) or self.policy.pruner.chooses_channels
        if needs_structured:
            with self._float_weights():
                self.structured = prune_structured(
                    self.model,
                    keep={n: k for n, k in keep.items() if k < 1.0},
                    example_input=torch.zeros(1, *self.input_shape, device=self.device),
                    method=self.policy.pruner,
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

    def prune_again(self) -> None:
        """A second pass of the policy's pruner on the model as it is now (PfQ workflow step 3)."""
        from autoprune.prune import prune_structured

        with self._float_weights():
            later = prune_structured(self.model, keep={}, example_input=torch.zeros(1, *self.input_shape, device=self.device), method=self.policy.pruner)
            self.structured = later if self.structured is None else self.structured.followed_by(later)

    def fold_batchnorm(self) -> None:
        """PfQ workflow step 4: every BN that follows a conv is folded into it (seed 003 eq. 5-6)."""
        from autoprune.prune import fold_batchnorm

        fold_batchnorm(self.model)

    def _float_weights(self) -> "_FloatWeights":
        return _FloatWeights(self)

    # quantization ----------------------------------------------------------------------------

    def attach_weight_quantizers(self, *, at_step: int) -> None:
        from autoprune.quant import make_weight_quantizer

        modules = dict(self.model.named_modules())
        for name, bits in {**{n: lp.w_bits for n, lp in self.layers.items()}, **self.embedding_bits}.items():
            if bits < FLOAT_BITS:
                quantizer = make_weight_quantizer(self.policy, bits=bits, start_step=at_step)
                parametrize.register_parametrization(modules[name], "weight", quantizer.to(self.device))
                self.weight_quant[name] = quantizer

    def act_bits(self) -> dict[str, int]:
        """Bits of the activations each layer reads: the input's for the layers reading the network input;
        then each product's (both its inputs)."""
        return {**{n: (self.input_bits if n in self.readers else lp.a_bits) for n, lp in self.layers.items()}, **self.product_bits}

    def introduce_quantization(self, *, at_step: int, post_training: bool = False) -> None:
        """Attach the quantizers. Post-training they quantize at once; while fine-tuning a delayed one waits
        for its t_q and takes its range from the batch there, the others are calibrated now."""
        self.attach_weight_quantizers(at_step=at_step)
        self.introduce_act_quantization(at_step=at_step, post_training=post_training)
        self.quantized = True

    def introduce_act_quantization(self, *, at_step: int, post_training: bool = False) -> None:
        from autoprune.quant import make_act_quantizer

        modules = dict(self.model.named_modules())
        for name, bits in self.act_bits().items():
            if bits not in FLOAT_ACT_BITS:
                for key, quantizer in attach_act_quantizers(modules[name], name, lambda: make_act_quantizer(self.policy, bits=bits, start_step=at_step)):
                    if post_training:
                        quantizer.start_now()
                    self.act_quant[key] = quantizer.to(self.device)
        self.calibrate_activations(only_uncalibrated=False, up_front=not post_training)

    def calibrate_activations(self, *, only_uncalibrated: bool, up_front: bool = False) -> None:
        """Observe activation ranges on unlabeled training batches, then fix them.

        ``up_front`` (fine-tune start) leaves alone the quantizers that take their range at t_q;
        ``only_uncalibrated`` keeps every range already fixed.
        """
        from autoprune.quant import calibrate

        chosen = self._calibrated_next(only_uncalibrated=only_uncalibrated, up_front=up_front)
        if chosen:
            calibrate(self.model, chosen, self._unlabeled_batches())

    def _calibrated_next(self, *, only_uncalibrated: bool, up_front: bool) -> list[Any]:
        return [
            q for q in self.act_quant.values()
            if not (up_front and q.fixes_range_at_delay) and not (only_uncalibrated and q.calibrated)
        ]

    def fit_feature_masks(self) -> None:
        """Post-training feature sparsity: the masks see calibration batches (only they run in training
        mode, so BN statistics stay), then take their final sparsity."""
        if self.feature_masker is None:
            return
        from autoprune.quant.model import run_batches

        self.model.eval()
        for mask in self.feature_masker.masks.values():
            mask.train()
        try:
            run_batches(self.model, self._unlabeled_batches(), max_batches=None)
        finally:
            self.model.eval()
        self.feature_masker.final()

    def _unlabeled_batches(self) -> Iterator[torch.Tensor]:
        from autoprune.task import batch_inputs

        loader = self.task.loader("train", batch_size=self.policy.batch_size, shuffle=True, seed=self.policy.seed + 1)
        for i, batch in enumerate(loader):
            if i >= self.policy.calibration_batches:
                return
            yield batch_inputs(batch)

    def before_step(self, step: int) -> None:
        """Quantizers learn the step before its forward: a delay of d makes step start + d the first quantized."""
        from autoprune.quant import advance_quantizers

        advance_quantizers(self.model, step=step)

    def step_hooks(self, step: int) -> None:
        if self.weight_masker is not None:
            self.weight_masker.update(step)
            self.weight_masker.apply()
        if self.feature_masker is not None:
            self.feature_masker.update(step)

    def in_final_form(self) -> bool:
        """Every transform the policy names is in place and at its final setting (quantizers quantizing,
        sparsity at its target): only then is the model a candidate for the kept checkpoint."""
        if not (self.pruned and self.quantized):
            return False
        if any(not q.active for q in self.weight_quant.values()) or any(q.current_step < q.delay for q in self.act_quant.values()):
            return False
        return all(m is None or m.levels == m.targets for m in (self.weight_masker, self.feature_masker))

    def final_weight_sparsity(self) -> None:
        if self.weight_masker is not None:
            self.weight_masker.final()
            self.weight_masker.apply()

    def finish(self, *, keep_ranges: bool = False, fine_tuned: bool = True) -> dict[str, float | list[float]]:
        """Final sparsity, BN re-estimation, activation ranges, then quantized weights baked in.

        After BN re-estimation the ranges are measured again, except a delayed quantizer's t_q range (seed
        004 fixes it for good) and, with ``keep_ranges``, every range (post-training quantize_then_prune:
        ranges were measured before pruning). A quantizer whose delay the fine-tune never reached starts now.
        """
        from autoprune.quant import bake_weights, float_activations, recalibrate_batchnorm

        self.final_weight_sparsity()
        if self.feature_masker is not None:
            self.feature_masker.final()
        for quantizer in self.act_quant.values():
            quantizer.start_now()
        if self.policy.bn_recalibration and self.task is not None:
            remeasured = [] if keep_ranges else self._calibrated_next(only_uncalibrated=False, up_front=fine_tuned)
            if remeasured:
                # Ranges measured on the statistics being replaced can be far off (initial BN statistics give
                # features 1e-14 small at depth), and BN statistics of features quantized that badly blow the
                # features up to inf (efficientnet_b0): a first estimate on float features gives the ranges
                # the estimate on quantized features then uses.
                with float_activations(remeasured):
                    recalibrate_batchnorm(self.model, self._unlabeled_batches(), max_batches=self.policy.calibration_batches)
                self.calibrate_activations(only_uncalibrated=False, up_front=fine_tuned)
            recalibrate_batchnorm(self.model, self._unlabeled_batches(), max_batches=self.policy.calibration_batches)
            if not keep_ranges:
                self.calibrate_activations(only_uncalibrated=False, up_front=fine_tuned)
        if self.task is not None:
            self.calibrate_activations(only_uncalibrated=True)
        baked = bake_weights(self.model)
        self.model.eval()
        return {name: info["delta"] for name, info in baked.items()}


class _FloatWeights:
    """Structured pruning needs plain weights: take weight quantizers off, put them back after, a per-channel
    step keeping only the steps of the channels the pruning kept."""

    def __init__(self, session: _Session) -> None:
        self.session = session

    def __enter__(self) -> None:
        layers = dict(self.session.model.named_modules())
        for name in self.session.weight_quant:
            parametrize.remove_parametrizations(layers[name], "weight", leave_parametrized=False)

    def __exit__(self, *exc: object) -> None:
        layers = dict(self.session.model.named_modules())
        record = self.session.structured
        latest = (record.then[-1] if record.then else record) if record is not None else None
        for name, quantizer in self.session.weight_quant.items():
            if latest is not None and name in latest.layers:
                quantizer.keep_channels(latest.layers[name].kept)
            parametrize.register_parametrization(layers[name], "weight", quantizer.to(self.session.device))


# --- entry points ---------------------------------------------------------------------------------


def compress(base_model: nn.Module, policy: Policy, *, task: Any, post_training: CompressionResult | None = None) -> CompressionResult:
    """A compressed copy of ``base_model`` on the task's device; the base model is left untouched.

    Fine-tuning reads the task's train loader and minimises the task's loss, distilled from ``base_model``
    when the policy and the task allow it (bf16 autocast if the task asks). With ``keep_best`` the policy's
    post-training result (``post_training`` when the caller already made it) is returned instead when it
    scores better on validation.
    """
    base_model = converted(base_model)
    if policy.finetune_steps == 0 or not policy.keep_best:
        return _compress(base_model, policy, task=task)
    ptq = post_training or _compress(base_model, policy.model_copy(update={"finetune_steps": 0}), task=task)
    tuned = _compress(base_model, policy, task=task)
    before, after = task.evaluate(ptq.model, "val"), task.evaluate(tuned.model, "val")
    chosen = tuned if after >= before else ptq
    kept = "finetuned" if chosen is tuned else "post_training"
    chosen.policy = policy
    chosen.checkpoint = {**tuned.checkpoint, "kept": kept, "post_training": before, "finetuned": after, "val": max(before, after)}
    chosen.seconds = ptq.seconds + tuned.seconds if post_training is None else tuned.seconds
    return chosen


def _compress(base_model: nn.Module, policy: Policy, *, task: Any) -> CompressionResult:
    layers, pinned = _checked_policy(base_model, policy, input_shape=task.input_shape)
    start = time.perf_counter()
    torch.manual_seed(policy.seed)
    model = copy.deepcopy(base_model)
    device = task.device
    session = _Session(model, policy, layers, input_shape=task.input_shape, task=task, device=device)
    total = policy.finetune_steps
    half = total // 2
    teacher = _teacher(base_model, policy, task)
    best = _Best(task, evaluations=policy.evaluations, end=total) if policy.keep_best and total > 0 else None
    if policy.workflow == "pfq":
        _pfq_workflow(session, task, teacher=teacher, best=best)
    elif total == 0:
        _post_training(session)
    else:
        prune_at = half if policy.order == "quantize_then_prune" else 0
        quant_at = half if policy.order == "prune_then_quantize" else 0

        def introduce(step: int) -> bool:
            arrived = False
            if step == prune_at and not session.pruned:
                session.introduce_pruning(at_step=step)
                arrived = True
            if step == quant_at and not session.quantized:
                session.introduce_quantization(at_step=step)
                arrived = True
            return arrived

        _fine_tune(session, task, steps=range(total), introduce=introduce, teacher=teacher, best=best)
    checkpoint = best.restore(model) if best is not None else {}
    steps = session.finish(keep_ranges=total == 0 and policy.order == "quantize_then_prune", fine_tuned=total > 0)
    result = CompressionResult(model, policy, layers, steps, session.act_bits(), session.structured, time.perf_counter() - start)
    result.checkpoint = checkpoint
    result.pinned = pinned
    result.float_parameters = float_parameters(model)
    return result


def _teacher(base_model: nn.Module, policy: Policy, task: Any) -> nn.Module | None:
    """The float base model the fine-tune distils from, on the task's device (a copy where it lives elsewhere)."""
    if not policy.distill or policy.finetune_steps == 0 or not task.distills:
        return None
    teacher = base_model if all(p.device == task.device for p in base_model.parameters()) else copy.deepcopy(base_model).to(task.device)
    return teacher.eval()


class _Best:
    """The best-validation checkpoint of a fine-tune: ``evaluations`` checks spread evenly from the first step
    where every transform is final to the last step, the last step always among them."""

    def __init__(self, task: Any, *, evaluations: int, end: int) -> None:
        self.task = task
        self.evaluations = evaluations
        self.end = end
        self.due: set[int] | None = None
        self.value = -math.inf
        self.step = -1
        self.state: dict[str, torch.Tensor] | None = None

    def after_step(self, step: int, model: nn.Module, *, final_form: bool) -> None:
        if not final_form:
            return
        if self.due is None:
            # from here to the end, evenly: the last step is the last check
            span = self.end - step
            self.due = {self.end - 1 - round(i * span / self.evaluations) for i in range(self.evaluations)}
        if step in self.due:
            value = self.task.evaluate(model, "val")
            if value > self.value:
                self.value, self.step = value, step
                self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> dict[str, Any]:
        """Load the best checkpoint into ``model`` (the same object, so its hooks and quantizers stay); what was kept."""
        if self.state is None:
            return {}
        model.load_state_dict(self.state)
        return {"step": self.step, "best_during_finetune": self.value}


def _fine_tune(
    session: _Session, task: Any, *, steps: range, introduce: Callable[[int], bool] | None = None, teacher: nn.Module | None = None,
    best: _Best | None = None, fixed_masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """SGD over ``steps`` (numbered, so delays and sparsity schedules count across phases), the learning rate
    warming up over the policy's share of the phase then following a cosine; ``introduce(step)`` may add
    transforms before a step and says whether it did. With ``teacher`` the loss distils from it; ``best``
    checks the model after each step; ``fixed_masks`` keeps zeros of named layers' weights at zero."""
    from autoprune.task import cycle

    policy, model = session.policy, session.model
    batches = cycle(task.loader("train", batch_size=policy.batch_size, shuffle=True, seed=policy.seed + steps.start))
    optimizer: torch.optim.Optimizer | None = None
    for step in steps:
        if introduce is not None and introduce(step):
            optimizer = None
        lr = _learning_rate(policy.finetune_lr, step - steps.start, len(steps), warmup=policy.warmup)
        if optimizer is None:
            # Pruning replaces parameters, so the optimizer is rebuilt whenever a transform arrives.
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for group in optimizer.param_groups:
            group["lr"] = lr
        session.before_step(step)
        model.train()
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=session.device.type, dtype=torch.bfloat16, enabled=task.bf16):
            loss = task.fine_tune_loss(model, batch, teacher=teacher, temperature=policy.distill_temperature, weight=policy.distill_weight)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at fine-tune step {step}")
        loss.backward()
        optimizer.step()
        session.step_hooks(step)
        if fixed_masks:
            _apply_masks(model, fixed_masks)
        if best is not None:
            best.after_step(step, model, final_form=session.in_final_form())


def _pfq_workflow(session: _Session, task: Any, *, teacher: nn.Module | None = None, best: _Best | None = None) -> None:
    """Seed 003 sec. 3.3: (1) PfQ, (2) fine-tune with activations quantized, (3) PfQ again, (4) BN folded into
    the weights, (5) fine-tune with activations and weights quantized, the weights quantized after folding.
    Each fine-tune takes half of ``finetune_steps``; with none, the steps run as post-training compression."""
    total = session.policy.finetune_steps
    half = total // 2
    session.introduce_pruning(at_step=0)
    session.introduce_act_quantization(at_step=0, post_training=total == 0)
    _fine_tune(session, task, steps=range(half), teacher=teacher)
    session.prune_again()
    session.fold_batchnorm()
    session.attach_weight_quantizers(at_step=half)
    if total == 0:
        for quantizer in session.weight_quant.values():
            quantizer.freeze()
    session.quantized = True
    _fine_tune(session, task, steps=range(half, total), teacher=teacher, best=best)


def _learning_rate(lr: float, step: int, total: int, *, warmup: float) -> float:
    """Linear warmup over ``warmup`` x ``total`` steps, then a cosine from ``lr`` down to 0 over the rest."""
    rise = int(warmup * total)
    if step < rise:
        return lr * (step + 1) / rise
    return 0.5 * lr * (1 + math.cos(math.pi * (step - rise) / max(1, total - rise)))


def _post_training(session: _Session) -> None:
    if session.policy.order == "quantize_then_prune":
        session.introduce_quantization(at_step=0, post_training=True)
        for quantizer in session.weight_quant.values():
            quantizer.freeze()
        session.introduce_pruning(at_step=0)
        session.final_weight_sparsity()
        session.fit_feature_masks()
    else:
        session.introduce_pruning(at_step=0)
        session.final_weight_sparsity()
        session.fit_feature_masks()
        session.introduce_quantization(at_step=0, post_training=True)


def static_compress(model: nn.Module, policy: Policy, *, input_shape: tuple[int, int, int]) -> CompressionResult:
    """Apply a policy with no data at all (for `autoprune cost`): no fine-tune, calibration or BN update."""
    model = converted(model)
    layers, pinned = _checked_policy(model, policy, input_shape=input_shape)
    model = copy.deepcopy(model)
    from autoprune.quant import bake_weights

    session = _Session(model, policy, layers, input_shape=input_shape, task=None)
    session.introduce_pruning(at_step=0)
    session.final_weight_sparsity()
    if policy.workflow == "pfq":
        # Without data the BN statistics do not move, so the second PfQ finds what the first did; the weights
        # are still quantized after folding, as the workflow quantizes them.
        session.fold_batchnorm()
    session.attach_weight_quantizers(at_step=0)
    steps = {name: info["delta"] for name, info in bake_weights(model).items()}
    return CompressionResult(
        model.eval(), policy, layers, steps, session.act_bits(), session.structured, pinned=pinned, float_parameters=float_parameters(model)
    )


def train_further(result: CompressionResult, base_model: nn.Module, *, task: Any, steps: int, seed: int | None = None) -> CompressionResult:
    """``steps`` more steps of the policy's recipe on an already compressed model, starting from its weights
    (final training: the rung above the search's fine-tune continues it instead of starting over).

    The baked weights become the trained ones again under their weight quantizers; activation ranges,
    fitted feature masks and removed channels stay, and weights an unstructured mask zeroed stay zero.
    Distillation from ``base_model``, warmup and cosine, the best-validation checkpoint, BN statistics and
    activation ranges measured again at the end; the result is never worse on validation than ``result``
    itself, which is returned unchanged (``checkpoint["kept"] == "start"``) when no checkpoint beat it.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AutopruneError("steps", steps, "must be a positive number of training steps")
    policy = result.policy.model_copy(update={"finetune_steps": steps, **({"seed": seed} if seed is not None else {})})
    start = time.perf_counter()
    torch.manual_seed(policy.seed)
    model = copy.deepcopy(result.model).to(task.device)
    session = _Session(model, policy, dict(result.layers), input_shape=task.input_shape, task=task, device=task.device)
    session.structured, session.pruned = result.structured, True
    layers = compressible_layers(model)
    session.act_quant = {
        (name if child == ACT_QUANT else f"{name}[b]"): getattr(module, child)
        for name, module in model.named_modules() for child in (ACT_QUANT, SECOND_ACT_QUANT) if hasattr(module, child)
    }
    for quantizer in session.act_quant.values():
        quantizer.delay = 0  # its range is known already: quantize from the first step
    masked = {name: layers[name].weight.detach() != 0 for name, lp in result.layers.items() if lp.w_sparsity > 0}
    session.attach_weight_quantizers(at_step=0)
    for quantizer in session.weight_quant.values():
        quantizer.delay = 0
    session.quantized = True
    start_value = task.evaluate(result.model, "val")
    best = _Best(task, evaluations=policy.evaluations, end=steps)
    best.value = start_value
    _fine_tune(session, task, steps=range(steps), teacher=_teacher(base_model, policy, task), best=best, fixed_masks=masked)
    if best.state is None:
        result.checkpoint = {**result.checkpoint, "kept": "start", "start": start_value, "val": start_value}
        return result
    checkpoint = best.restore(model)
    weight_steps = session.finish(fine_tuned=True)
    further = CompressionResult(model, policy, dict(result.layers), weight_steps, dict(result.act_bits), result.structured, time.perf_counter() - start)
    value = task.evaluate(further.model, "val")
    if value < start_value:  # BN statistics and ranges measured again can cost what the checkpoint gained
        result.checkpoint = {**result.checkpoint, "kept": "start", "start": start_value, "further": value, "val": start_value}
        return result
    further.checkpoint = {**checkpoint, "kept": "further", "start": start_value, "further": value, "val": value}
    return further


def _apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights again (on the trained tensor under a weight quantizer)."""
    layers = compressible_layers(model)
    with torch.no_grad():
        for name, mask in masks.items():
            layer = layers[name]
            weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
            weight.mul_(mask)


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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    write_atomic(path.with_suffix(".policy.json"), result.policy.to_json())
    return path


def load_compressed(path: str | Path, *, task: Any) -> CompressionResult:
    """Rebuild a saved compressed model: base architecture, recorded channels, quantizers, weights.

    Nothing is unpickled: safetensors holds tensors and strings only.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from autoprune.prune import StructuredRecord, replay_structured
    from autoprune.quant import make_act_quantizer

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
    modules = dict(model.named_modules())
    for name, bits in act_bits.items():
        if bits not in FLOAT_ACT_BITS:
            for _, quantizer in attach_act_quantizers(modules[name], name, lambda: make_act_quantizer(policy, bits=bits)):
                quantizer.start_now()
    if policy.workflow == "pfq":
        from autoprune.prune import fold_batchnorm

        fold_batchnorm(model)
    state = load_file(str(path))
    _prepare_feature_masks(model, state, policy)
    model.load_state_dict(state, strict=True)
    model.eval()
    steps = {k: [float(d) for d in v] if isinstance(v, list) else float(v) for k, v in json.loads(meta["weight_steps"]).items()}
    return CompressionResult(model, policy, layers, steps, act_bits, structured)


def _prepare_feature_masks(model: nn.Module, state: dict[str, torch.Tensor], policy: Policy) -> None:
    """Fitted feature masks are buffers that a fresh model lacks: attach masks shaped like the saved ones."""
    from autoprune.prune import attach_feature_mask

    layers = compressible_layers(model)
    for key, tensor in state.items():
        if key.endswith(".feature_mask.mask"):
            attach_feature_mask(layers[key[: -len(".feature_mask.mask")]], mask=tensor, window=policy.feature_window)
