"""Per-layer sensitivity: the loss increase each candidate bit-width and keep ratio is expected to cause.

Measured once per base model over a few calibration batches, cached (``table_path``: beside a built-in
task's base model, under the cache root for a user's), and read by the integer program of
``autoprune.search.budget_ip``. The model is
measured in eval mode (BN on its running statistics, as the deployed model runs). L is the mean loss over
the calibration samples; a perturbation dW of a layer's n weights is expected to raise it, to second order
around a trained minimum (gradient ~ 0), by

    dL ~ 1/2 sum_i c_i dW_i^2

with a per-weight curvature c_i from one of two methods:

- ``hessian`` (HAWQ-V2/V3): c_i = Tr(H_l) / n for every weight of layer l, where H_l is the Hessian of L
  with respect to the layer's weights and Tr(H_l) its Hutchinson estimate E_v[v^T H_l v], v Rademacher
  (+-1), with H v from two passes of ``torch.autograd.grad`` (the second differentiates g . v). One H v per
  probe serves every layer at once: the cross-layer blocks of H average out of v_l^T (H v)_l. Each batch's
  estimate is clamped at 0 (the formula assumes a minimum, where H is positive semi-definite).
- ``fisher`` (empirical Fisher, squared gradients): c_i = F_ii = 1/N sum_s (d l_s / d W_i)^2 over the N
  calibration samples, with per-sample gradients from ``torch.func`` (vmap of grad).

- ``direct``: no model of the loss: L measured with the one perturbation applied, minus L (clamped at 0),
  one pass over the calibration batches per candidate. The second-order model holds for small perturbations;
  pruning a quarter of a layer's filters is not one (on the digits CNN the Hessian and Fisher predictions
  of keep-ratio increases are 30-200x below the measured validation-loss increase, of 2-bit weights ~10x),
  so ``direct`` is the one whose bits and widths are on the same scale for the integer program.

Perturbations:

- w_bits b: dW = delta * midrise_int(W, delta, b) - W with delta = midrise_delta(W, b) (the cost model's
  mid-rise quantizer, seed 000 App. A). 32 bits is float: dW = 0.
- keep ratio r of a channel group (``autoprune.prune.channel_groups``): the signal-norm pruner's choice, the
  C - keep_count(r, C) output filters of least squared norm summed over the group's members are zeroed:
  dW = -W on those rows of every member. This ignores what BN adds back to a zeroed channel (its shift) and
  the next layer's columns, which physical removal also drops; it ranks groups, it does not replay pruning.
- a_bits b of the features layer l reads: dx = Q(x) - x with the ``clip_uniform`` grid (seed 003 eq. 20-21)
  on each batch's own range, step = uniform_step(max|x|, b, signed = min x < 0). Per batch of B samples,
  with n_x = x.numel(): ``hessian`` dL_b = 1/2 Tr(H_x) / n_x ||dx||^2 (H_x: Hessian of the batch's mean loss
  in the batch's features, the same Hutchinson probes); ``fisher`` dL_b = B/2 sum (dL_b/dx)^2 dx^2, because a
  sample's features reach only its own loss, so d l_s / d x_s = B dL_b / d x_s. Batches are averaged by
  their number of samples. A layer that reads the network input has no a_bits entry (it reads
  ``input_bits``).

Summing these per layer and per group (no interaction between layers or between bits and width) is the
additive model of HAWQ-V3's integer program. The loss must average over the batch (CrossEntropyLoss does).
It is ``loss_fn(model(x), y)`` on ``(x, y)`` batches, or a task's own ``batch_loss(model, batch)`` on batches of
any shape whose first item (or the batch itself) is the model input: ``hessian`` and ``direct`` take either,
``fisher`` needs ``(x, y)`` to split a batch into samples.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import compressible_layers, reads_tensor
from autoprune.files import write_atomic
from autoprune.policy import FLOAT_BITS, load_mapping, parse_model
from autoprune.prune.structured import ChannelGroup, channel_groups, keep_count
from autoprune.quant.midrise import midrise_delta, midrise_int
from autoprune.quant.uniform import uniform_step, uniform_values

if TYPE_CHECKING:
    from autoprune.task import Task

TABLE_VERSION = 1
TABLE_FILE = "sensitivity.json"
METHODS = ("hessian", "fisher", "direct")
Method = Literal["hessian", "fisher", "direct"]
# On the trained digits CNN, direct ranks the (layer, bits) and (group, keep) candidates by their validation-loss
# increase with Spearman 0.88, the Hessian and Fisher models with 0.76: their pruning estimates are too small.
DEFAULT_METHOD: Method = "direct"
# Per-sample gradients are taken this many samples at a time, so memory stays at chunk x parameters.
FISHER_CHUNK = 16
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The mean loss of a model on one batch, as a task computes it (``Task.loss``).
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerSensitivity(_Frozen):
    """One Conv2d / Linear layer: predicted loss increase per weight and per activation bit-width."""

    params: int = Field(ge=1, description="n, the layer's weights")
    trace: float = Field(description="sum_i c_i: Tr(H_l) (hessian) or Tr(F_l) (fisher); 0 for direct")
    reads_input: bool = Field(description="reads the network input: its activation bits are input_bits")
    w_bits: dict[int, float] = Field(default_factory=dict)
    a_bits: dict[int, float] = Field(default_factory=dict)


class GroupSensitivity(_Frozen):
    """One channel group (one keep ratio): predicted loss increase per keep ratio."""

    layers: tuple[str, ...]
    channels: int = Field(ge=2)
    keep: dict[float, float] = Field(default_factory=dict)


class SensitivityTable(_Frozen):
    """What ``measure_sensitivity`` found; round-trips through JSON (dict keys come back as int / float)."""

    version: Literal[1] = TABLE_VERSION
    method: Method
    batches: int = Field(ge=1)
    samples: int = Field(ge=1)
    probes: int = Field(ge=0, description="Hutchinson probes per batch (0 for fisher)")
    seconds: float = Field(ge=0.0)
    model_digest: str = Field(description="weights_digest of the measured model: a retrained model is measured again")
    layers: dict[str, LayerSensitivity]
    groups: dict[str, GroupSensitivity] = Field(default_factory=dict)

    def covers(self, *, w_bits: Iterable[int], a_bits: Iterable[int], keep_ratios: Iterable[float]) -> bool:
        """Whether every candidate was measured (on every layer / group that takes it)."""
        return all(
            set(w_bits) <= set(layer.w_bits) and (layer.reads_input or set(a_bits) <= set(layer.a_bits))
            for layer in self.layers.values()
        ) and all(set(keep_ratios) <= set(group.keep) for group in self.groups.values())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "sensitivity table") -> "SensitivityTable":
        return parse_model(cls, data, source=source, shape="a mapping of sensitivity-table fields")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(load_mapping(path), source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_atomic(path, self.to_json())
        return path


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the Conv2d / Linear weights, names and shapes included."""
    digest = hashlib.sha256()
    for name, layer in compressible_layers(model).items():
        weight = layer.weight.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}".encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def expected_increase(curvature: torch.Tensor, perturbation: torch.Tensor) -> float:
    """1/2 sum_i c_i dW_i^2, in float64."""
    return 0.5 * float((curvature.to(torch.float64) * perturbation.to(torch.float64).square()).sum())


