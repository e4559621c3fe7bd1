"""Bad input across every command, as a new user types it: refused with exit status 2, at most two lines
naming the field and the value, no traceback, and nothing written in the working folder (no study
database, no MLflow store, no cached base model), because every check runs before any work.

Each case runs in an empty working folder with the model cache and the MLflow store pointed inside it,
so that anything a command writes before refusing shows in the folder's listing. The inputs a case reads
(spec and policy files, an existing study) live in a sibling folder, ``{in}`` in the arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import torch

from autoprune.cli import main

# digits_cnn's layers are features.0, features.3, features.7 and classifier: conv9 names none of them.
SPACE = "space.yaml"
OBJECTIVES = "objectives.yaml"
POLICY = "policy.yaml"
FAST = ("--epochs", "1")  # should a case wrongly train, it trains for one epoch, not thirty


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    needles: tuple[str, ...]  # the field and the value the error line must name
    files: dict[str, str] = field(default_factory=dict)  # written into {in} first
    cached: bool = False  # the model cache holds a trained digits_cnn (in {in}, not in the working folder)


def _search(*extra: str, files: dict[str, str] | None = None, needles: tuple[str, ...], name: str) -> Case:
    return Case(name, ("search", *FAST, "--trials", "2", "--quiet", *extra), needles, files or {})


def _space(name: str, text: str, *needles: str) -> Case:
    return _search("--space", f"{{in}}/{SPACE}", files={SPACE: text}, needles=needles, name=name)


def _objectives(name: str, text: str, *needles: str) -> Case:
    return _search("--objectives", f"{{in}}/{OBJECTIVES}", files={OBJECTIVES: text}, needles=needles, name=name)


def _policy(command: str, name: str, text: str, *needles: str) -> Case:
    head = ("cost", "--model", "digits_cnn", "--policy") if command == "cost" else ("apply", *FAST)
    return Case(f"{command}-{name}", (*head, f"{{in}}/{POLICY}"), needles, {POLICY: text})


CASES: list[Case] = [
    # search spaces
    _space("space-unknown-key", "colour: 3\n", "colour"),
    _space("space-unknown-layer", "layers:\n  conv9: {w_bits: 4}\n", "layers", "'conv9'"),
    _space("space-empty-choices", "layers:\n  _default: {w_bits: {choices: []}}\n", "w_bits", "non-empty"),
    _space("space-bits-out-of-range", "layers:\n  _default: {w_bits: {choices: [2, 40]}}\n", "w_bits", "40"),
    _space("space-low-above-high", "layers:\n  _default: {w_bits: {low: 8, high: 2}}\n", "w_bits", "low=8 > high=2"),
    _space("space-bad-regex", "layers:\n  're:features[': {w_bits: 4}\n", "re:features["),
    _space("space-unknown-field", "layers:\n  _default: {colour: {choices: [1, 2]}}\n", "colour"),
    _space("space-not-yaml", "layers: [unclosed\n  - : :", "not valid JSON/YAML"),
    _search("--space", "{in}/missing.yaml", needles=("--space", "missing.yaml"), name="space-missing-file"),
    _search("--space", "no_such_space", needles=("--space", "no_such_space"), name="space-unknown-name"),
    # objectives
    _objectives("objectives-unknown-metric", "objectives: [{metric: speed}]\n", "objectives", "'speed'"),
    _objectives("objectives-bad-direction", "objectives: [{metric: bops, direction: upward}]\n", "direction", "upward"),
    _objectives("objectives-unknown-constraint-metric", "objectives: [{metric: bops}]\nconstraints: ['latency <= 1']\n", "latency"),
    _objectives("objectives-malformed-constraint", "objectives: [{metric: bops}]\nconstraints: ['bops about 3']\n", "constraints", "bops about 3"),
    # policies, through `cost` (no training at all) and `apply` (which must not train before refusing)
    _policy("cost", "unknown-layer", "layers:\n  conv9: {w_bits: 4}\n", "policy.layers", "'conv9'"),
    _policy("cost", "unknown-quantizer", "quantizer: foo\n", "quantizer", "foo"),
    _policy("cost", "bad-version", "version: 7\n", "version", "7"),
    _policy("cost", "not-yaml", "layers: [unclosed\n  - : :", "not valid JSON/YAML", POLICY),
    _policy("cost", "bits-out-of-range", "layers:\n  _default: {w_bits: 40}\n", "w_bits", "40"),
    _policy("cost", "bad-regex", "layers:\n  're:features[': {w_bits: 4}\n", "re:features["),
    _policy("cost", "not-a-mapping", "- w_bits: 4\n", "policy", "list"),
    _policy("apply", "unknown-layer", "layers:\n  conv9: {w_bits: 4}\n", "policy.layers", "'conv9'"),
    _policy("apply", "unknown-quantizer", "quantizer: foo\n", "quantizer", "foo"),
    _policy("apply", "unknown-pruner", "pruner: {kind: shears}\n", "pruner", "shears"),
    _policy("apply", "bad-order", "order: sideways\n", "order", "sideways"),
    _policy("apply", "keep-ratio-on-classifier", "layers:\n  classifier: {keep_ratio: 0.5}\n", "classifier", "0.5"),
    Case("apply-missing-policy", ("apply", *FAST, "{in}/nowhere.yaml"), ("nowhere.yaml", "does not exist")),
    Case("apply-policy-is-a-folder", ("apply", *FAST, "{in}"), ("file", "does not exist")),
    Case("apply-unknown-model", ("apply", *FAST, f"{{in}}/{POLICY}", "--model", "resnet1000"), ("model", "resnet1000"), {POLICY: "{}\n"}),
    Case("apply-unknown-dataset", ("apply", *FAST, f"{{in}}/{POLICY}", "--dataset", "imagenet42"), ("dataset", "imagenet42"), {POLICY: "{}\n"}),
    Case("apply-out-under-a-file", ("apply", *FAST, f"{{in}}/{POLICY}", "--out", "{in}/policy.yaml/model.safetensors"), ("--out", "policy.yaml"), {POLICY: "{}\n"}),
    # cost
    Case("cost-unknown-model", ("cost", "--model", "resnet1000"), ("model", "resnet1000")),
    Case("cost-malformed-input", ("cost", "--model", "vgg7", "--input", "3x32"), ("--input", "3x32")),
    Case("cost-input-of-wrong-rank", ("cost", "--model", "digits_cnn", "--input", "1x40"), ("--input", "1x40")),
    Case("cost-missing-policy", ("cost", "--model", "digits_cnn", "--policy", "{in}/nowhere.json"), ("nowhere.json",)),
    Case("cost-binary-policy", ("cost", "--model", "digits_cnn", "--policy", "{in}/policy.json"), ("policy.json",), {"policy.json": "\x00\x01\x02garbage"}),
    # storage URLs and studies
    _search("--storage", "postgresql://nobody@127.0.0.1:9/none", needles=("--storage", "postgresql://nobody@127.0.0.1:9/none"), name="search-unreachable-postgres"),
    _search("--storage", "sqlite:///{in}/missing/dir/x.db", needles=("--storage", "missing/dir"), name="search-sqlite-missing-folder"),
    _search("--storage", "nonsense", needles=("--storage", "nonsense"), name="search-storage-not-a-url"),
    _search("--export", "{in}/policy.yaml/front", files={POLICY: "{}\n"}, needles=("--export", "policy.yaml"), name="search-export-under-a-file"),
    Case("worker-missing-database", ("worker", "--study", "s", "--storage", "sqlite:///{in}/none.db"), ("--storage", "none.db")),
    Case("worker-unknown-study", ("worker", "--study", "nope", "--storage", "sqlite:///{in}/study.db"), ("--study", "nope")),
    Case("worker-foreign-study", ("worker", "--study", "plain", "--storage", "sqlite:///{in}/study.db"), ("--study", "plain")),
    Case("worker-unreachable-postgres", ("worker", "--study", "s", "--storage", "postgresql://nobody@127.0.0.1:9/none"), ("--storage", "127.0.0.1:9")),
    Case("pareto-unknown-study", ("pareto", "--study", "nope", "--storage", "sqlite:///{in}/study.db"), ("--study", "nope")),
    Case("pareto-missing-database", ("pareto", "--study", "s", "--storage", "sqlite:///{in}/none.db"), ("--storage", "none.db")),
    Case("pareto-default-storage-absent", ("pareto", "--study", "s"), ("--storage", "autoprune.db")),
    Case("pareto-foreign-study", ("pareto", "--study", "plain", "--storage", "sqlite:///{in}/study.db"), ("--study", "plain")),
    Case("export-unknown-study", ("export", "--study", "nope", "--storage", "sqlite:///{in}/study.db", "--out", "out"), ("--study", "nope")),
    Case("export-foreign-study", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out"), ("--study", "plain")),
    Case("export-out-under-a-file", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "{in}/policy.yaml/x"), ("--out", "policy.yaml"), {POLICY: "{}\n"}),
    Case("export-bad-select", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--select", "speed<=3"), ("--select", "speed<=3")),
    # numbers out of range and unknown names
    _search("--timeout", "-1", needles=("--timeout", "-1"), name="search-negative-timeout"),
    _search("--trials", "0", needles=("--trials", "0"), name="search-no-trials"),
    _search("--jobs", "many", needles=("--jobs", "many"), name="search-jobs-not-a-number"),
    _search("--sampler", "annealing", needles=("--sampler", "annealing"), name="search-unknown-sampler"),
    _search("--model", "resnet1000", needles=("model", "resnet1000"), name="search-unknown-model"),
    _search("--dataset", "imagenet42", needles=("dataset", "imagenet42"), name="search-unknown-dataset"),
    _search("--priors", "bits", needles=("--priors", "bits"), name="search-unknown-prior"),
    _search("--executor", "slurm", needles=("--executor", "slurm"), name="search-unknown-executor"),
    Case("worker-no-threads", ("worker", "--study", "s", "--storage", "sqlite:///{in}/study.db", "--threads", "0"), ("--threads", "0")),
    Case("ui-port-zero", ("ui", "--port", "0"), ("--port", "0")),
    Case("ui-port-too-high", ("ui", "--port", "70000"), ("--port", "70000")),
    Case("ui-tracking-missing-folder", ("ui", "--tracking-uri", "sqlite:///{in}/missing/dir/mlflow.db"), ("--tracking-uri", "missing/dir")),
    Case("ui-no-store-here", ("ui",), ("--tracking-uri", "mlruns")),
    Case("signals-unknown-model", ("signals", *FAST, "--model", "resnet1000"), ("model", "resnet1000")),
    Case("signals-unknown-dataset", ("signals", *FAST, "--dataset", "imagenet42"), ("dataset", "imagenet42")),
    Case("signals-no-epochs", ("signals", "--epochs", "0"), ("--epochs", "0")),
]

# Issue 25's classes, each refused in one line before anything is written. ``faulty.py`` (the user's own code)
# and a cached trained digits model live in {in}.
BOMB = "description:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  b{i}: &b{i} [{', '.join([f'*{p}'] * 9)}]\n" for i, p in enumerate(["a", "b0", "b1", "b2", "b3", "b4", "b5"])
)
ROUND_FIVE: list[Case] = [
    # options that only mean something with another one
    _search("--budget-steps", "100", needles=("--budget-steps", "100"), name="search-budget-steps-without-fidelity"),
    _search("--gpus-per-trial", "1", needles=("--gpus-per-trial", "1.0"), name="search-gpus-per-trial-locally"),
    _search("--executor", "ray", "--gpus-per-trial", "64", needles=("--gpus-per-trial", "64"), name="search-ray-gpus-this-machine-lacks"),
    _search("--executor", "ray", "--cpus-per-trial", "4096", needles=("--cpus-per-trial", "4096"), name="search-ray-cpus-this-machine-lacks"),
    # a model that cannot read its data, values that would silently mean the default, a machine's limits
    _search("--model", "vgg7", "--dataset", "digits", needles=("--model", "vgg7", "1x8x8"), name="search-model-cannot-read-the-dataset"),
    Case("signals-model-cannot-read-the-dataset", ("signals", *FAST, "--model", "vgg7", "--dataset", "digits"), ("--model", "vgg7", "1x8x8")),
    _search("--tracking-uri", "", needles=("--tracking-uri", "''", "empty"), name="search-tracking-uri-empty"),
    _search("--storage", "", needles=("--storage", "''", "empty"), name="search-storage-empty"),
    _search("--tracking-uri", "{in}/policy.yaml", files={POLICY: "{}\n"}, needles=("--tracking-uri", "policy.yaml", "is a file"), name="search-tracking-uri-under-a-file"),
    _search("--jobs", "1000", needles=("--jobs", "1000"), name="search-a-thousand-jobs"),
    _space("space-log-range-with-a-step", "layers:\n  _default: {w_bits: {low: 2, high: 8, log: true, step: 2}}\n", "w_bits.step", "log"),
    _space("space-log-not-a-bool", "layers:\n  _default: {keep_ratio: {low: 0.1, high: 0.9, log: 'yes'}}\n", "keep_ratio.log", "'yes'"),
    # a cached trained model that cannot read the input asked for
    Case("cost-input-the-cached-model-cannot-read", ("cost", "--model", "digits_cnn", "--input", "3x8x8"), ("--input", "3x8x8"), cached=True),
    # a key given twice, an alias bomb
    _policy("cost", "duplicate-key-yaml", "layers:\n  _default: {w_bits: 4}\n  _default: {w_bits: 8}\n", "policy.yaml", "_default", "twice"),
    Case("cost-duplicate-key-json", ("cost", "--model", "digits_cnn", "--policy", "{in}/dup.json"), ("dup.json", "w_bits", "twice"), {"dup.json": '{"layers": {"_default": {"w_bits": 4, "w_bits": 8}}}'}),
    _space("space-duplicate-key", "layers:\n  _default: {w_bits: {choices: [2, 4]}}\nlayers:\n  _default: {w_bits: 8}\n", "space.yaml", "layers", "twice"),
    _objectives("objectives-duplicate-key", "objectives: [{metric: accuracy}, {metric: bops}]\nobjectives: [{metric: bops}]\n", "objectives", "twice"),
    _space("space-alias-bomb", BOMB + "pin: *b6\n", "space.yaml", "100,000"),
    _policy("apply", "alias-bomb", BOMB + "layers: *b6\n", "policy.yaml", "100,000"),
    # study names that would name folders outside their own
    _search("--study", "", needles=("--study", "''"), name="search-empty-study-name"),
    _search("--study", "..", needles=("--study", "'..'"), name="search-dotdot-study-name"),
    _search("--study", "a/b", needles=("--study", "'a/b'"), name="search-study-name-with-a-slash"),
    # outputs over what is there already
    Case("export-out-over-a-file", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "{in}/keep.txt"), ("--out", "keep.txt", "is a file"), {"keep.txt": "mine\n"}),
    Case("export-out-over-a-folder-of-other-files", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "{in}/mine"), ("--out", "mine", "other files"), {"mine/notes.txt": "mine\n"}),
    Case("export-register-empty", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--format", "onnx", "--register", ""), ("--register", "''")),
    Case("export-register-with-a-slash", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--format", "onnx", "--register", "a/b"), ("--register", "a/b")),
    Case("export-register-without-onnx", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--register", "m"), ("--register", "'m'")),
    Case("export-unknown-format", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--format", "zip"), ("--format", "zip")),
    Case("export-onnx-to-a-damaged-store", ("export", "--study", "plain", "--storage", "sqlite:///{in}/study.db", "--out", "out", "--format", "onnx", "--tracking-uri", "sqlite:///{in}/cut.db"), ("--tracking-uri", "cut.db", "damaged"), {"cut.db": "SQLite format 3\x00" + "\x10\x00" + "\x00" * 82}),
    Case("apply-out-over-a-folder", ("apply", *FAST, f"{{in}}/{POLICY}", "--out", "{in}"), ("--out", "folder"), {POLICY: "{}\n"}),
    # the user's own code fails: named, with their exception and their own frame
    Case("search-task-raises", ("search", *FAST, "--quiet", "--task", "faulty:raises"), ("--task", "faulty:raises", "ValueError", "my data is gone")),
    Case("search-task-not-callable", ("search", *FAST, "--quiet", "--task", "faulty:NUMBER"), ("--task", "faulty:NUMBER", "not a function")),
    Case("search-task-returns-none", ("search", *FAST, "--quiet", "--task", "faulty:returns_none"), ("--task", "faulty:returns_none", "NoneType")),
    Case("signals-task-module-does-not-parse", ("signals", "--task", "unparsable:task"), ("--task", "unparsable:task", "SyntaxError")),
    Case("apply-task-raises", ("apply", f"{{in}}/{POLICY}", "--task", "faulty:raises"), ("--task", "faulty:raises", "ValueError"), {POLICY: "{}\n"}),
    Case("search-model-factory-raises", ("search", *FAST, "--quiet", "--model", "faulty:factory", "--weights", "{in}/w.safetensors"), ("--model", "faulty:factory", "RuntimeError")),
    Case("cost-model-factory-raises", ("cost", "--model", "faulty:factory", "--input", "1x8x8"), ("--model", "faulty:factory", "RuntimeError")),
]
CASES += ROUND_FIVE


FAULTY = """
import torch

