"""Any CNN a user brings (issue 23): models nobody on the project wrote, randomly initialised, each counted,
compressed, exported and (one per family) searched. Prints one table row per model:

    model | family | MACs (native input) | reference | delta % | apply | export (onnxruntime top-1 agreement) | search | seconds

- counted: ``autoprune.cost`` at the model's native input, against torchvision's published figure (its weights'
  ``_ops``, GMACs to three decimals) where there is one;
- apply: ``autoprune.apply`` at keep 0.5, W4A4, post-training, on 16 random samples at a reduced input where the
  model allows it (32x32 for a CNN; a ViT's 224 is its patch grid's, so it keeps it);
- export: ONNX with QDQ nodes, run by onnxruntime on the same samples; the top-1 agreement with PyTorch;
- search: 3 trials (post-training, keep / W / A bits per layer) for the first model of each family.

Families: torchvision classification models (every model of ``list_models(module=torchvision.models)``),
timm models covering attention, LayerNorm, squeeze-excite, hard-swish and grouped convolutions, Hugging Face
BERT and GPT-2 built from tiny configs (nothing downloaded), and nn.GRU, nn.LSTM and nn.TransformerEncoder
classifiers. A case that fails prints its one-line reason; the run goes on.

    python bench/bench_zoo.py                                   # everything (hours on 2 cores: the big ones)
    python bench/bench_zoo.py --models resnet18 mobilenet_v3_small timm:convnext_atto gru
    python bench/bench_zoo.py --families timm sequence --no-search

``tests/test_zoo_matrix.py`` runs a few of the smallest cases of these families in the suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from torch import nn
from torch.utils.data import TensorDataset

SAMPLES = 16
CLASSES = 10
REFERENCE_CLASSES = 1000
HALF_W4A4 = {"layers": {"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 4}}, "finetune_steps": 0, "calibration_batches": 2, "batch_size": 8}
SEARCH_SPACE = {
    "layers": {"_default": {"keep_ratio": {"low": 0.25, "high": 1.0, "step": 0.25}, "w_bits": {"low": 2, "high": 8}, "a_bits": {"low": 4, "high": 8}}},
    "policy": {"finetune_steps": 0, "calibration_batches": 1, "batch_size": 8},
}


@dataclass(frozen=True)
class ZooCase:
    """One model of the matrix: how to build it, at which inputs, its published MACs."""

    name: str
    family: str
    build: Callable[[int], nn.Module]
    """The model for a number of classes: the published MACs are of the 1000-class head (``REFERENCE_CLASSES``)."""
    native: tuple[int, ...]
    reduced: tuple[int, ...]
    reference_macs: float | None = None
    tokens: int | None = None
    """Vocabulary size of a model reading token ids (its inputs are random ids, given as floats)."""


@dataclass
class ZooRow:
    case: ZooCase
    macs: int | None = None
    status: dict[str, str] = field(default_factory=dict)
    agreement: float | None = None
    seconds: float = 0.0

    @property
    def delta(self) -> float | None:
        if self.macs is None or self.case.reference_macs is None:
            return None
        return 100.0 * (self.macs - self.case.reference_macs) / self.case.reference_macs

    def within_reference(self) -> bool:
        """Within 1% of the reference, or of the rounding of its three published decimals (0.0005 G)."""
        if self.macs is None or self.case.reference_macs is None:
            return False
        return abs(self.macs - self.case.reference_macs) <= max(0.01 * self.case.reference_macs, 0.0005e9)


# --- the cases ---------------------------------------------------------------------------------------------


def torchvision_module() -> Any:
    from autoprune.vision import import_torchvision

    return import_torchvision()


# Reduced inputs: a ViT's position embedding fixes its input; swin and maxvit need their window grid.
_TV_NATIVE = {"inception_v3": 299}
_TV_KEEP_NATIVE = ("vit_", "swin", "maxvit")


def torchvision_cases() -> list[ZooCase]:
    tv = torchvision_module()
    cases = []
    for name in tv.models.list_models(module=tv.models):
        size = _TV_NATIVE.get(name, 224)
        reduced = size if name.startswith(_TV_KEEP_NATIVE) else (75 if name == "inception_v3" else 32)
        weights = tv.models.get_model_weights(name).DEFAULT
        reference = weights.meta.get("_ops")
        build = (lambda classes, name=name: tv.models.get_model(name, num_classes=classes, **({"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {})))
        cases.append(ZooCase(
            name=name, family="torchvision", build=build, native=(3, size, size), reduced=(3, reduced, reduced),
            reference_macs=None if reference is None else reference * 1e9,
        ))
    return cases


# timm models of our choice: attention, LayerNorm, squeeze-excite, hard-swish, grouped convolutions.
_TIMM = {
    "mobilenetv3_small_050": ("squeeze-excite, hard-swish", 224, 32),
    "regnetx_002": ("grouped convolutions", 224, 32),
    "convnext_atto": ("LayerNorm, depthwise, layer scale", 224, 32),
    "efficientnet_b0": ("squeeze-excite, SiLU", 224, 32),
    "resnext26ts": ("grouped convolutions, SiLU", 256, 64),
    "efficientvit_b0": ("linear attention, hard-swish", 224, 64),
    "deit_tiny_patch16_224": ("attention, LayerNorm, class token", 224, 224),
}


# DeiT-tiny by formula (timm publishes none): the patch embedding (196 x 768 x 192), per block of 197 tokens q / k /
# v / proj (4 x 192 x 192), the MLP (2 x 192 x 768) and the products QK^T and AV (2 x 197 x 192), the 1000-class head.
_TIMM_REFERENCE = {
    "deit_tiny_patch16_224": 196 * 768 * 192 + 12 * 197 * (4 * 192 * 192 + 2 * 192 * 768 + 2 * 197 * 192) + 192 * REFERENCE_CLASSES,
}


def timm_cases() -> list[ZooCase]:
    torchvision_module()  # timm imports torchvision, which needs autoprune's op fallback on a CPU torch
    import timm

    return [
        ZooCase(name=f"timm:{name}", family="timm", build=lambda classes, name=name: timm.create_model(name, pretrained=False, num_classes=classes),
                native=(3, native, native), reduced=(3, reduced, reduced), reference_macs=_TIMM_REFERENCE.get(name))
        for name, (_covers, native, reduced) in _TIMM.items()
    ]


class TokenClassifier(nn.Module):
    """A Hugging Face model over token ids given as floats (the cost model and the ONNX export feed float
    inputs), returning the logits of its sequence classification head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.long()).logits


