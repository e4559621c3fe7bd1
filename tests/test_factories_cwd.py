"""Factories from the working directory (issue 23 item 5): ``--model mymod:factory`` and ``--task mymod:fn``
import from the current directory as under ``python -m``, for the ``autoprune`` console script and the worker
processes it starts, without ``PYTHONPATH=.``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoprune.usercode import load_reference

REPO = Path(__file__).resolve().parent.parent
FACTORY = """
from torch import nn


def small():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
"""


def console_script(folder: Path) -> Path:
    """What pip installs as ``autoprune``: a script in its own folder, which puts that folder on sys.path, not
    the working directory (``python -m`` and ``python -c`` would put the working directory there)."""
    folder.mkdir()
    script = folder / "autoprune_script.py"
    script.write_text("import sys\nfrom autoprune.cli import main\nsys.exit(main())\n")
    return script


@pytest.mark.e2e
def test_the_console_script_imports_a_factory_from_the_working_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymod.py").write_text(FACTORY)
    script = console_script(tmp_path / "bin")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(script), "cost", "--model", "mymod:small", "--input", "1x8x8", "--json"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 4 filters of 9 weights at 64 positions, then 256 x 10
    assert json.loads(proc.stdout)["total"]["macs"] == 4 * 9 * 64 + 256 * 10


@pytest.mark.e2e
def test_a_reference_from_the_working_directory_reaches_the_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymod_workers.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert callable(load_reference("mymod_workers:small", field="--model"))
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), str(REPO)]
    # a worker starts elsewhere (Ray trials run in their own folders) with the environment it inherits
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(console_script(tmp_path / "bin")), "cost", "--model", "mymod_workers:small", "--input", "1x8x8", "--json"],
                          cwd=elsewhere, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


GROUPED = """
from torch import nn


def grouped():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
"""


@pytest.mark.e2e
def test_apply_says_which_widths_it_kept_and_why(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "mymod_grouped.py").write_text(GROUPED)
    sys.path.insert(0, str(tmp_path))
    try:
        from mymod_grouped import grouped
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    save_file(grouped().state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "policy.json").write_text(json.dumps({"layers": {"_default": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 4}}, "finetune_steps": 0}))
    script = console_script(tmp_path / "bin")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    args = [sys.executable, str(script), "apply", "policy.json", "--model", "mymod_grouped:grouped", "--weights", "weights.safetensors", "--device", "cpu"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "width kept (pinned) for 0, 2: its channels reach grouped convolution 2 (groups=2)" in " ".join(proc.stdout.split())