def quantization_perturbation(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(W) - W for the b-bit mid-rise quantizer; zero at 32 bits (float)."""
    w = weight.detach().to(torch.float64)
    if bits >= FLOAT_BITS:
        return torch.zeros_like(w)
    delta = midrise_delta(w, bits)
    return midrise_int(w, delta, bits) * delta - w


def act_perturbation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(x) - x on the clip_uniform grid of the tensor's own range; zero at 32 bits."""
    x = x.detach()
    if bits >= FLOAT_BITS:
        return torch.zeros_like(x)
    low, high = float(x.min()), float(x.max())
    signed = low < 0
    clip = max(-low, high) if signed else high
    step = uniform_step(clip, bits=bits, signed=signed)
    return uniform_values(x, step=step, bits=bits, signed=signed).to(torch.float64) - x.to(torch.float64)


def pruned_filters(weights: Sequence[torch.Tensor], keep_ratio: float) -> torch.Tensor:
    """Indices of the output filters signal-norm pruning removes at ``keep_ratio``: least squared norm
    summed over the group's members, ties keeping the lower index (as ``prune.structured.signal_norm``)."""
    signal = sum(w.detach().to(torch.float64).flatten(1).square().sum(1) for w in weights)
    channels = signal.numel()
    ranked = torch.argsort(signal, descending=True, stable=True)
    return ranked[keep_count(keep_ratio, channels):]


def _pruning_perturbation(weights: Mapping[str, torch.Tensor], members: Sequence[str], keep_ratio: float) -> dict[str, torch.Tensor]:
    """-W on the filters signal-norm pruning removes from the group ``members``, 0 elsewhere."""
    removed = pruned_filters([weights[name] for name in members], keep_ratio)
    perturbations = {}
    for name in members:
        weight = weights[name].detach().to(torch.float64)
        delta = torch.zeros_like(weight)
        delta[removed] = -weight[removed]
        perturbations[name] = delta
    return perturbations


class _DirectIncrease:
    """The ``direct`` method: the calibration loss measured with one perturbation applied, minus the base loss."""

    def __init__(self, model: nn.Module, batches: list[tuple[Any, int]], base: float, batch_loss: BatchLoss) -> None:
        self.model, self.batches, self.base, self.batch_loss = model, batches, base, batch_loss
        self.layers = compressible_layers(model)
        self.samples = sum(size for _, size in batches)

    @torch.no_grad()
    def _increase(self) -> float:
        total = math.fsum(float(self.batch_loss(self.model, batch)) * size for batch, size in self.batches)
        # A perturbation that happens to lower the calibration loss is noise, not a gain to chase.
        return max(0.0, total / self.samples - self.base)

    @torch.no_grad()
    def of_weights(self, perturbations: dict[str, torch.Tensor]) -> float:
        saved = {name: self.layers[name].weight.detach().clone() for name in perturbations}
        try:
            for name, delta in perturbations.items():
                self.layers[name].weight.add_(delta.to(saved[name]))
            return self._increase()
        finally:
            for name, weight in saved.items():
                self.layers[name].weight.copy_(weight)

    def of_features(self, name: str, bits: int) -> float:
        if bits >= FLOAT_BITS:
            return 0.0

        def quantize(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] + act_perturbation(args[0], bits).to(args[0]), *args[1:])

        handle = self.layers[name].register_forward_pre_hook(quantize)
        try:
            return self._increase()
        finally:
            handle.remove()