NUMBER = 3


def raises():
    raise ValueError("my data is gone")


def returns_none():
    return None


def factory():
    raise RuntimeError("my factory broke")
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the cases read from, with a study database holding one study autoprune did not create, the
    user's faulty code, weights for it, and a model cache holding a trained digits_cnn (untrained weights:
    what matters is their shape)."""
    from safetensors.torch import save_file

    from autoprune.models import build_model
    from autoprune.task import task_for

    folder = tmp_path_factory.mktemp("in")
    optuna.create_study(study_name="plain", storage=f"sqlite:///{folder / 'study.db'}")
    (folder / "faulty.py").write_text(FAULTY)
    (folder / "unparsable.py").write_text("def task(:\n")
    save_file({"w": torch.zeros(1)}, str(folder / "w.safetensors"))
    cache = folder / "cache"
    os.environ["AUTOPRUNE_CACHE"], previous = str(cache), os.environ.get("AUTOPRUNE_CACHE")
    try:
        directory = task_for("digits_cnn").cache_dir()
    finally:
        os.environ.pop("AUTOPRUNE_CACHE") if previous is None else os.environ.__setitem__("AUTOPRUNE_CACHE", previous)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_model("digits_cnn", in_channels=1).state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "meta.json").write_text('{"val_accuracy": 0, "test_accuracy": 0, "train_seconds": 0}')
    return folder


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _prepare(case: Case, inputs: Path, tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    for name, text in case.files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    cache = inputs / "cache" if case.cached else work / ".autoprune" / "cache"
    env = {"AUTOPRUNE_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}", "PYTHONPATH": str(inputs)}
    args = [a.replace("{in}", str(inputs)) for a in case.args]
    return work, args, env


def _check(case: Case, code: int | None, err: str, work: Path, inputs: Path) -> None:
    err = err.strip()
    for name, text in case.files.items():  # an input is never changed, moved or replaced
        assert (inputs / name).is_file() and (inputs / name).read_text() == text, f"{case.name} changed its input {name}"
    assert code == 2, f"{case.name}: exit status {code}\n{err}"
    assert "Traceback" not in err, f"{case.name}: {err}"
    assert 1 <= len(err.splitlines()) <= 2, f"{case.name}: {err}"
    for needle in case.needles:
        assert needle.replace("{in}", str(inputs)) in err, f"{case.name}: {needle!r} not in {err!r}"
    assert _listing(work) == [], f"{case.name} wrote {_listing(work)} before refusing"


def test_there_are_enough_cases_across_every_command() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.args[0] for c in CASES} == {"cost", "apply", "search", "worker", "pareto", "export", "ui", "signals"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_before_any_work(case: Case, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    work, args, env = _prepare(case, inputs, tmp_path)
    monkeypatch.chdir(work)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(inputs))
    capsys.readouterr()
    code = main(args)
    _check(case, code, capsys.readouterr().err, work, inputs)


SUBPROCESS_CASES = [
    "apply-unknown-layer", "apply-unknown-quantizer", "space-unknown-key", "search-unreachable-postgres", "cost-not-yaml", "ui-port-zero",
    "search-task-raises", "space-alias-bomb", "export-out-over-a-file",
]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_the_installed_command(name: str, inputs: Path, tmp_path: Path) -> None:
    """The same refusals from a fresh interpreter: no import-time output, no warning lines, no traceback."""
    case = next(c for c in CASES if c.name == name)
    work, args, env = _prepare(case, inputs, tmp_path)
    path = os.pathsep.join(p for p in (env.pop("PYTHONPATH"), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, **env, "PYTHONPATH": path, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "autoprune.cli", *args], cwd=work, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.stdout == "", proc.stdout
    _check(case, proc.returncode, proc.stderr, work, inputs)
