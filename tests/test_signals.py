"""Training-time S/N (seed 000 eq. 4-5) and the priors it implies (sec. 2.7), checked against hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.errors import AutopruneError
from autoprune.quant.midrise import midrise_delta, midrise_int
from autoprune.signals import (
    SNR_CAP, LayerPrior, SignalTracker, keep_hint, layer_priors, plateau_epoch, prior_bits, prior_rows, quant_snr,
)
from autoprune.task import TrainSettings, train


class Recorder:
    """Copies every compressible weight at each epoch start and after every step, for eq. 5 by hand."""

    def __init__(self) -> None:
        self.inits: list[dict[str, torch.Tensor]] = []
        self.steps: list[list[dict[str, torch.Tensor]]] = []

    @staticmethod
    def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.inits.append(self._copy(model))
        self.steps.append([])

    def on_step(self, model: nn.Module, epoch: int, step: int) -> None:
        self.steps[epoch].append(self._copy(model))

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        pass


def eq5(recorder: Recorder, epoch: int, name: str, sampled: list[int]) -> tuple[float, float]:
    w0 = recorder.inits[epoch][name]
    ws = [recorder.steps[epoch][i][name] for i in sampled]
    return sum(float((w**2).sum()) for w in ws), sum(float(((w - w0) ** 2).sum()) for w in ws)


def tiny_data(n: int, features: int = 4, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def tiny_model(features: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 3), nn.ReLU(), nn.Linear(3, 3))


def run(model: nn.Module, data: TensorDataset, *, epochs: int, batch: int, lr: float, callbacks: list) -> None:
    settings = TrainSettings(epochs=epochs, lr=lr, momentum=0.9, weight_decay=5e-4, batch_size=batch)
    train(model, data, settings, seed=0, callbacks=callbacks, progress=False)


def test_tracker_matches_eq5_by_hand() -> None:
    model, tracker, rec = tiny_model(), SignalTracker(), Recorder()
    run(model, tiny_data(12), epochs=2, batch=4, lr=0.1, callbacks=[tracker, rec])
    sig = tracker.export()["signals"]
    assert sig["epochs"] == [0, 1]
    for epoch in (0, 1):
        sums = [0.0, 0.0]
        for name in ("0", "2"):
            s, n = eq5(rec, epoch, name, [0, 1, 2])
            curves = sig["layers"][name]
            assert curves["S"][epoch] == pytest.approx(s, rel=1e-6)
            assert curves["N"][epoch] == pytest.approx(n, rel=1e-6)
            assert curves["snr"][epoch] == pytest.approx(s / n, rel=1e-6)
            sums[0] += s
            sums[1] += n
        # eq. 5 sums over layers before dividing: the total is not a mean of the per-layer ratios.
        assert sig["total"]["snr"][epoch] == pytest.approx(sums[0] / sums[1], rel=1e-6)
    assert sig["layers"]["0"]["N"][0] > 0 and sig["layers"]["0"]["snr"][0] != sig["layers"]["0"]["snr"][1]


@pytest.mark.parametrize(("every", "sampled"), [(2, [0, 2, 4]), (3, [0, 3]), (10, [0])])
def test_tracker_samples_every_k_iterations(every: int, sampled: list[int]) -> None:
    model, tracker, rec = tiny_model(), SignalTracker(every=every), Recorder()
    run(model, tiny_data(10), epochs=1, batch=2, lr=0.1, callbacks=[tracker, rec])
    assert len(rec.steps[0]) == 5
    curves = tracker.export()["signals"]["layers"]["0"]
    s, n = eq5(rec, 0, "0", sampled)
    assert curves["S"][0] == pytest.approx(s, rel=1e-6)
    assert curves["N"][0] == pytest.approx(n, rel=1e-6)


def test_esn_a_is_snr_times_nonzeros_over_12() -> None:
    data = tiny_data(12)
    data.tensors[0][:, 0] = 0.0
    model = tiny_model()
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # no input, no gradient, no decay away from 0: stays exactly zero
    tracker = SignalTracker()
    run(model, data, epochs=2, batch=4, lr=0.1, callbacks=[tracker])
    sig = tracker.export()["signals"]
    nonzero = int(torch.count_nonzero(model[0].weight))
    assert nonzero == 12 - 3
    for epoch in (0, 1):
        first, second = sig["layers"]["0"], sig["layers"]["2"]
        assert first["esn_a"][epoch] == pytest.approx(first["snr"][epoch] * nonzero / 12, rel=1e-9)
        assert sig["total"]["esn_a"][epoch] == pytest.approx(first["esn_a"][epoch] + second["esn_a"][epoch], rel=1e-9)


def test_no_noise_is_capped_finite_and_json_safe() -> None:
    modes: list[bool] = []

    class ModeAfterTracker(Recorder):
        def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
            modes.append(model.training)

    def evaluate(m: nn.Module) -> float:
        accuracy = 42.0 + m.training
        m.eval()  # as autoprune.task.accuracy does
        return accuracy

    model, tracker = tiny_model(), SignalTracker(val_accuracy=evaluate)
    run(model, tiny_data(8), epochs=2, batch=4, lr=0.0, callbacks=[tracker, ModeAfterTracker()])
    exported = tracker.export()
    json.dumps(exported, allow_nan=False)
    sig = exported["signals"]
    assert sig["layers"]["0"]["N"] == [0.0, 0.0]
    assert sig["layers"]["0"]["snr"] == [SNR_CAP, SNR_CAP] and sig["total"]["snr"] == [SNR_CAP, SNR_CAP]
    # The callable sees the model as training left it, and whatever follows it sees the same mode again.
    assert sig["val_accuracy"] == [43.0, 43.0] and modes == [True, True]
    assert layer_priors(model, sig)["0"].bits_by_kappa == {0.5: 16, 1.0: 16, 2.0: 16}


def test_every_must_be_positive() -> None:
    with pytest.raises(AutopruneError):
        SignalTracker(every=0)


def test_quant_snr_is_about_6db_per_bit_and_matches_real_midrise_noise() -> None:
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    for bits in range(2, 12):
        gain_db = 10 * math.log10(quant_snr(w, bits + 1) / quant_snr(w, bits))
        assert gain_db == pytest.approx(6.02, abs=0.01)
    # App. E's uniform-noise model against the real mid-rise error, where it holds (many levels, no clamping).
    bits = 8
    delta = midrise_delta(w, bits)
    real = float((w.double() ** 2).sum() / ((w.double() - delta * midrise_int(w, delta, bits)) ** 2).sum())
    assert quant_snr(w, bits) == pytest.approx(real, rel=0.05)
    assert quant_snr(torch.zeros(3, 3), 4) == math.inf


def test_prior_bits_definition_and_monotone_in_kappa() -> None:
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    train_snr = 1000.0
    bits = prior_bits(w, train_snr=train_snr, kappa=1.0)
    assert quant_snr(w, bits) >= train_snr > quant_snr(w, bits - 1)
    ladder = [prior_bits(w, train_snr=train_snr, kappa=k) for k in (0.1, 0.5, 1.0, 2.0, 4.0, 16.0, 100.0)]
    assert ladder == sorted(ladder) and ladder[0] < ladder[-1]
    # quantization S/N grows 4x per bit, so asking for 4x more costs exactly one bit
    assert prior_bits(w, train_snr=train_snr, kappa=4.0) == bits + 1
    assert prior_bits(w, train_snr=1e30, kappa=1.0, max_bits=8) == 8
    assert prior_bits(w, train_snr=1e-9, kappa=1.0) == 1
    with pytest.raises(AutopruneError):
        prior_bits(w, train_snr=train_snr, kappa=0.0)


def test_prior_bits_fall_when_training_noise_rises() -> None:
    data = tiny_data(64, features=8)
    bits: dict[str, list[int]] = {"0": [], "2": []}
    for lr in (0.005, 0.05, 0.5):
        model, tracker = tiny_model(features=8), SignalTracker()
        run(model, data, epochs=3, batch=8, lr=lr, callbacks=[tracker])
        for name, prior in layer_priors(model, tracker.export()["signals"]).items():
            bits[name].append(prior.bits_by_kappa[1.0])
    for ladder in bits.values():
        assert ladder == sorted(ladder, reverse=True) and ladder[-1] < ladder[0]
    assert bits["0"][2] < bits["0"][1] < bits["0"][0]


def test_keep_hint_on_constructed_filters() -> None:
    w = torch.full((16, 3, 3, 3), 1e-3)
    w[[1, 5, 9, 13]] = 1.0
    assert keep_hint(w) == 0.25
    assert keep_hint(torch.ones(16, 8)) == 1.0
    assert keep_hint(torch.zeros(4, 4)) == 0.0
    spread = torch.tensor([[4.0], [3.0], [1.0], [0.5]])  # energies 16, 9, 1, 0.25: 25/26.25 = 95.2% in two
    assert keep_hint(spread) == 0.5


def test_layer_priors_pick_the_epoch_and_rows_for_the_cli() -> None:
    model, tracker = tiny_model(), SignalTracker()
    run(model, tiny_data(12), epochs=3, batch=4, lr=0.1, callbacks=[tracker])
    sig = tracker.export()["signals"]
    last, first = layer_priors(model, sig), layer_priors(model, sig, epoch=0, kappas=(1.0,))
    assert isinstance(last["0"], LayerPrior)
    assert last["0"].snr == sig["layers"]["0"]["snr"][-1] and first["0"].snr == sig["layers"]["0"]["snr"][0]
    assert first["2"].esn_a_train == sig["layers"]["2"]["esn_a"][0]
    assert set(first["0"].bits_by_kappa) == {1.0}
    rows = prior_rows(model, sig)
    assert [r["name"] for r in rows] == ["0", "2"]
    assert list(rows[0]) == ["name", "snr", "esn_a_train", "bits_k0.5", "bits_k1", "bits_k2", "keep_hint"]
    assert rows[1]["bits_k1"] == last["2"].bits_by_kappa[1.0] and rows[1]["keep_hint"] == keep_hint(model[2].weight)
    json.dumps(rows, allow_nan=False)
    assert prior_rows(model, sig, epoch=0)[0]["snr"] == first["0"].snr
    with pytest.raises(AutopruneError, match="no training-time S/N"):
        layer_priors(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)), sig)


def test_plateau_epoch_is_the_first_within_tolerance_of_the_best() -> None:
    signals = {"val_accuracy": [50.0, 90.0, 97.8, 98.4, 98.0, 98.6, 98.3]}
    assert plateau_epoch(signals) == 3
    assert plateau_epoch(signals, tolerance=1.0) == 2
    assert plateau_epoch(signals, tolerance=0.0) == 5
    with pytest.raises(AutopruneError, match="val_accuracy"):
        plateau_epoch({"val_accuracy": []})


def test_signals_json_carries_the_sensitivity_table_beside_the_snr_rows(capsys: pytest.CaptureFixture[str]) -> None:
    from autoprune.cli import main
    from autoprune.sensitivity import SensitivityTable

    assert main(["signals", "--json", "--epochs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"]
    table = SensitivityTable.model_validate(out["sensitivity"])
    assert table.layers
    # per layer, the coarsest weight grid is predicted to cost more loss than the finest
    for layer in table.layers.values():
        assert len(layer.w_bits) >= 2
        assert layer.w_bits[min(layer.w_bits)] > layer.w_bits[max(layer.w_bits)]