class _Accumulator:
    """Sample-weighted sums over batches of the curvature and of the activation-bit increases."""

    def __init__(self, names: list[str], weights: dict[str, torch.Tensor], a_bits: Sequence[int]) -> None:
        self.samples = 0
        self.curvature = {n: torch.zeros_like(weights[n], dtype=torch.float64) for n in names}
        self.act = {n: {b: 0.0 for b in a_bits} for n in names}
        self.readers: set[str] = set()


def _probe_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(t)


def _hessian_batch(
    acc: _Accumulator, batch: int, acts: dict[str, torch.Tensor], loss: torch.Tensor,
    weights: dict[str, torch.Tensor], a_bits: Sequence[int], probes: int, generator: torch.Generator,
) -> None:
    names = list(weights)
    act_names = [n for n in names if n in acts]
    variables = [weights[n] for n in names] + [acts[n] for n in act_names]
    grads = torch.autograd.grad(loss, variables, create_graph=True, allow_unused=True)
    # A variable whose gradient does not depend on the variables (or that is unused) has no curvature.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    traces = torch.zeros(len(variables), dtype=torch.float64)
    for _ in range(probes):
        v = [_probe_like(variables[i], generator) for i in live]
        hv = torch.autograd.grad([grads[i] for i in live], [variables[i] for i in live], grad_outputs=v, retain_graph=True, allow_unused=True)
        for i, vi, hvi in zip(live, v, hv):
            if hvi is not None:
                traces[i] += float((vi.double() * hvi.double()).sum())
    traces /= max(probes, 1)
    # HAWQ's model assumes a minimum (H positive semi-definite); a negative estimate, from probe noise or a
    # saddle, predicts no increase rather than a gain the integer program would chase.
    traces.clamp_(min=0.0)
    for i, name in enumerate(names):
        acc.curvature[name] += batch * traces[i] / weights[name].numel()
    for j, name in enumerate(act_names):
        features = acts[name]
        per_element = float(traces[len(names) + j]) / features.numel()
        for b in a_bits:
            acc.act[name][b] += batch * 0.5 * per_element * float(act_perturbation(features, b).square().sum())


