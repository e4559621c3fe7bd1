"""An exported ONNX file as an MLflow model of its trial's run, and in the Model Registry.

Plain arguments only (a tracking URI, a run id, a verified file, its example input and output, tags): export
builds and checks the ONNX file and hands it here; nothing here builds or runs a model. The registry works on any store MLflow's registry supports, the default SQLite file
included. mlflow's fluent API holds the tracking URI globally: each call sets it for its own duration only.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from autoprune.deps import require

ARTIFACT_NAME = "onnx_model"
TAG_PREFIX = "autoprune."


@contextmanager
def _tracking(tracking_uri: str) -> Iterator[Any]:
    import mlflow

    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)


def registry_tags(*, study: str, policy_json: str, metrics: Mapping[str, float]) -> dict[str, str]:
    """The tags of a registered version: the study, the policy (compact JSON) and each metric."""
    compact = json.dumps(json.loads(policy_json), separators=(",", ":"))
    tags = {f"{TAG_PREFIX}study": study, f"{TAG_PREFIX}policy": compact}
    tags.update({f"{TAG_PREFIX}metric.{name}": repr(float(value)) for name, value in metrics.items()})
    return tags


def trial_run_id(*, tracking_uri: str, parent_run_id: str | None, trial: int) -> str | None:
    """The MLflow run of a study's trial (a child of the study's parent run), or None where the store has none."""
    from autoprune.tracking.store import open_client
    from autoprune.tracking.tracker import PARENT_TAG, TRIAL_TAG

    if not parent_run_id:
        return None
    client = open_client(tracking_uri)
    try:
        experiment = client.get_run(parent_run_id).info.experiment_id
    except Exception:  # MLflow raises its own error for a run this store does not hold
        return None
    runs = client.search_runs([experiment], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial}'", max_results=1)
    return runs[0].info.run_id if runs else None


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
    with _tracking(tracking_uri) as mlflow:
        from mlflow.models import infer_signature

        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name=name, input_example=example, signature=infer_signature(example, output),
                save_as_external_data=False, tags=dict(tags or {}), onnx_execution_providers=["CPUExecutionProvider"],
            )
    return info.model_uri


def register_onnx_model(*, tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> int:
    """Register a logged model under ``name`` (created on first use) with ``tags``; the new version number."""
    with _tracking(tracking_uri) as mlflow:
        version = mlflow.register_model(model_uri, name, tags=dict(tags))
    return int(version.version)


def load_registered_onnx(*, tracking_uri: str, name: str, version: int | str = "latest") -> Any:
    """The ONNX ModelProto of a registered version, through ``mlflow.onnx.load_model``."""
    with _tracking(tracking_uri) as mlflow:
        return mlflow.onnx.load_model(f"models:/{name}/{version}")
