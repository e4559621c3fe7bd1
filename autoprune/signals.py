"""Training-time S/N of every compressible layer (seed 000 sec. 2.3, eq. 4-5) and the priors it implies (sec. 2.7).

While the base model trains, the random walk of each weight tensor within an epoch is treated as noise:
``S_j = sum_i ||W_{j,i}||^2`` and ``N_j = sum_i ||W_{j,i} - W_{init,j}||^2`` over the sampled iterations i of
epoch j. A layer that kept its accuracy under that noise should tolerate quantization noise of a similar size, so
its prior bit-width is the least b whose quantization S/N reaches ``kappa * S/N`` (App. B's per-layer targets).

An S/N with no noise (N = 0, e.g. a frozen layer or lr 0) is infinite; it is stored as ``SNR_CAP``, a finite float,
so the record stays valid JSON and plots and MLflow metrics need no special case. The cap is far above what 16 bits
reach, so such a layer gets the largest bit-width: it gave no evidence that it tolerates noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import compressible_layers
from autoprune.quant.midrise import midrise_delta

SNR_CAP = 1e12
KAPPAS = (0.5, 1.0, 2.0)
# Filters beyond those that hold this much energy would, if removed, add noise 13 dB below the layer's signal.
KEEP_ENERGY = 0.95


def _snr(signal: float, noise: float) -> float:
    return SNR_CAP if noise <= 0 else min(signal / noise, SNR_CAP)


class SignalTracker:
    """A training callback recording eq. 5's signal and noise per compressible layer and epoch.

    The weights after iteration i (0-based within the epoch) are sampled when ``i % every == 0``, so every
    non-empty epoch has at least one sample. S and N are sums over the samples and scale with their number;
    S/N and ESN_a do not. ``val_accuracy``, if given, is called with the model at each epoch end.
    """

    def __init__(self, *, every: int = 1, val_accuracy: Callable[[nn.Module], float] | None = None) -> None:
        if every < 1:
            raise AutopruneError("every", every, "must be a positive number of iterations")
        self.every = every
        self.val_accuracy = val_accuracy
        self._names: list[str] = []
        self._weights: list[torch.Tensor] = []
        self._inits: list[torch.Tensor] = []
        self._s = torch.zeros(0, dtype=torch.float64)
        self._n = torch.zeros(0, dtype=torch.float64)
        self.epochs: list[int] = []
        self.layers: dict[str, dict[str, list[float]]] = {}
        self.total: dict[str, list[float]] = {"snr": [], "esn_a": []}
        self.val_accuracies: list[float] = []

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        layers = compressible_layers(model)
        self._names = list(layers)
        for name in self._names:
            self.layers.setdefault(name, {"S": [], "N": [], "snr": [], "esn_a": []})
        self._weights = [layer.weight for layer in layers.values()]
        self._inits = [w.detach().clone() for w in self._weights]
        # Sums live where the weights do: a CUDA model's per-step norms never leave the device.
        device = self._weights[0].device if self._weights else None
        self._s = torch.zeros(len(self._weights), dtype=torch.float64, device=device)
        self._n = torch.zeros(len(self._weights), dtype=torch.float64, device=device)

    @torch.no_grad()
    def on_step(self, model: nn.Module, epoch: int, step: int) -> None:
        if step % self.every:
            return
        # Accumulating tensors rather than Python floats keeps the per-step cost to a few small kernels.
        self._s += torch.stack([torch.linalg.vector_norm(w) for w in self._weights]).double().square()
        self._n += torch.stack([torch.dist(w, w0) for w, w0 in zip(self._weights, self._inits)]).double().square()

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        esn_total = 0.0
        for name, w, s, n in zip(self._names, self._weights, self._s.tolist(), self._n.tolist()):
            snr = _snr(s, n)
            esn = snr * int(torch.count_nonzero(w)) / 12.0
            curves = self.layers[name]
            curves["S"].append(s)
            curves["N"].append(n)
            curves["snr"].append(snr)
            curves["esn_a"].append(esn)
            esn_total += esn
        self.epochs.append(int(epoch))
        self.total["snr"].append(_snr(float(self._s.sum()), float(self._n.sum())))
        self.total["esn_a"].append(esn_total)
        if self.val_accuracy is not None:
            was_training = model.training
            self.val_accuracies.append(float(self.val_accuracy(model)))
            model.train(was_training)

    def export(self) -> dict[str, Any]:
        """The record ``Task.base`` stores in meta.json extras: plain lists of floats, one entry per epoch."""
        return {
            "signals": {
                "epochs": list(self.epochs),
                "layers": {name: {k: list(v) for k, v in curves.items()} for name, curves in self.layers.items()},
                "total": {k: list(v) for k, v in self.total.items()},
                "val_accuracy": list(self.val_accuracies),
            }
        }


def quant_snr(weight: torch.Tensor, bits: int) -> float:
    """||W||^2 / (||W||_0 * delta_b^2 / 12): the S/N of b-bit mid-rise quantization under the uniform-noise model
    of App. E. An all-zero tensor loses nothing to quantization, hence inf."""
    w = weight.detach().to(torch.float64)
    nonzero = int(torch.count_nonzero(w))
    if nonzero == 0:
        return math.inf
    delta = midrise_delta(w, bits)
    return float(w.square().sum()) / (nonzero * delta**2 / 12.0)


def prior_bits(weight: torch.Tensor, *, train_snr: float, kappa: float, max_bits: int = 16) -> int:
    """The least b in 1..max_bits whose quantization S/N reaches kappa x the training S/N (max_bits if none)."""
    if kappa <= 0:
        raise AutopruneError("kappa", kappa, "must be positive")
    if max_bits < 1:
        raise AutopruneError("max_bits", max_bits, "must be at least 1")
    target = kappa * train_snr
    return next((b for b in range(1, max_bits + 1) if quant_snr(weight, b) >= target), max_bits)


def keep_hint(weight: torch.Tensor) -> float:
    """The smallest fraction of output filters that holds 95% of the layer's signal energy.

    Energy is what ESN_a counts (eq. 4), and a filter carrying a sliver of it contributes little signal: when the
    spread of filter norms is wide, a few filters carry the layer and the rest are candidates for pruning (sec. 2.5
    sees SGD under low ESN_a zero whole filters by itself; App. A's quantizer drops filters below delta/2). A flat
    spread means every filter matters and the hint stays near 1. An all-zero layer holds no energy: 0.0.
    """
    energy = weight.detach().to(torch.float64).flatten(1).square().sum(dim=1)
    cumulative = energy.sort(descending=True).values.cumsum(0)
    if cumulative[-1] <= 0:
        return 0.0
    # Taking the total from the cumsum itself keeps the target within it, so the index never runs past the last filter.
    needed = int(torch.searchsorted(cumulative, KEEP_ENERGY * cumulative[-1])) + 1
    return needed / energy.numel()


def plateau_epoch(signals: Mapping[str, Any], *, tolerance: float = 0.5) -> int:
    """Index of the first epoch whose validation accuracy is within ``tolerance`` points of the best one.

    This is the epoch whose S/N to copy: the noisiest point at which the model already had its final
    accuracy (sec. 2.7, Fig. 7). Later epochs only show the learning rate annealing towards zero, which drives
    S/N up by orders of magnitude without changing accuracy (on the digits CNN with cosine annealing the last
    epoch's S/N is ~7e10 and asks for 16 bits everywhere, while 4 bits keep its accuracy).
    """
    accuracies = list(signals.get("val_accuracy") or [])
    if not accuracies:
        raise AutopruneError("signals", "val_accuracy", "is empty: record it (SignalTracker(val_accuracy=...)) to find the plateau")
    best = max(accuracies)
    return next(j for j, acc in enumerate(accuracies) if acc >= best - tolerance)


@dataclass(frozen=True)
class LayerPrior:
    snr: float
    esn_a_train: float
    bits_by_kappa: dict[float, int]
    keep_hint: float


def layer_priors(
    model: nn.Module, signals: Mapping[str, Any], *, kappas: tuple[float, ...] = KAPPAS, epoch: int = -1
) -> dict[str, LayerPrior]:
    """Priors of every compressible layer from a ``SignalTracker`` record; ``epoch`` indexes the record's
    epochs list (default -1, the last epoch)."""
    recorded = signals.get("layers", {})
    priors = {}
    for name, layer in compressible_layers(model).items():
        if name not in recorded:
            raise AutopruneError("signals", name, "has no training-time S/N record for this layer (was it recorded on another model?)")
        snr = float(recorded[name]["snr"][epoch])
        priors[name] = LayerPrior(
            snr=snr,
            esn_a_train=float(recorded[name]["esn_a"][epoch]),
            bits_by_kappa={k: prior_bits(layer.weight, train_snr=snr, kappa=k) for k in kappas},
            keep_hint=keep_hint(layer.weight),
        )
    return priors


def prior_rows(model: nn.Module, signals: Mapping[str, Any], *, epoch: int = -1) -> list[dict[str, Any]]:
    """One row per layer for ``autoprune signals``: one epoch's S/N and ESN_a and the priors they imply."""
    rows = []
    for name, prior in layer_priors(model, signals, kappas=KAPPAS, epoch=epoch).items():
        row: dict[str, Any] = {"name": name, "snr": prior.snr, "esn_a_train": prior.esn_a_train}
        row.update({f"bits_k{k:g}": bits for k, bits in prior.bits_by_kappa.items()})
        row["keep_hint"] = prior.keep_hint
        rows.append(row)
    return rows
