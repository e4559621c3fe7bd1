"""The DJPQ model: a float model with a learned quantizer per weight and per read activation, and a VIBNet
gate per channel group; its BOPs estimate (eq. 14-16), its hard pruning (eq. 18) and its safetensors file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.func import functional_call

from autoprune.cost import LayerQuant, measure_cost
from autoprune.djpq.gates import Gate
from autoprune.djpq.quantizer import LearnedQuantizer
from autoprune.errors import AutopruneError
from autoprune.models import COMPRESSIBLE, compressible_layers, input_readers, probing
from autoprune.files import atomic_path, write_atomic
from autoprune.policy import FLOAT_BITS, LayerPolicy, Policy
from autoprune.prune import LayerPruning, StructuredRecord, replay_structured
from autoprune.prune.structured import dependency_graph, groups_in_graph
from autoprune.quant.uniform import fake_uniform, uniform_step

RECORD_METHOD = "djpq"
_META_KEY = "djpq"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GateSpec(_Frozen):
    """One channel group's gate: the layers whose outputs it multiplies, where (``sites``), and its width."""

    layers: tuple[str, ...]
    sites: tuple[str, ...]
    channels: int


class LayerSpec(_Frozen):
    """What the BOPs estimate needs of one Conv2d / Linear layer of the float model."""

    macs: float
    group: str | None
    reads: str | None
    input_reader: bool
    depthwise: bool
    signed_input: bool
    act_range: float


class Layout(_Frozen):
    """Everything that shapes a DJPQ model besides its tensors: enough to rebuild it from a base model."""

    input_shape: tuple[int, ...]
    layers: dict[str, LayerSpec]
    gates: dict[str, GateSpec]
    input_bits: int
    init_w_bits: int
    init_a_bits: int
    q_s_ratio: float
    pow2: bool
    alpha_th: float
    tau: float
    init_log_sigma2: float


def _key(name: str) -> str:
    # ModuleDict keys cannot hold dots; "/" keeps the module name readable in the state dict.
    return name.replace(".", "/")


def build_layout(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    batches: Iterable[torch.Tensor],
    input_bits: int,
    init_w_bits: int,
    init_a_bits: int,
    q_s_ratio: float,
    pow2: bool,
    alpha_th: float,
    tau: float,
    init_log_sigma2: float,
) -> Layout:
    """Trace the float model: channel groups and what each layer reads, gate sites, activation ranges, MACs."""
    example = torch.zeros(1, *input_shape)
    graph = dependency_graph(model, example)
    groups = groups_in_graph(model, graph)
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    layers = compressible_layers(model)
    group_of = {layer: group.name for group in groups for layer in group.layers}
    reads: dict[str, str] = {}
    for group in groups:
        root = modules[group.name]
        coupled = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, [0])
        for dep, _ in coupled:
            target = dep.target.module
            if graph.is_in_channel_pruning_fn(dep.handler) and isinstance(target, COMPRESSIBLE):
                reads[names[target]] = group.name
    sites = _gate_sites(model, example)
    low, high = _input_ranges(model, layers, batches)
    readers = input_readers(model, input_shape=tuple(input_shape))  # type: ignore[arg-type]
    report = measure_cost(model, input_shape=tuple(input_shape))  # type: ignore[arg-type]
    macs = {row.name: float(row.dense_params * math.prod(row.out_hw)) for row in report.layers}
    specs = {
        name: LayerSpec(
            macs=macs[name],
            group=group_of.get(name),
            reads=reads.get(name),
            input_reader=name in readers,
            depthwise=isinstance(layer, (nn.Conv1d, nn.Conv2d)) and 1 < layer.groups == layer.in_channels,
            signed_input=low.get(name, 0.0) < 0.0,
            act_range=high.get(name, 0.0) or 1.0,
        )
        for name, layer in layers.items() if name in macs
    }
    gates = {
        group.name: GateSpec(layers=group.layers, sites=tuple(sites[layer] for layer in group.layers), channels=group.channels)
        for group in groups
    }
    return Layout(
        input_shape=tuple(input_shape), layers=specs, gates=gates, input_bits=input_bits, init_w_bits=init_w_bits, init_a_bits=init_a_bits,
        q_s_ratio=q_s_ratio, pow2=pow2, alpha_th=alpha_th, tau=tau, init_log_sigma2=init_log_sigma2,
    )