def _fisher_batch(
    model: nn.Module, acc: _Accumulator, x: torch.Tensor, y: torch.Tensor, acts: dict[str, torch.Tensor],
    loss: torch.Tensor, weights: dict[str, torch.Tensor], a_bits: Sequence[int], loss_fn: LossFn,
) -> None:
    from torch.func import functional_call, grad, vmap

    act_names = list(acts)
    batch = x.shape[0]
    if act_names:
        act_grads = torch.autograd.grad(loss, [acts[n] for n in act_names], allow_unused=True)
        for name, g in zip(act_names, act_grads):
            if g is None:
                continue
            g2 = g.detach().double().square()
            for b in a_bits:
                # The batch's increase B/2 sum g^2 dx^2, weighted by its B samples.
                acc.act[name][b] += batch * batch / 2 * float((g2 * act_perturbation(acts[name], b).square()).sum())
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    keys = {f"{name}.weight": name for name in weights}

    def sample_loss(chosen: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**fixed, **chosen}, (xs.unsqueeze(0),)), ys.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=FISHER_CHUNK)(
        {key: fixed[key] for key in keys}, x, y
    )
    for key, name in keys.items():
        acc.curvature[name] += per_sample[key].detach().double().square().sum(0)


def measure_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: Method = DEFAULT_METHOD,
    w_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    a_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    keep_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    probes: int = 16,
    loss_fn: LossFn | None = None,
    batch_loss: BatchLoss | None = None,
    seed: int = 0,
    groups: Sequence[ChannelGroup] | None = None,
) -> SensitivityTable:
    """Predicted loss increase of every candidate on every Conv2d / Linear layer and channel group.

    ``batches`` are ``(x, y)`` scored by ``loss_fn`` (default cross-entropy), or anything ``batch_loss``
    scores. ``groups`` defaults to ``channel_groups`` of the model (traced on the first batch); give ``()``
    for none. The model's weights, modes and ``requires_grad`` flags are left as they were.
    """
    from autoprune.task import batch_inputs

    if method not in METHODS:
        raise AutopruneError("sensitivity method", method, f"is not known (known: {', '.join(METHODS)})")
    if method == "fisher" and batch_loss is not None:
        raise AutopruneError("sensitivity method", method, "needs (x, y) batches to take per-sample gradients: a task's own loss takes hessian or direct")
    if method == "hessian" and probes < 1:
        raise AutopruneError("probes", probes, "must be at least 1 Hutchinson probe per batch")
    for bits in (*w_bits, *a_bits):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= FLOAT_BITS:
            raise AutopruneError("bits", bits, f"must be an integer number of bits in 1..{FLOAT_BITS}")
    for ratio in keep_ratios:
        if not 0.0 < ratio <= 1.0:
            raise AutopruneError("keep_ratios", ratio, "must be a keep ratio in (0, 1]")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if batch_loss is None:
        batch_loss = lambda model, batch: loss_fn(model(batch[0]), batch[1])  # noqa: E731
    start = time.perf_counter()
    layers = compressible_layers(model)
    names = list(layers)
    weights = {n: m.weight for n, m in layers.items()}
    acc = _Accumulator(names, {n: w.detach() for n, w in weights.items()}, a_bits)
    generator = torch.Generator().manual_seed(seed)
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    batch_count = 0
    first_input: torch.Tensor | None = None
    kept: list[tuple[Any, int]] = []
    base_sum = 0.0
    try:
        model.eval()
        measured = {id(w) for w in weights.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in measured)
        for batch in batches:
            x = batch_inputs(batch)
            size = x.shape[0]
            first_input = x[:1] if first_input is None else first_input
            acts: dict[str, torch.Tensor] = {}

            def capture(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
                def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                    if reads_tensor(args[0], x):
                        acc.readers.add(name)
                    elif a_bits and args[0].requires_grad:
                        acts[name] = args[0]
                return hook

            handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers.items()]
            try:
                with torch.enable_grad():
                    loss = batch_loss(model, batch)
            finally:
                for handle in handles:
                    handle.remove()
            if method == "hessian":
                _hessian_batch(acc, size, acts, loss, weights, a_bits, probes, generator)
            elif method == "fisher":
                _fisher_batch(model, acc, x, batch[1], acts, loss, weights, a_bits, loss_fn)
            else:
                kept.append((batch, size))
                base_sum += float(loss.detach()) * size
            acc.samples += size
            batch_count += 1
        if first_input is None:
            raise AutopruneError("calibration batches", 0, "must hold at least one batch")
        if groups is None:
            groups = channel_groups(model, example_input=first_input)
        if method == "direct":
            # Measured while the model is still in eval mode; restored by the finally below.
            direct = _DirectIncrease(model, kept, base_sum / acc.samples, batch_loss)
            trace = {name: 0.0 for name in names}
            w_pred = {name: {b: direct.of_weights({name: quantization_perturbation(weights[name], b)}) for b in w_bits} for name in names}
            a_pred = {name: {b: direct.of_features(name, b) for b in a_bits} for name in names}
            k_pred = {
                group.name: {float(r): direct.of_weights(_pruning_perturbation(weights, group.layers, r)) for r in keep_ratios}
                for group in groups
            }
    finally:
        for module, training in modes.items():
            module.training = training
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if method != "direct":
        curvature = {n: c / acc.samples for n, c in acc.curvature.items()}
        trace = {name: float(curvature[name].sum()) for name in names}
        w_pred = {name: {b: expected_increase(curvature[name], quantization_perturbation(weights[name], b)) for b in w_bits} for name in names}
        a_pred = {name: {b: (acc.act[name][b] / acc.samples if b < FLOAT_BITS else 0.0) for b in a_bits} for name in names}
        k_pred = {
            group.name: {
                float(r): math.fsum(expected_increase(curvature[n], d) for n, d in _pruning_perturbation(weights, group.layers, r).items())
                for r in keep_ratios
            }
            for group in groups
        }
    return SensitivityTable(
        method=method, batches=batch_count, samples=acc.samples, probes=probes if method == "hessian" else 0,
        seconds=time.perf_counter() - start, model_digest=weights_digest(model),
        layers={
            name: LayerSensitivity(
                params=weights[name].numel(), trace=trace[name], reads_input=name in acc.readers,
                w_bits=w_pred[name], a_bits={} if name in acc.readers else a_pred[name],
            )
            for name in names
        },
        groups={group.name: GroupSensitivity(layers=group.layers, channels=group.channels, keep=k_pred[group.name]) for group in groups},
    )


