"""Entry points: ``learn_policy`` (DJPQ, seed 002 Alg. 1) and ``learn_two_stage`` (VIBNet, then DQ; sec. 4.2)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from autoprune.djpq.net import DJPQModel, build_layout
from autoprune.models import check_supported
from autoprune.policy import FLOAT_BITS, Policy, parse_model
from autoprune.prune import StructuredRecord
from autoprune.task import batch_inputs

if TYPE_CHECKING:
    from autoprune.task import Task


class DJPQConfig(BaseModel):
    """One DJPQ run. Defaults follow seed 002 App. B.3 for VGG7 (Adam, initial bits 6, learning-rate scalings
    10 for the gates and 0.05 for the quantizers, alpha_th 1e-3); beta and gamma are the strengths to sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(1e-9, ge=0.0, description="strength of the BOPs term of eq. 17")
    gamma: float = Field(1e-6, ge=0.0, description="strength of the VIB term of eq. 13")
    steps: int = Field(300, ge=1, le=10_000_000, description="training steps (each stage of the two-stage baseline)")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Adam learning rate of the weights")
    gate_lr_scale: float = Field(10.0, gt=0.0, description="learning-rate scaling of the gates (mu, log sigma^2)")
    quant_lr_scale: float = Field(0.05, gt=0.0, description="learning-rate scaling of q_m, t and d")
    batch_size: int = Field(64, ge=1)
    pow2: bool = Field(False, description="power-of-two bits (sec. 3.5, Alg. 2)")
    alpha_th: float = Field(1e-3, gt=0.0, description="a channel with mu^2 / sigma^2 below this is pruned (eq. 18)")
    tau: float = Field(1.0, gt=0.0, description="temperature of eq. 19's sigmoid, on log alpha")
    init_w_bits: int = Field(6, ge=2, le=FLOAT_BITS, description="initial weight bits (eq. 3 needs 2 for a level)")
    init_a_bits: int = Field(6, ge=1, le=FLOAT_BITS, description="initial activation bits")
    input_bits: int = Field(8, ge=1, le=FLOAT_BITS, description="bits of the network input (App. B.3)")
    q_s_ratio: float = Field(1e-3, gt=0.0, lt=1.0, description="fixed q_s as a fraction of the initial q_m")
    init_log_sigma2: float = Field(
        -4.0, description="initial log sigma^2 of the gates (mu starts at 1, so alpha = 55): low enough that a few "
        "hundred steps can drive an unneeded channel below alpha_th = 1e-3, high enough to keep the gate noise at 0.14",
    )
    calibration_batches: int = Field(4, ge=1, description="batches that set the initial activation ranges")
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "djpq config") -> "DJPQConfig":
        """Validate a mapping (a search space's sampled values, a YAML block); bad input is one AutopruneError."""
        return parse_model(cls, data, source=source, shape="a mapping of DJPQ settings")


class CurvePoint(BaseModel):
    """One training step: the loss and its terms (unscaled), the BOPs estimate and the mean keep ratio."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int
    stage: Literal["joint", "prune", "quantize"]
    loss: float
    ce: float
    vib: float
    bops: float
    keep: float


@dataclass
class DJPQResult:
    """What a DJPQ (or two-stage) run learned.

    ``policy``: per layer keep_ratio, w_bits and a_bits, for ``compress`` (our quantizers and pruner);
    ``model``: the exact pruned DJPQ model (``model.save(path)``, ``DJPQModel.load(path, base_model)``);
    ``structured``: the channels it removed, replayable on the base model; ``curve``: one point per step.
    """

    policy: Policy
    model: DJPQModel
    structured: StructuredRecord
    curve: list[CurvePoint] = field(default_factory=list)
    strategy: Literal["djpq", "two_stage"] = "djpq"
    seconds: float = 0.0

    def bops(self) -> float:
        """Eq. 16 summed at the learned integer bits and the kept channels."""
        return float(self.model.bops(soft=False))

    def cost(self, input_shape: tuple[int, ...]) -> Any:
        """The cost model on the learned model as it is: the pruned model's MACs at the learned bits (its latent
        weights read at those bits), the input at ``input_bits``; the same report a compressed policy gets."""
        from autoprune.cost import measure_cost
        from autoprune.device import device_of

        # The hooks hold the DJPQ model's own gates and quantizers, so the model is traced where it is, on the CPU.
        home = device_of(self.model)
        self.model.cpu()
        try:
            return measure_cost(self.model.model, input_shape=input_shape, layers=self.model.cost_layers(), input_bits=self.model.layout.input_bits)
        finally:
            self.model.to(home)


def train_batches(task: "Task", *, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless shuffled batches of the task's training split, on its device: the only place data is read."""
    from autoprune.task import cycle

    return cycle(task.loader("train", batch_size=batch_size, shuffle=True, seed=seed))


