"""`import autoprune` stays lean: ray, mlflow and torchvision load only where they are used (design decision 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("ray", "mlflow", "torchvision")

# Listed only where the file exists, so the check covers modules as they land without failing before they do.
CANDIDATES = (
    "autoprune",
    "autoprune.errors",
    "autoprune.policy",
    "autoprune.task",
    "autoprune.models",
    "autoprune.data",
    "autoprune.vision",
    "autoprune.api",
    "autoprune.device",
    "autoprune.weights",
    "autoprune.cli",
)


def _exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_import_does_not_load_ray_mlflow_or_torchvision() -> None:
    modules = [m for m in CANDIDATES if _exists(m)]
    assert "autoprune" in modules
    # A fresh interpreter, since this test process may already hold any of them. Imports accumulate, so a heavy
    # package is blamed on the first module after whose import it appears.
    code = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "blame = {}\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        "    for h in heavy:\n"
        "        if h in sys.modules:\n"
        "            blame.setdefault(h, module)\n"
        "print(json.dumps(blame))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    blame = json.loads(out.stdout.strip().splitlines()[-1])
    assert blame == {}, f"imported eagerly (package: first module that pulled it in): {blame}"
