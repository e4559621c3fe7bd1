"""Bad input: one line naming the field and the value, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoprune.cli import main


def expect_error(capsys: pytest.CaptureFixture[str], args: list[str], *needles: str) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["cost", "--model", "resnet1000"], "model", "'resnet1000'")


def test_malformed_input(capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["cost", "--model", "vgg7", "--input", "3x32"], "--input", "'3x32'")


@pytest.mark.parametrize(
    ("policy", "needles"),
    [
        ({"layers": {"conv9": {"w_bits": 4}}}, ("policy.layers", "'conv9'")),
        ({"layers": {"_default": {"w_bits": 40}}}, ("w_bits", "40")),
        ({"layers": {"_default": {"w_bits": 0}}}, ("w_bits", "0")),
        ({"layers": {"_default": {"keep_ratio": 1.5}}}, ("keep_ratio", "1.5")),
        ({"layers": {"_default": {"keep_ratio": 0}}}, ("keep_ratio", "0")),
    ],
)
def test_bad_policy_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: dict, needles: tuple[str, ...]) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    expect_error(capsys, ["cost", "--model", "digits_cnn", "--policy", str(path)], *needles)


def test_policy_that_is_not_json_or_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("layers: [unclosed\n  - : :")
    expect_error(capsys, ["cost", "--model", "digits_cnn", "--policy", str(path)], "not valid JSON/YAML", str(path))


def test_unknown_study_for_pareto_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = f"sqlite:///{tmp_path / 'none.db'}"
    expect_error(capsys, ["pareto", "--study", "nope", "--storage", storage], "--storage")
    import optuna

    optuna.create_study(study_name="other", storage=storage)
    expect_error(capsys, ["pareto", "--study", "nope", "--storage", storage], "--study", "'nope'")
    expect_error(capsys, ["export", "--study", "nope", "--storage", storage, "--out", str(tmp_path / "x")], "'nope'")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("spec_name", "content", "needles"),
    [
        ("space", "layers:\n  conv9: {w_bits: 4}\n", ("'conv9'",)),
        ("space", "layers:\n  _default: {w_bits: {choices: []}}\n", ("non-empty",)),
        ("space", "layers:\n  _default: {w_bits: {low: 8, high: 2}}\n", ("low=8 > high=2",)),
        ("space", "colour: 3\n", ("'colour'",)),
        ("objectives", "objectives: [{metric: speed}]\n", ("'speed'",)),
        ("objectives", "objectives: [{metric: bops, direction: upward}]\n", ("direction",)),
        ("objectives", "objectives: [{metric: bops}]\nconstraints: ['latency <= 1']\n", ("latency",)),
    ],
)
def test_bad_search_input_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, spec_name: str, content: str, needles: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{spec_name}.yaml"
    path.write_text(content)
    expect_error(capsys, ["search", f"--{spec_name}", str(path), "--trials", "2", "--quiet"], *needles)
    assert not (tmp_path / ".autoprune").exists(), "no training may start on bad input"


def test_unreachable_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, ["search", "--storage", "postgresql://nobody@127.0.0.1:9/none", "--trials", "1", "--quiet"], "--storage")
    expect_error(capsys, ["search", "--storage", f"sqlite:///{tmp_path}/missing/dir/x.db", "--trials", "1", "--quiet"], "--storage")


def test_bad_argument_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--trials", "many"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--trials" in proc.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["search", "--timeout", "-1"], "--timeout"),
        (["search", "--timeout", "0"], "--timeout"),
        (["search", "--timeout", "nan"], "--timeout"),
        (["search", "--timeout", "inf"], "--timeout"),
        (["search", "--trials", "0"], "--trials"),
        (["search", "--trials", "-5"], "--trials"),
        (["search", "--jobs", "0"], "--jobs"),
        (["search", "--seed", "-1"], "--seed"),
        (["search", "--workers", "0"], "--workers"),
        (["search", "--cpus-per-trial", "0"], "--cpus-per-trial"),
        (["search", "--gpus-per-trial", "-1"], "--gpus-per-trial"),
        (["search", "--retries", "-1"], "--retries"),
        (["search", "--epochs", "0"], "--epochs"),
        (["search", "--task-seed", "-1"], "--task-seed"),
        (["search", "--priors", "bits"], "--priors"),
        (["search", "--space", "no_such_space"], "--space"),
        (["search", "--objectives", "no_such_objectives"], "--objectives"),
        (["apply", "p.yaml", "--epochs", "-3"], "--epochs"),
        (["signals", "--epochs", "zero"], "--epochs"),
        (["worker", "--study", "s", "--storage", "sqlite:///x.db", "--threads", "0"], "--threads"),
        (["ui", "--port", "0"], "--port"),
        (["ui", "--port", "70000"], "--port"),
        (["cost", "--model", "digits_cnn", "--task-seed", "-2"], "--task-seed"),
    ],
)
def test_numbers_out_of_range_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], flag: str) -> None:
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, args, flag)
    assert not list(tmp_path.iterdir()), "nothing may be written on bad input"
