"""Shared fixtures: every test gets its own cache, Optuna file and MLflow store in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Session scope, so that module-scoped fixtures training a base model see it too: they must never
    # write into the checkout's own .autoprune/cache, which `make run` would then load without S/N record.
    # The trained digits model is shared by the whole session (it is deterministic).
    os.environ["AUTOPRUNE_CACHE"] = str(tmp_path_factory.getbasetemp() / "model-cache")