def calibration_batches(task: "Task", *, batches: int, batch_size: int = 64) -> list[Any]:
    """The first ``batches`` batches of the task's training split: a built-in task's in its seeded order, a
    user task's as its loader gives them (a dataset in its own order), on the task's device."""
    builtin = task.spec is not None
    loader = task.loader("train", batch_size=batch_size, shuffle=builtin, seed=task.spec.seed if builtin else 0)
    taken = []
    for batch in loader:
        if len(taken) == batches:
            break
        taken.append(batch)
    return taken


def table_path(task: "Task", model: nn.Module) -> Path:
    """A built-in task's table sits beside its cached base model; a user task's under the cache root, named
    by the task's identity and the weights (a user's model has no cache folder of its own)."""
    if task.spec is not None:
        return task.cache_dir() / TABLE_FILE
    from autoprune.files import cache_root

    key = hashlib.sha256(f"{task.key()}:{weights_digest(model)}".encode()).hexdigest()[:16]
    return cache_root() / "sensitivity" / f"{key}.json"


def load_or_measure(
    model: nn.Module,
    task: "Task",
    *,
    method: Method = DEFAULT_METHOD,
    batches: int = 4,
    w_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    a_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    keep_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    probes: int = 16,
) -> SensitivityTable:
    """The cached table of ``task``'s base model ``model`` (``table_path``), measured and written atomically
    when missing, made on other weights, with another method or batch count, or lacking a candidate. An
    unreadable cached file is measured again, not an error: the cache is ours, not the user's. A user task's
    loss is its own (``Task.loss``), built-in tasks' cross-entropy."""
    path = table_path(task, model)
    if path.is_file():
        try:
            cached: SensitivityTable | None = SensitivityTable.load(path)
        except AutopruneError:
            cached = None
        if (
            cached is not None and cached.model_digest == weights_digest(model) and cached.method == method
            and cached.batches == batches and cached.covers(w_bits=w_bits, a_bits=a_bits, keep_ratios=keep_ratios)
        ):
            return cached
    # Measured where the trials run, beside the batches: the base model is kept on the CPU, and a large
    # model's hundreds of passes want the accelerator.
    table = measure_sensitivity(
        copy.deepcopy(model).to(task.device), calibration_batches(task, batches=batches),
        method=method, w_bits=w_bits, a_bits=a_bits, keep_ratios=keep_ratios, probes=probes,
        seed=task.spec.seed if task.spec else 0, batch_loss=None if task.spec else task.loss,
    )
    table.save(path)
    return table