def learn_policy(model: nn.Module, *, task: "Task", config: DJPQConfig) -> DJPQResult:
    """DJPQ: train gates, quantizers and weights of a copy of ``model`` on eq. 17 (the task's loss as its
    first term), on the task's device, then prune (eq. 18)."""
    start = time.perf_counter()
    net, batches, example = _prepare(model, task=task, config=config, quantized=True)
    curve = _train(net, batches, task, config, stage="joint", beta=config.beta, gamma=config.gamma, first_step=0)
    net.eval()
    record = net.prune(example_input=example)
    return DJPQResult(net.policy(order="joint"), net, record, curve, "djpq", time.perf_counter() - start)


def learn_two_stage(model: nn.Module, *, task: "Task", config: DJPQConfig) -> DJPQResult:
    """The two-stage baseline of sec. 4.2: VIBNet pruning (CE + gamma x VIB, float) for ``steps``, hard pruning,
    then mixed-precision quantization of the pruned model (CE + beta x BOPs, gates frozen) for ``steps``."""
    start = time.perf_counter()
    net, batches, example = _prepare(model, task=task, config=config, quantized=False)
    curve = _train(net, batches, task, config, stage="prune", beta=0.0, gamma=config.gamma, first_step=0)
    net.eval()
    record = net.prune(example_input=example)
    net.quantized = True
    net.calibrate(batch_inputs(batch) for batch in _take(batches, config.calibration_batches))
    curve += _train(net, batches, task, config, stage="quantize", beta=config.beta, gamma=0.0, first_step=config.steps)
    net.eval()
    return DJPQResult(net.policy(order="prune_then_quantize"), net, record, curve, "two_stage", time.perf_counter() - start)


def _prepare(model: nn.Module, *, task: "Task", config: DJPQConfig, quantized: bool) -> tuple[DJPQModel, Iterator[Any], torch.Tensor]:
    check_supported(model)
    torch.manual_seed(config.seed)
    # The layout is traced on the CPU (Torch-Pruning's graph and the cost model); the copy moves after.
    float_model = copy.deepcopy(model).cpu().eval()
    shape = tuple(task.input_shape)
    calibration = [batch_inputs(batch).cpu() for batch in _take(train_batches(task, batch_size=config.batch_size, seed=config.seed + 1), config.calibration_batches)]
    layout = build_layout(
        float_model, input_shape=shape, batches=calibration, input_bits=config.input_bits, init_w_bits=config.init_w_bits,
        init_a_bits=config.init_a_bits, q_s_ratio=config.q_s_ratio, pow2=config.pow2, alpha_th=config.alpha_th,
        tau=config.tau, init_log_sigma2=config.init_log_sigma2,
    )
    net = DJPQModel(float_model, layout, quantized=quantized).to(task.device)
    batches = train_batches(task, batch_size=config.batch_size, seed=config.seed)
    return net, batches, torch.zeros(1, *shape, device=task.device)


def _take(batches: Iterator[Any], count: int) -> list[Any]:
    return [next(batches) for _ in range(count)]


def _train(
    net: DJPQModel,
    batches: Iterator[Any],
    task: "Task",
    config: DJPQConfig,
    *,
    stage: Literal["joint", "prune", "quantize"],
    beta: float,
    gamma: float,
    first_step: int,
) -> list[CurvePoint]:
    """Alg. 1 for ``config.steps`` steps. Gates learn unless ``stage`` is quantize; quantizers unless prune."""
    learn_gates, learn_quant = stage != "quantize", stage != "prune"
    groups: list[dict[str, Any]] = [{"params": [p for p in net.model.parameters() if p.requires_grad], "lr": config.lr}]
    gate_params = [p for gate in net.gates.values() for p in gate.parameters()]
    quant_params = [p for q in net.quantizers() for p in q.parameters() if p.requires_grad]
    if learn_gates and gate_params:
        groups.append({"params": gate_params, "lr": config.lr * config.gate_lr_scale})
    if learn_quant and quant_params:
        groups.append({"params": quant_params, "lr": config.lr * config.quant_lr_scale})
    for p in gate_params:
        p.requires_grad_(learn_gates)
    optimizer = torch.optim.Adam(groups)
    curve = []
    for step in range(first_step, first_step + config.steps):
        net.train()
        if not learn_gates:
            for gate in net.gates.values():
                gate.eval()
        optimizer.zero_grad(set_to_none=True)
        ce = task.loss(net, next(batches))
        vib = net.vib() if learn_gates else torch.zeros((), device=ce.device)
        bops = net.bops(soft=True)
        loss = ce + gamma * vib + beta * bops.to(ce.dtype)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"DJPQ loss is {loss.item()} at step {step} (ce {ce.item()}, vib {vib.item()}, bops {bops.item()})")
        loss.backward()
        optimizer.step()
        net.constrain()
        keep = net.keep_ratios(soft=True)
        mean_keep = float(sum(float(k.detach()) for k in keep.values()) / len(keep)) if keep else 1.0
        curve.append(CurvePoint(step=step, stage=stage, loss=loss.item(), ce=ce.item(), vib=vib.item(), bops=bops.item(), keep=mean_keep))
    return curve