def _gate_sites(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Where each layer's gate multiplies: the BatchNorm reading its output if there is one, else the layer.

    A gate before the BN would be normalised away by it; after the BN (eq. 9's f_l includes it) it scales
    what the next layer and the residual add see.
    """
    outputs: dict[str, torch.Tensor] = {}
    norm_inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            handles.append(module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(lambda _m, args, _o, name=name: norm_inputs.__setitem__(name, args[0])))
    with probing(model, handles):
        model(example)
    return {
        layer: next((norm for norm, seen in norm_inputs.items() if seen is out), layer)
        for layer, out in outputs.items()
    }


def _input_ranges(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer, the smallest value and the largest magnitude it reads on the calibration batches."""
    low: dict[str, float] = {}
    high: dict[str, float] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        low[name] = min(low.get(name, math.inf), float(x.min()))
        high[name] = max(high.get(name, 0.0), float(x.abs().max()))

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: observe(name, args[0])) for name, layer in layers.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with probing(model, handles):
        for x in batches:
            model(x.to(device))
    return low, high


class DJPQModel(nn.Module):
    """``model`` (a plain float model, its weights the latent weights w_l) run with the DJPQ transforms.

    The weights are quantized through ``torch.func.functional_call`` and the activations by forward pre-hooks,
    so the inner model keeps plain parameters that structured pruning and ``replay_structured`` can handle.
    ``quantized`` is False while only the gates train (the first stage of the two-stage baseline).
    """

    def __init__(self, model: nn.Module, layout: Layout, *, record: StructuredRecord | None = None, quantized: bool = True) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.quantized = quantized
        self.record = record
        layers = compressible_layers(model)
        self.weight_quant = nn.ModuleDict({
            _key(name): LearnedQuantizer(
                q_m=float(layers[name].weight.detach().abs().max()) or 1.0, bits=layout.init_w_bits, signed=True,
                learn_t=True, q_s_ratio=layout.q_s_ratio, pow2=layout.pow2,
            )
            for name in layout.layers
        })
        self.act_quant = nn.ModuleDict({
            _key(name): LearnedQuantizer(
                q_m=spec.act_range, bits=layout.init_a_bits, signed=spec.signed_input, learn_t=False,
                q_s_ratio=layout.q_s_ratio, pow2=layout.pow2,
            )
            for name, spec in layout.layers.items() if not spec.input_reader
        })
        self.gates = nn.ModuleDict({
            _key(name): Gate(spec.channels, log_sigma2=layout.init_log_sigma2, alpha_th=layout.alpha_th)
            for name, spec in layout.gates.items()
        })
        if record is not None:
            for name, spec in layout.gates.items():
                if spec.layers[0] in record.layers:
                    self.gate(name).select(record.layers[spec.layers[0]].kept)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    # the pieces, by module name -------------------------------------------------------------------

    def gate(self, group: str) -> Gate:
        return self.gates[_key(group)]  # type: ignore[return-value]

    def weight_quantizer(self, layer: str) -> LearnedQuantizer:
        return self.weight_quant[_key(layer)]  # type: ignore[return-value]

    def act_quantizer(self, layer: str) -> LearnedQuantizer | None:
        return self.act_quant[_key(layer)] if _key(layer) in self.act_quant else None  # type: ignore[return-value]

    def quantizers(self) -> list[LearnedQuantizer]:
        return [*self.weight_quant.values(), *self.act_quant.values()]  # type: ignore[list-item]

    # forward ----------------------------------------------------------------------------------------

    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        # Gates draw z at the model's entry, so a direct call of ``self.model`` (the cost model's trace) is gated too.
        self._handles.append(self.model.register_forward_pre_hook(lambda _m, args: self._sample_gates(args[0].shape[0])))
        for group, spec in self.layout.gates.items():
            gate = self.gate(group)
            for site in dict.fromkeys(spec.sites):
                self._handles.append(modules[site].register_forward_hook(lambda _m, _a, out, gate=gate: gate(out)))
        for name, spec in self.layout.layers.items():
            if spec.input_reader and self.layout.input_bits < FLOAT_BITS:
                # what the BOPs charge for the input (``input_bits``) and what the replay's calibrated uniform
                # input quantizer does: the grid of max|x| over the layout's batches, fixed (App. B.3)
                step = uniform_step(spec.act_range, bits=self.layout.input_bits, signed=spec.signed_input)
                self._handles.append(modules[name].register_forward_pre_hook(
                    lambda _m, args, step=step, signed=spec.signed_input: (
                        fake_uniform(args[0], step=step, bits=self.layout.input_bits, signed=signed), *args[1:]
                    ) if self.quantized else None
                ))
            quantizer = self.act_quantizer(name)
            if quantizer is not None:
                self._handles.append(modules[name].register_forward_pre_hook(
                    lambda _m, args, quantizer=quantizer: (quantizer(args[0]), *args[1:]) if self.quantized else None
                ))

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _sample_gates(self, batch: int) -> None:
        for gate in self.gates.values():
            gate.sample(batch)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self.model(x)
        layers = compressible_layers(self.model)
        weights = {f"{name}.weight": self.weight_quantizer(name)(layers[name].weight) for name in self.layout.layers}
        return functional_call(self.model, weights, (x,))

    # eq. 13-16 --------------------------------------------------------------------------------------

    def vib(self) -> torch.Tensor:
        """Eq. 13's regulariser, one gate per channel group."""
        terms = [gate.vib() for gate in self.gates.values()]  # type: ignore[operator]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def keep_ratios(self, *, soft: bool) -> dict[str, torch.Tensor]:
        """Per group, 1 - p_l relative to the float model: eq. 19 (soft, while the gate trains) or eq. 18 (hard),
        times the fraction of the float model's channels still present."""
        ratios = {}
        for group, spec in self.layout.gates.items():
            gate = self.gate(group)
            # Frozen gates (evaluation, or stage 2 of the two-stage baseline) are already decided: eq. 18.
            kept = gate.soft_keep(self.layout.tau) if soft and gate.training else gate.kept().to(gate.mu.dtype).mean()
            ratios[group] = kept * gate.mu.numel() / spec.channels
        return ratios

    def bits(self, *, soft: bool) -> dict[str, tuple[torch.Tensor | int, torch.Tensor | int]]:
        """Per layer (b_w, b_a): eq. 3 / 4 continuous (soft) or as integers; the input's bits for its readers."""
        out: dict[str, tuple[torch.Tensor | int, torch.Tensor | int]] = {}
        for name, spec in self.layout.layers.items():
            if not self.quantized:
                out[name] = (FLOAT_BITS, FLOAT_BITS)
                continue
            wq, aq = self.weight_quantizer(name), self.act_quantizer(name)
            w = wq.continuous_bits() if soft else wq.bits()
            a = self.layout.input_bits if aq is None else (aq.continuous_bits() if soft else aq.bits())
            out[name] = (w, a)
        return out

    def bops(self, *, soft: bool = True) -> torch.Tensor:
        """Eq. 16 summed: MACs_l (eq. 15, the float model's MACs times the keep ratios of the channels the layer
        writes and reads) x b_w,l x b_a,l-1. A depthwise conv reads the channels it writes: one ratio."""
        keep = self.keep_ratios(soft=soft)
        bits = self.bits(soft=soft)
        total = torch.zeros((), dtype=torch.float64)
        for name, spec in self.layout.layers.items():
            k_out = keep[spec.group] if spec.group else 1.0
            k_in = keep[spec.reads] if spec.reads and not spec.depthwise else 1.0
            w, a = bits[name]
            total = total + spec.macs * k_out * k_in * w * a
        return total

    # eq. 18: hard pruning -------------------------------------------------------------------------------

    def prune(self, *, example_input: torch.Tensor) -> StructuredRecord:
        """Remove every channel with alpha < alpha_th from the model (a group keeps at least its best channel)."""
        if self.record is not None:
            raise AutopruneError("djpq model", "pruned", "is already pruned; a DJPQ model is pruned once, at the end of its gate training")
        layers: dict[str, LayerPruning] = {}
        kept_of: dict[str, list[int]] = {}
        for group, spec in self.layout.gates.items():
            gate = self.gate(group)
            kept = torch.nonzero(gate.kept()).flatten().tolist() or [int(gate.log_alpha().argmax())]
            if len(kept) == spec.channels:
                continue
            kept_of[group] = kept
            for layer in spec.layers:
                layers[layer] = LayerPruning(kept=kept, before=spec.channels, after=len(kept))
        record = StructuredRecord(method=RECORD_METHOD, layers=layers)
        self._uninstall()
        try:
            replay_structured(self.model, record, example_input=example_input)
        finally:
            for group in self.layout.gates:
                self.gate(group).select(kept_of.get(group, list(range(self.gate(group).mu.numel()))))
            self._install()
        self.record = record
        return record

    # what it learned ----------------------------------------------------------------------------------

    def policy(self, *, order: str = "joint") -> Policy:
        """The learned widths and bits as a policy our own quantizers and pruner can replay."""
        keep = {group: float(ratio) for group, ratio in self.keep_ratios(soft=False).items()}
        bits = self.bits(soft=False)
        layers = {}
        for name, spec in self.layout.layers.items():
            w, a = bits[name]
            layers[name] = LayerPolicy(keep_ratio=keep[spec.group] if spec.group else 1.0, w_bits=int(w), a_bits=int(a))
        return Policy(layers=layers, order=order, input_bits=self.layout.input_bits, pow2_bits=self.layout.pow2)  # type: ignore[arg-type]

    def cost_layers(self) -> dict[str, LayerQuant]:
        """The learned bits as cost-model settings for ``measure_cost(self.model, ...)``, which counts the pruned
        model's MACs and reads its latent float weights (not the non-linear levels) at these bits."""
        return {name: LayerQuant(w_bits=int(w), a_bits=int(a)) for name, (w, a) in self.bits(soft=False).items()}

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Restart every quantizer at the initial bits from the ranges the model has now (two-stage, stage 2):
        weights from their largest magnitude, activations from the largest value read on ``batches``."""
        layers = compressible_layers(self.model)
        quantized, self.quantized = self.quantized, False
        _, high = _input_ranges(self, layers, batches)
        self.quantized = quantized
        for name in self.layout.layers:
            q_m = float(layers[name].weight.detach().abs().max()) or 1.0
            self.weight_quantizer(name).reset(q_m=q_m, bits=self.layout.init_w_bits, q_s_ratio=self.layout.q_s_ratio)
            act = self.act_quantizer(name)
            if act is not None:
                act.reset(q_m=high.get(name, 0.0) or 1.0, bits=self.layout.init_a_bits, q_s_ratio=self.layout.q_s_ratio)

    def constrain(self) -> None:
        for quantizer in self.quantizers():
            quantizer.constrain()

    # file -------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """The weights, learned quantizer parameters and gates as safetensors; layout and record as metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            _META_KEY: json.dumps({
                "layout": self.layout.model_dump(mode="json"),
                "record": self.record.to_dict() if self.record is not None else None,
                "quantized": self.quantized,
            }),
        }
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        write_atomic(path.with_suffix(".policy.json"), self.policy().to_json())
        return path

    @classmethod
    def load(cls, path: str | Path, base_model: nn.Module) -> "DJPQModel":
        """Rebuild a saved DJPQ model on a copy of the float model it was learned from; nothing is unpickled."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise AutopruneError("file", str(path), "does not exist")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if _META_KEY not in meta:
            raise AutopruneError("model file", str(path), "is not a DJPQ model saved by autoprune")
        data = json.loads(meta[_META_KEY])
        layout = Layout.model_validate(data["layout"])
        record = StructuredRecord.from_dict(data["record"]) if data["record"] is not None else None
        model = copy.deepcopy(base_model)
        if record is not None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            replay_structured(model, record, example_input=torch.zeros(1, *layout.input_shape, device=device))
        net = cls(model, layout, record=record, quantized=bool(data["quantized"]))
        net.load_state_dict(load_file(str(path)), strict=True)
        return net.eval()
