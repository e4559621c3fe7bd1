"""The Python API: everything the CLI does, on the user's own model, data, metric and device.

    task = autoprune.Task.from_model(model, train=train_loader, val=val_loader)
    result = autoprune.search(task, trials=60)
    compressed = autoprune.apply(model, result.front()[0].policy, task=task)

``search`` runs on the study runner (``autoprune.search.runner``) through ``run_search``; ``space`` and
``objectives`` take a shipped name, a YAML/JSON file, or a mapping of the same shape.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autoprune.errors import AutopruneError
from autoprune.policy import Policy
from autoprune.task import Task


def _spec(kind: str, value: str | Path | Mapping[str, Any], loader: Any, field_name: str) -> Any:
    """A spec from a mapping, a file, or the name of a shipped spec (``default`` -> search_spaces/default.yaml)."""
    from autoprune.specs import shipped

    if isinstance(value, Mapping):
        return loader.from_dict(dict(value), source=field_name)
    return loader.load(shipped(kind, str(value)))


def _policy(policy: Policy | str | Path | Mapping[str, Any]) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(dict(policy))
    return Policy.load(policy)


def _on_device(task: Task, device: str | None) -> Task:
    """``device`` overrides the task's (checked now, before any work); None keeps the task's own."""
    if device is not None:
        from autoprune.device import resolve_device

        task.device = resolve_device(device)
    return task


def apply(model: nn.Module, policy: Policy | str | Path | Mapping[str, Any], *, task: Task, device: str | None = None) -> Any:
    """Compress ``model`` with ``policy`` on the task's data (fine-tune, calibration, BN update) and device.

    Returns a ``CompressionResult``: ``.model``, ``.cost(task.input_shape)``, ``.summary()`` per layer.
    The given model is not changed.
    """
    from autoprune.compress import compress

    _on_device(task, device)
    # The policy check traces the model with a CPU input: a model on a GPU is read through a CPU copy.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return compress(model if on_cpu else copy.deepcopy(model).cpu(), _policy(policy), task=task)


def cost(model: nn.Module, *, input_shape: tuple[int, ...], policy: Policy | str | Path | Mapping[str, Any] | None = None) -> Any:
    """The cost model (MACs, BOPs, ESN, memory) of ``model``, float or with ``policy`` applied statically (no data)."""
    from autoprune.compress import static_compress
    from autoprune.cost import measure_cost

    if policy is None:
        return measure_cost(model, input_shape=tuple(input_shape))
    return static_compress(model, _policy(policy), input_shape=tuple(input_shape)).cost(tuple(input_shape))


@dataclass(frozen=True)
class FrontPoint:
    """One Pareto-optimal trial: its policy and every metric it recorded."""

    trial: int
    policy: Policy
    metrics: dict[str, float] = field(default_factory=dict)


class SearchResult:
    """A finished (or resumed) study: its front, the base model's metric, and export."""

    def __init__(self, study: Any, task: Task) -> None:
        self.study = study
        self.task = task

    @property
    def base(self) -> dict[str, Any]:
        from autoprune.search.record import read_meta

        meta = read_meta(self.study)
        return meta.base.model_dump() if meta is not None and meta.base is not None else {}

    @property
    def base_metric(self) -> float:
        """The task's metric of the base model (the given weights of a user task) on the search's val split."""
        return float(self.base["val_accuracy"])

    @property
    def priors(self) -> dict[str, Any]:
        """Where the S/N priors came from (``training``, ``finetune``) or ``none`` and why."""
        return dict(self.base.get("priors", {}))

    def front(self) -> list[FrontPoint]:
        from autoprune.search.pareto import front_trials
        from autoprune.search.record import read_trial

        records = [(t.number, read_trial(t)) for t in sorted(front_trials(self.study), key=lambda t: t.number)]
        return [FrontPoint(number, Policy.from_dict(r.policy or {}), dict(r.metrics or {})) for number, r in records]

    def export(
        self, directory: str | Path, *, select: str = "pareto", replay: bool = True, format: str = "policy",
        register: str | None = None, tracking_uri: str | None = None,
    ) -> Any:
        """Write what ``autoprune export`` writes: policies, front.csv/json, report.json/md; with
        ``format="onnx"`` each point's ONNX file and packed weights too (``register``: Model Registry name)."""
        from autoprune.export import export_study

        return export_study(self.study, out=Path(directory), select=select, replay=replay, format=format, register=register, tracking_uri=tracking_uri)


def search(
    task: Task,
    *,
    space: str | Path | Mapping[str, Any] = "default",
    objectives: str | Path | Mapping[str, Any] = "accuracy_bops",
    trials: int = 60,
    study: str = "autoprune",
    storage: str | None = None,
    tracking_uri: str | None = None,
    sampler: str = "tpe",
    device: str | None = None,
    executor: str = "local",
    priors: bool = True,
    seed: int = 0,
    jobs: int = 1,
    timeout: float | None = None,
    progress: bool = False,
    confirm: int = 0,
) -> SearchResult:
    """Search compression policies of ``task``'s model: an Optuna study in ``storage``, tracked in MLflow.

    ``priors=False`` enqueues no S/N prior (and a user task skips its S/N fine-tune); the study records why.
    Worker processes (``jobs > 1``, Ray) rebuild a user task from its ``reference``.
    ``confirm=R`` re-runs each front candidate with R fine-tuning seeds after the search and recomputes
    the front from the means (export then reports validation and test side by side).
    """
    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.search.runner import SearchConfig, run_search
    from autoprune.search.space import SpaceSpec

    if not isinstance(task, Task):
        raise AutopruneError("task", type(task).__name__, "is not an autoprune.Task (build one with Task.from_model)")
    _on_device(task, device)
    if (jobs > 1 or executor != "local") and task.is_user and task.record().get("reference") is None:
        raise AutopruneError("jobs" if jobs > 1 else "executor", jobs if jobs > 1 else executor, "needs a task other processes can rebuild: Task.from_model(..., reference='package.module:function')")
    space_spec = _spec("search_spaces", space, SpaceSpec, "space")
    objective_spec = _spec("objectives", objectives, ObjectiveSpec, "objectives")
    if not priors:
        task.skip_signals(reason="priors=False: no S/N prior is enqueued")
    config = SearchConfig(
        study_name=study, storage=storage, trials=trials, timeout=timeout, sampler=sampler, seed=seed, jobs=jobs,
        tracking_uri=tracking_uri, priors=priors, executor=executor, progress=progress, confirm=confirm,
    )
    outcome = run_search(config, task=task, space=space_spec, objectives=objective_spec)
    return SearchResult(outcome.study, task)