def sensitivity_rows(table: SensitivityTable) -> list[dict[str, Any]]:
    """One row per layer for ``autoprune signals``: curvature, the increase per weight and activation bits,
    and, on a group's first layer, the increase per keep ratio (empty on the other layers)."""
    keep_ratios = sorted({r for group in table.groups.values() for r in group.keep})
    rows = []
    for name, layer in table.layers.items():
        row: dict[str, Any] = {"name": name, "trace/n": layer.trace / layer.params}
        row.update({f"dL_w{b}": v for b, v in sorted(layer.w_bits.items())})
        row.update({f"dL_a{b}": v for b, v in sorted(layer.a_bits.items())})
        group = table.groups.get(name)
        row.update({f"dL_k{r:g}": (group.keep.get(r, "") if group else "") for r in keep_ratios})
        rows.append(row)
    return rows


def rich_table(table: SensitivityTable, *, title: str | None = None) -> Any:
    """``sensitivity_rows`` as a ``rich.table.Table`` (rich is a dependency of the CLI)."""
    from rich.table import Table

    rows = sensitivity_rows(table)
    out = Table(title=title or f"predicted loss increase ({table.method}, {table.batches} batches, {table.samples} samples)")
    columns = list(dict.fromkeys(column for row in rows for column in row))
    for column in columns:
        out.add_column(column, justify="left" if column == "name" else "right")
    for row in rows:
        cells = [row.get(column, "") for column in columns]
        out.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells))
    return out
