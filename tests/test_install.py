"""A user's install: the wheel, installed (not editable) into a folder of its own, runs a search from an
unrelated folder, its shipped specs found as package data. Marked e2e (builds a wheel, trains the base)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_an_installed_wheel_searches_from_another_folder(tmp_path: Path) -> None:
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True, timeout=300)
    (wheel,) = wheels.glob("autoprune-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    assert (target / "autoprune" / "specs" / "search_spaces" / "default.yaml").is_file()

    # Only the installed copy is importable: no checkout on the path, run from a folder that holds nothing.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    code = "import autoprune, sys; from autoprune.cli import main; print(autoprune.__file__, file=sys.stderr); sys.exit(main(sys.argv[1:]))"
    args = ["search", "--trials", "2", "--no-priors", "--quiet", "--sampler", "random"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[0].startswith(str(target)), proc.stderr
    assert "Creating initial MLflow database tables" not in proc.stderr + proc.stdout
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{elsewhere / 'autoprune.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert study.metric_names == ["accuracy", "bops"]