def _bert(classes: int) -> nn.Module:
    torchvision_module()  # transformers imports torchvision where it is installed: autoprune's op fallback first
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=classes)
    return TokenClassifier(BertForSequenceClassification(config))


def _gpt2(classes: int) -> nn.Module:
    torchvision_module()
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=classes, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return TokenClassifier(GPT2ForSequenceClassification(config))


def huggingface_cases() -> list[ZooCase]:
    return [
        ZooCase(name="hf:bert", family="huggingface", build=_bert, native=(16,), reduced=(16,), tokens=100),
        ZooCase(name="hf:gpt2", family="huggingface", build=_gpt2, native=(16,), reduced=(16,), tokens=100),
    ]


class Recurrent(nn.Module):
    """A GRU / LSTM over a (1, 40) signal as 40 steps of one feature, classified from its last hidden state."""

    def __init__(self, kind: type[nn.RNNBase], classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = kind(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    """A TransformerEncoder over the 40 steps of a (1, 40) signal, each embedded by a Linear."""

    def __init__(self, classes: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(1, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.transpose(1, 2))).mean(1))


def sequence_cases() -> list[ZooCase]:
    # GRU: 3 gates of (1 + 32) x 32 at 40 steps, plus the 1000-class head: 3 * 33 * 32 * 40 + 32,000 MACs.
    return [
        ZooCase(name="gru", family="sequence", build=lambda classes: Recurrent(nn.GRU, classes), native=(1, 40), reduced=(1, 40),
                reference_macs=3 * 33 * 32 * 40 + 32 * REFERENCE_CLASSES),
        ZooCase(name="lstm", family="sequence", build=lambda classes: Recurrent(nn.LSTM, classes), native=(1, 40), reduced=(1, 40),
                reference_macs=4 * 33 * 32 * 40 + 32 * REFERENCE_CLASSES),
        ZooCase(name="transformer_encoder", family="sequence", build=Encoder, native=(1, 40), reduced=(1, 40)),
    ]


FAMILIES: dict[str, Callable[[], list[ZooCase]]] = {
    "torchvision": torchvision_cases, "timm": timm_cases, "huggingface": huggingface_cases, "sequence": sequence_cases,
}


def all_cases(families: list[str] | None = None) -> list[ZooCase]:
    return [case for family in (families or list(FAMILIES)) for case in FAMILIES[family]()]


def case_named(name: str) -> ZooCase:
    family = "timm" if name.startswith("timm:") else "huggingface" if name.startswith("hf:") else "sequence" if name in ("gru", "lstm", "transformer_encoder") else "torchvision"
    found = [case for case in FAMILIES[family]() if case.name == name]
    if not found:
        raise SystemExit(f"--models: {name!r} is no case of family {family}")
    return found[0]


# --- running a case -----------------------------------------------------------------------------------------


def samples(case: ZooCase, *, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    if case.tokens is not None:
        x = torch.randint(0, case.tokens, (SAMPLES, *case.reduced), generator=generator).float()
    else:
        x = torch.randn(SAMPLES, *case.reduced, generator=generator)
    return TensorDataset(x, torch.randint(0, CLASSES, (SAMPLES,), generator=generator))


def built(case: ZooCase, *, classes: int = CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build(classes).eval()


def count(case: ZooCase, model: nn.Module) -> int:
    import autoprune

    return int(autoprune.cost(model, input_shape=case.native).total.macs)


def task_for(case: ZooCase, model: nn.Module) -> Any:
    from autoprune.task import Task

    data = samples(case)
    return Task.from_model(model, train=data, val=data, test=data, input_shape=case.reduced, signal_steps=0)


def apply_half_w4a4(case: ZooCase, model: nn.Module) -> Any:
    import autoprune

    return autoprune.apply(model, HALF_W4A4, task=task_for(case, model))


def export_agreement(case: ZooCase, result: Any, folder: Path) -> float:
    from autoprune.deploy.onnx_export import export_onnx
    from autoprune.deploy.verify import compare_onnx

    path = folder / f"{case.name.replace(':', '_')}.onnx"
    export_onnx(result, path, input_shape=case.reduced)
    data = samples(case)
    return compare_onnx(result, path, [data.tensors]).top1_agreement


def search_three(case: ZooCase, model: nn.Module, folder: Path) -> int:
    import autoprune

    outcome = autoprune.search(
        task_for(case, model), space=SEARCH_SPACE, trials=3, storage=f"sqlite:///{folder / 'study.db'}",
        tracking_uri=f"sqlite:///{folder / 'mlruns.db'}", study=case.name.replace(":", "_"), priors=False, ladder=False, quiet=True,
    )
    return len(outcome.front())


def _failure(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}"[:160]


def run_case(case: ZooCase, *, search: bool, folder: Path) -> ZooRow:
    row = ZooRow(case)
    start = time.perf_counter()
    try:
        row.macs = count(case, built(case, classes=REFERENCE_CLASSES))
        row.status["count"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a bench row says what failed and goes on
        row.status["count"] = _failure(exc)
    try:
        result = apply_half_w4a4(case, built(case))
        row.status["apply"] = "ok" + (f" ({len(result.pinned)} pinned)" if result.pinned else "")
        try:
            row.agreement = export_agreement(case, result, folder)
            row.status["export"] = f"{row.agreement:.0f}%"
        except Exception as exc:  # noqa: BLE001
            row.status["export"] = _failure(exc)
    except Exception as exc:  # noqa: BLE001
        row.status["apply"] = _failure(exc)
        row.status["export"] = "-"
    if search:
        try:
            row.status["search"] = f"ok ({search_three(case, built(case), folder)} on front)"
        except Exception as exc:  # noqa: BLE001
            row.status["search"] = _failure(exc)
    row.seconds = time.perf_counter() - start
    return row


def format_row(row: ZooRow) -> str:
    macs = "-" if row.macs is None else f"{row.macs / 1e6:,.2f} M"
    ref = "-" if row.case.reference_macs is None else f"{row.case.reference_macs / 1e6:,.2f} M"
    delta = "-" if row.delta is None else f"{row.delta:+.2f}%"
    count_status = "" if row.status.get("count") == "ok" else f" [{row.status.get('count')}]"
    cells = [row.case.name, row.case.family, macs + count_status, ref, delta, row.status.get("apply", "-"), row.status.get("export", "-"),
             row.status.get("search", "-"), f"{row.seconds:.1f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = "| model | family | MACs | reference | delta | apply k0.5 W4A4 | export (ORT top-1 agreement) | search 3 trials | seconds |\n|---|---|---|---|---|---|---|---|---|"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="case names: torchvision names, timm:NAME, hf:bert, hf:gpt2, gru, lstm, transformer_encoder")
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES))
    parser.add_argument("--no-search", action="store_true", help="skip the 3-trial search of each family's first model")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cases = [case_named(name) for name in args.models] if args.models else all_cases(args.families)
    searched: set[str] = set()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AUTOPRUNE_CACHE", str(Path(tmp) / "cache"))
        for case in cases:
            search = not args.no_search and case.family not in searched
            searched.add(case.family)
            folder = Path(tmp) / case.name.replace(":", "_")
            folder.mkdir()
            try:
                row = run_case(case, search=search, folder=folder)
            except Exception:  # noqa: BLE001 - a case's own crash is printed, the table goes on
                traceback.print_exc(file=sys.stderr)
                continue
            print(format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
