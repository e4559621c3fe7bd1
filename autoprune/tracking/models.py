"""An exported ONNX file as an MLflow model of its trial's run, and in the Model Registry.

Plain arguments only (a tracking URI, a run id, a verified file, its example input and output, tags): export
builds and checks the ONNX file and hands it here; nothing here builds or runs a model. The registry works on any store MLflow's registry supports, the default SQLite file
included. mlflow's fluent API holds the tracking URI globally: each call sets it for its own duration only
(``store.fluent_store``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from autoprune.deps import require
from autoprune.tracking.store import fluent_store

ARTIFACT_NAME = "onnx_model"
TAG_PREFIX = "autoprune."


def registry_tags(*, study: str, policy_json: str, metrics: Mapping[str, float]) -> dict[str, str]:
    """The tags of a registered version: the study, the policy (compact JSON) and each metric."""
    compact = json.dumps(json.loads(policy_json), separators=(",", ":"))
    tags = {f"{TAG_PREFIX}study": study, f"{TAG_PREFIX}policy": compact}
    tags.update({f"{TAG_PREFIX}metric.{name}": repr(float(value)) for name, value in metrics.items()})
    return tags


def trial_run_ids(*, tracking_uri: str, parent_run_id: str | None) -> dict[int, str]:
    """Trial number -> its MLflow run (a child of the study's parent run); empty where the store has none.
    One client and one search for a whole export: opening a client checks the store (about 0.7 s)."""
    from autoprune.tracking.store import all_runs, open_client
    from autoprune.tracking.tracker import PARENT_TAG, TRIAL_TAG

    if not parent_run_id:
        return {}
    client = open_client(tracking_uri)
    try:
        experiment = client.get_run(parent_run_id).info.experiment_id
    except Exception:  # MLflow raises its own error for a run this store does not hold
        return {}
    found: dict[int, str] = {}
    for run in all_runs(client, experiment, f"tags.{PARENT_TAG} = '{parent_run_id}'"):
        number = run.data.tags.get(TRIAL_TAG, "")
        if number.isdigit():
            found.setdefault(int(number), run.info.run_id)
    return found


def log_onnx_model(
    *, tracking_uri: str, run_id: str, onnx_path: str | Path, input_example: np.ndarray, output_example: np.ndarray,
    name: str = ARTIFACT_NAME, tags: Mapping[str, str] | None = None,
) -> str:
    """Log the file in the run as an MLflow model (onnx flavour) with the example and its signature; its URI.

    The signature is inferred from the example and the model's output on it (the caller ran the file), so it
    names the real input and output shapes (batch dimension free).
    """
    onnx = require("onnx")
    example = np.asarray(input_example, dtype=np.float32)
    output = np.asarray(output_example)
    with fluent_store(tracking_uri) as mlflow:
        from mlflow.models import infer_signature

        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name=name, input_example=example, signature=infer_signature(example, output),
                save_as_external_data=False, tags=dict(tags or {}), onnx_execution_providers=["CPUExecutionProvider"],
                # what MLflow would infer (onnx, onnxruntime, numpy; it adds itself), given: its inference loads
                # the model in a subprocess and takes 2 s a model, the longest part of an ONNX export's logging
                pip_requirements=[*mlflow.onnx.get_default_pip_requirements(), f"numpy=={np.__version__}"],
            )
    return info.model_uri


def register_onnx_model(*, tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> int:
    """Register a logged model under ``name`` (created on first use) with ``tags``; the new version number."""
    with fluent_store(tracking_uri) as mlflow:
        version = mlflow.register_model(model_uri, name, tags=dict(tags))
    return int(version.version)


def load_registered_onnx(*, tracking_uri: str, name: str, version: int | str = "latest") -> Any:
    """The ONNX ModelProto of a registered version, through ``mlflow.onnx.load_model``."""
    with fluent_store(tracking_uri) as mlflow:
        return mlflow.onnx.load_model(f"models:/{name}/{version}")
