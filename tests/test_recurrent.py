"""GRU / LSTM / RNN: their Linear-gate equivalent is exact, and the cost counts every gate at every step."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from autoprune.cost import LayerQuant, format_cost_table, measure_cost
from autoprune.errors import AutopruneError
from autoprune.models.convert import Recurrent, convert_model

GATES = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}


class Classifier(nn.Module):
    """A recurrent layer over the (C, L) signal read as L steps of C features, then a Linear head."""

    def __init__(self, kind: type[nn.RNNBase], *, features: int = 4, hidden: int = 8, **options: object) -> None:
        super().__init__()
        self.rnn = kind(features, hidden, batch_first=True, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.fc = nn.Linear(hidden * directions, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x.transpose(1, 2))[0][:, -1])


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unrolled_layer_equals_the_fused_one(kind: type[nn.RNNBase], batch_first: bool) -> None:
    torch.manual_seed(0)
    fused = kind(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    unrolled = convert_model(copy.deepcopy(fused))
    assert isinstance(unrolled, Recurrent) and set(unrolled.cells) == {"l0", "l0_reverse", "l1", "l1_reverse"}
    x = torch.randn(2, 7, 3)
    batch = 2 if batch_first else 7
    h0 = torch.randn(4, batch, 5)
    state = (h0, torch.randn(4, batch, 5)) if kind is nn.LSTM else h0
    (out_a, h_a), (out_b, h_b) = fused(x, state), unrolled(x, state)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(h_a if kind is nn.LSTM else (h_a,), h_b if kind is nn.LSTM else (h_b,)):
        assert torch.allclose(a, b, atol=1e-5)
    # unbatched input, as the fused layer takes it
    assert torch.allclose(fused(x[0])[0], unrolled(x[0])[0], atol=1e-5)


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM, nn.RNN])
def test_macs_count_every_gate_at_every_step(kind: type[nn.RNNBase]) -> None:
    # input I = 4, hidden H = 8, T = 10 steps: G x T x (I x H + H x H) per layer and direction, bias adds not
    # counted; the second layer of a bidirectional stack reads 2H features
    g, i, h, t = GATES[kind], 4, 8, 10
    report = measure_cost(Classifier(kind, num_layers=2, bidirectional=True), input_shape=(i, t))
    macs = {layer.name: layer.macs for layer in report.layers}
    assert macs["rnn.cells.l0.ih"] == macs["rnn.cells.l0_reverse.ih"] == g * t * i * h
    assert macs["rnn.cells.l0.hh"] == macs["rnn.cells.l1_reverse.hh"] == g * t * h * h
    assert macs["rnn.cells.l1.ih"] == g * t * 2 * h * h
    formula = 2 * g * t * (i * h + h * h) + 2 * g * t * (2 * h * h + h * h)
    assert report.total.macs == formula + 2 * h * 3
    assert report.uncounted == ()


def test_gru_of_the_issue_and_its_gate_bits() -> None:
    # the issue's GRU classifier: 76,800 MACs by formula where the head alone (64) was counted
    net = Classifier(nn.GRU, features=1, hidden=32, bidirectional=False)
    report = measure_cost(net, input_shape=(1, 20), layers={"rnn.cells.l0.hh": LayerQuant(w_bits=4, a_bits=6)}, input_bits=8)
    rnn_macs = 3 * 20 * (1 * 32 + 32 * 32)
    assert report.total.macs - 32 * 3 == rnn_macs == 63_360
    rows = {layer.name: layer for layer in report.layers}
    assert rows["rnn.cells.l0.hh"].bops == 3 * 20 * 32 * 32 * 4 * 6
    assert rows["rnn.cells.l0.ih"].a_bits == 8, "the input Linear reads the network input"
    # gates listed with their element counts: 2 sigmoids and a tanh of H per step
    elements = {e.op: e.elements for e in report.elements}
    assert elements == {"sigmoid": 2 * 32 * 20, "tanh": 32 * 20}


def test_lstm_with_projection_and_packed_sequences_are_refused() -> None:
    with pytest.raises(AutopruneError, match="proj_size"):
        convert_model(nn.Sequential(nn.LSTM(3, 4, proj_size=2)))
    unrolled = convert_model(nn.GRU(3, 4))
    packed = nn.utils.rnn.pack_padded_sequence(torch.zeros(5, 2, 3), [5, 3])
    with pytest.raises(AutopruneError, match="PackedSequence"):
        unrolled(packed)


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(6, 4)
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) + self.pos(torch.arange(x.shape[-1])) + torch.cumsum(self.w, 0)


def test_embedding_is_lookups_and_memory_and_the_uncountable_is_named() -> None:
    report = measure_cost(_Odd(), input_shape=(4, 6))
    (row,) = report.layers
    assert (row.name, row.kind, row.macs, row.bops, row.in_elements) == ("pos", "embedding", 0, 0, 6)
    assert row.memory_mb == 6 * 4 * 32 / 1e6
    (missing,) = report.uncounted
    assert missing.name == "cumsum" and "w" in missing.what
    data = json.loads(json.dumps(report.to_dict()))
    assert data["uncounted"][0]["name"] == "cumsum"
    console = Console(file=io.StringIO(), width=200)
    console.print(format_cost_table(report))
    assert "uncounted" in console.file.getvalue()


def test_compressed_gru_exports_to_onnx_with_every_step_quantized(tmp_path) -> None:
    import autoprune
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    net = Classifier(nn.GRU, features=4, hidden=6)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
    task = autoprune.Task.from_model(net, train=data, val=data, signal_steps=0)
    policy = {"finetune_steps": 0, "layers": {"_default": {"w_bits": 4, "a_bits": 8}}}
    result = autoprune.apply(net, policy, task=task, out=tmp_path / "gru.onnx")
    hh = result.model.rnn.cells["l0"].hh
    assert len(torch.unique(hh.weight)) <= 16 and hh.input_quant.bits == 8
    assert result.deployed.top1_agreement == 100.0 and result.deployed.max_abs_diff < 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "gru.onnx")).graph
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.name.startswith("rnn.cells.l0.hh")]
    assert len(quantized) == 5, "the hidden state is quantized at each of the 5 steps"


@pytest.mark.e2e
def test_cost_command_counts_the_zoo_gru_and_lists_what_it_does_not_multiply(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "autoprune.cli", "cost", "--model", "mnist1d_gru", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # both directions: 3 x 40 x (1 x 6 + 6 x 6), then the classifier over 40 x 12 features
    assert report["total"]["macs"] == 2 * 3 * 40 * (6 + 36) + 480 * 10
    assert report["uncounted"] == []
    assert {e["op"] for e in report["elements"]} == {"sigmoid", "tanh"}


def test_weights_load_as_written_or_as_converted(tmp_path) -> None:
    from safetensors.torch import save_file

    from autoprune.weights import load_weights

    torch.manual_seed(0)
    trained = Classifier(nn.GRU).eval()
    x = torch.randn(2, 4, 6)
    expected = trained(x)
    written, converted = tmp_path / "gru.safetensors", tmp_path / "linear.safetensors"
    save_file(dict(trained.state_dict()), str(written))
    save_file({k: v.contiguous() for k, v in convert_model(copy.deepcopy(trained)).state_dict().items()}, str(converted))
    for path in (written, converted):
        torch.manual_seed(1)
        loaded = load_weights(Classifier(nn.GRU), path)
        assert isinstance(loaded.rnn, Recurrent)
        assert torch.allclose(loaded(x), expected, atol=1e-5)
