"""The Python API: everything the CLI does, on the user's own model, data, metric and device.

    task = autoprune.Task.from_model(model, train=train_loader, val=val_loader)
    result = autoprune.search(task, trials=60)
    compressed = autoprune.apply(model, result.front()[0].policy, task=task)

Each command of the CLI parses its flags into these functions' arguments and calls one of them: ``search``,
``apply``, ``cost``, ``export``, ``pareto``, ``signals``, ``worker``, ``ui``. Every function's arguments are
checked against its own signature before any work (``validated.validated``: strict types and the constraints
the annotations give), then by the models they build (``SearchConfig``, ``TaskArgs``); any refusal is one
``AutopruneError`` naming the argument and the value. This is the one module that builds a ``SearchConfig``.
``space`` and ``objectives`` take a shipped name, a YAML/JSON file, or a mapping of the same shape.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from autoprune.errors import AutopruneError, FaultError, disk_full
from autoprune.files import EXPORT_MARKER
from autoprune.policy import Policy
from autoprune.task import Task
from autoprune.validated import NaturalInt, Port, PositiveFloat, PositiveInt, RegistryName, Share, Sizes, StudyName, Text, Validated, validated

if TYPE_CHECKING:
    import optuna

    from autoprune.compress import CompressionResult
    from autoprune.cost import CostReport
    from autoprune.export import Exported
    from autoprune.search.study import RayOptions, SearchConfig, SearchContext
    from autoprune.sensitivity import SensitivityTable

Format = Literal["policy", "onnx"]
# worker processes of one search per core of this machine, at most: more only slow every trial down (a search
# of --jobs 1000 started 999 processes on two cores)
JOBS_PER_CORE = 4
NOT_REBUILDABLE = "needs a task other processes can rebuild: Task.from_model(..., reference='package.module:function')"


def _check_jobs(jobs: int) -> None:
    cores = os.cpu_count() or 1
    if jobs > JOBS_PER_CORE * cores:
        raise AutopruneError("jobs", jobs, f"is more than {JOBS_PER_CORE} processes for each of the {cores} cores of this machine (each process trains its own trials)")


def _rebuildable(task: Task) -> bool:
    """Whether another process can rebuild the task from its record (a built-in spec, weights, a reference)."""
    return not task.is_user or task.record().get("reference") is not None


class TaskArgs(Validated):
    """A task named the way the CLI's flags name it: a built-in one (``model`` on ``dataset``, trained once and
    cached), ``model`` with the user's ``weights`` on a built-in dataset (nothing trained), or ``reference``, a
    ``package.module:function`` returning the user's ``Task``."""

    model: str = "digits_cnn"
    dataset: str | None = None
    data_dir: str | Path | None = None
    epochs: PositiveInt | None = None
    seed: NaturalInt = 0
    weights: str | Path | None = None
    reference: str | None = None
    device: str | None = None
    val_samples: PositiveInt | None = None
    bf16: bool = False

    def build(self) -> Task:
        """The task, its device checked first (before any data is read or model trained)."""
        from autoprune.task import cli_task

        return cli_task(
            model=self.model, weights=self.weights, task=self.reference, dataset=self.dataset,
            data_dir=str(self.data_dir) if self.data_dir is not None else None, seed=self.seed, epochs=self.epochs,
            device=self.device, val_samples=self.val_samples, bf16=self.bf16,
        )


def task_of(task: Task | TaskArgs | Mapping[str, Any] | None) -> Task:
    """A Task from a Task, task arguments (or their mapping), or None (the default built-in task)."""
    if isinstance(task, Task):
        return task
    if task is None:
        return TaskArgs().build()
    if isinstance(task, Mapping):
        task = TaskArgs(**task)
    if not isinstance(task, TaskArgs):
        raise AutopruneError("task", type(task).__name__, "is not an autoprune.Task (build one with Task.from_model) nor task arguments")
    return task.build()


def _spec(kind: str, value: str | Path | Mapping[str, Any], loader: Any, field_name: str) -> Any:
    """A spec from a mapping, a file, or the name of a shipped spec (``default`` -> search_spaces/default.yaml)."""
    from autoprune.specs import shipped

    if isinstance(value, Mapping):
        return loader.from_dict(dict(value), source=field_name)
    if not isinstance(value, (str, Path)):
        raise AutopruneError(field_name, type(value).__name__, "must be a shipped name, a file or a mapping")
    return loader.load(shipped(kind, str(value)))


def _policy(policy: Policy | str | Path | Mapping[str, Any]) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(dict(policy))
    if not isinstance(policy, (str, Path)):
        raise AutopruneError("policy", type(policy).__name__, "must be a Policy, a policy file or a mapping")
    return Policy.load(policy)


def _on_device(task: Task, device: str | None) -> Task:
    """``device`` overrides the task's (checked now, before any work); None keeps the task's own."""
    if device is not None:
        from autoprune.device import resolve_device

        task.device = resolve_device(device)
    return task


# --- apply and cost --------------------------------------------------------------------------------


@validated
def apply(
    model: nn.Module | None, policy: Policy | str | Path | Mapping[str, Any], *, task: Task | TaskArgs | Mapping[str, Any] | None = None,
    device: str | None = None, score: bool = False, out: str | Path | None = None,
) -> CompressionResult:
    """Compress ``model`` with ``policy`` on the task's data (fine-tune, calibration, BN update) and device. The
    given model is not changed. ``model=None`` takes the task's base model (a built-in task's, trained once
    and cached; ``task=None``: the default built-in task); your own model needs its ``task``
    (``Task.from_model(model, train=..., val=...)``), whose data fine-tunes and calibrates it.

    Returns a ``CompressionResult``: ``.model`` (the compressed ``nn.Module``), ``.cost(task.input_shape)``,
    ``.summary()`` (a per-layer table; ``print`` it). ``score=True`` fills ``.metrics`` with the task's metric
    on val and test (and the base model's); ``out`` saves it: ``FILE.onnx`` as ONNX with QDQ nodes and packed
    weights (``.deployed`` measures them), anything else as safetensors with its policy.
    """
    from autoprune.compress import check_policy, compress, save_compressed
    from autoprune.files import check_writable

    if model is not None and task is None:
        raise AutopruneError("task", None, "is required with your own model: apply(model, policy, task=Task.from_model(model, train=..., val=...)) gives the data it is fine-tuned and calibrated on")
    chosen = _policy(policy)
    onnx_out = out is not None and Path(out).suffix == ".onnx"
    if onnx_out:
        from autoprune.deps import require

        for package in ("onnx", "onnxruntime"):
            require(package)
    if out is not None:
        check_writable("out", out)
    built = _on_device(task_of(task), device)
    evaluator = None
    if model is None:
        # on a freshly built model: a policy the model cannot take is refused before its base model is trained
        check_policy(built.build(), chosen, input_shape=built.input_shape)
        from autoprune.search.evaluate import Evaluator

        evaluator = Evaluator.for_task(built, progress=False)
        model = evaluator.base.model
    # The policy check traces the model with a CPU input: a model on a GPU is read through a CPU copy.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    result = compress(model if on_cpu else copy.deepcopy(model).cpu(), chosen, task=built)
    if score:
        if evaluator is None:
            from autoprune.search.evaluate import Evaluator

            evaluator = Evaluator.for_task(built, progress=False)
        name = built.metric_name
        result.metrics = {**evaluator.score(result, test=True), f"base_{name}": evaluator.base.val_accuracy, f"base_test_{name}": evaluator.base.test_accuracy}
    if onnx_out:
        from autoprune.deploy.point import deploy_point

        path = Path(out)  # type: ignore[arg-type]
        base = evaluator.base.model if evaluator is not None else model
        result.deployed = deploy_point(result, task=built, base_model=base, onnx_path=path, packed_path=path.with_suffix(".apw"))
    elif out is not None:
        save_compressed(result, out, task=built)
    return result


@validated
def cost(
    model: nn.Module | str | Task, *, input_shape: Sizes | None = None, policy: Policy | str | Path | Mapping[str, Any] | None = None,
    weights: str | Path | None = None, dataset: str | None = None, seed: NaturalInt = 0,
) -> CostReport:
    """The cost model (MACs, BOPs, ESN, memory) of ``model``, float or with ``policy`` applied statically (no data).

    ``model``: a module, a zoo name or ``package.module:factory`` (with ``weights``, else the cached trained
    base model's when there is one, the model's on ``dataset`` with task seed ``seed``: ESN depends on weight
    values), or a Task (its model and input shape).
    """
    from autoprune.compress import static_compress
    from autoprune.cost import measure_cost
    from autoprune.models import build_model, default_input_shape

    chosen = _policy(policy) if policy is not None else None
    source = None
    if isinstance(model, Task):
        if weights is not None:
            raise AutopruneError("weights", str(weights), "cannot go with a task (the task brings its own weights)")
        known, name, net = tuple(model.input_shape), model.key(), None
    elif isinstance(model, str):
        known, name, net = default_input_shape(model), model, None
    else:
        known, name, net = None, type(model).__name__, model
    shape = _input_shape(input_shape, known, name)
    if isinstance(model, Task):
        net, source = model.build(), "trained weights"
    elif isinstance(model, str):
        net = build_model(model, in_channels=shape[0], convert=weights is None)
        if weights is not None:
            from autoprune.weights import load_weights

            net, source = load_weights(net, weights), "trained weights"
        else:
            source = _cached_weights(model, net, dataset=dataset, seed=seed, shape=shape, given=input_shape is not None)
    assert net is not None
    report = static_compress(net, chosen, input_shape=shape).cost(shape) if chosen is not None else measure_cost(net, input_shape=shape)
    return replace(report, weights=source)


def _input_shape(given: Sequence[int] | None, known: tuple[int, ...] | None, name: str) -> tuple[int, ...]:
    if given is None:
        if known is None:
            raise AutopruneError("input_shape", None, f"is required for model {name!r} (give CxHxW or CxL)")
        return known
    shape = tuple(given)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise AutopruneError("input_shape", given, "must be positive integer sizes of one sample, e.g. (3, 32, 32) or (1, 40)")
    if known is not None and len(shape) != len(known):
        raise AutopruneError("input_shape", "x".join(map(str, shape)), f"has {len(shape)} sizes, but {name} reads {'x'.join(map(str, known))}")
    return shape


def _cached_weights(model_name: str, net: nn.Module, *, dataset: str | None, seed: int, shape: tuple[int, ...], given: bool) -> str:
    """Load the cached trained base model's weights when there is one for this zoo model on ``dataset``; says
    which weights the report reads. A cached model that cannot read the asked input is refused, not replaced
    by random weights in silence."""
    from autoprune.task import task_for

    untrained = "untrained weights (no cached base model: ESN uses random init)"
    try:
        task = task_for(model_name, dataset=dataset, seed=seed)
    except AutopruneError:
        return untrained
    weights = task.cache_dir() / "model.safetensors"
    if not weights.is_file():
        return untrained
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(weights))
    except RuntimeError:
        if given:
            raise AutopruneError("input_shape", "x".join(map(str, shape)), f"does not fit the trained {model_name} cached for {task.spec.dataset if task.spec else 'its dataset'} (give --weights of a model of that input)") from None
        return untrained
    except OSError:  # a damaged cache file: random init it is, and said so
        return "untrained weights (the cached base model could not be read: ESN uses random init)"
    return "trained weights"


# --- search ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontPoint:
    """One Pareto-optimal trial: its policy and every metric it recorded."""

    trial: int
    policy: Policy
    metrics: dict[str, float] = field(default_factory=dict)


class SearchResult:
    """A finished (or resumed, or reopened) study: its front, the base model's metric, and export.

    It keeps the task and, after a search, the context the search ran with (its evaluator included), so
    export replays the front on them instead of rebuilding them from the study's record.
    """

    def __init__(self, study: optuna.Study, task: Task | None = None, *, context: SearchContext | None = None, tracking_uri: str | None = None) -> None:
        self.study = study
        self._context = context
        self.task = task if task is not None else context.task if context is not None else None
        self.tracking_uri = tracking_uri

    @property
    def context(self) -> SearchContext:
        if self._context is None:
            from autoprune.search.study import context_from_study

            self._context = context_from_study(self.study, task=self.task)
            self.task = self._context.task
        return self._context

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

    def rows(self) -> dict[str, Any]:
        """The front as ``autoprune pareto --json`` gives it: the study, its base model, hypervolume and rows."""
        from autoprune.search.report import front_rows

        return front_rows(self.study)

    def table(self) -> str:
        """The front as the CLI prints it (``autoprune pareto``): one row per point, its metric with its
        interval, its costs and its policy; ``print(result.table())``."""
        from rich.console import Console

        from autoprune.search.report import print_front

        console = Console(width=200, record=True, file=io.StringIO())
        print_front(self.rows(), console=console)
        return console.export_text()

    @validated
    def plot(self, path: str | Path = "pareto_front.png") -> Path:
        """Draw the front against every cost objective (``pareto_front.png`` of the MLflow parent run) to
        ``path``; returns the path."""
        from autoprune import plots
        from autoprune.files import atomic_path, check_writable
        from autoprune.search.front import Front
        from autoprune.search.objectives import ObjectiveSpec
        from autoprune.search.record import read_meta

        check_writable("path", path)
        meta = read_meta(self.study)
        assert meta is not None, "a SearchResult holds an autoprune study"
        snapshot = Front(self.study, meta).snapshot()
        points = [plots.TrialPoint(n, row.metrics, snapshot.ranks.get(n), row.prior, row.summary, row.strategy) for n, row in snapshot.rows.items()]
        base = None
        if meta.base is not None:
            base = {**meta.base.cost, meta.base.metric: meta.base.val_accuracy, f"{meta.base.metric}_drop": 0.0}
        title = f"{self.study.study_name}: Pareto front ({len(snapshot.front)} of {len(points)} complete trials)"
        with atomic_path(path) as tmp:
            plots.pareto_png(points, ObjectiveSpec.from_dict(meta.objectives).metrics, tmp, base=base, title=title)
        return Path(path)

    @validated
    def export(
        self, directory: str | Path, *, select: str = "pareto", replay: bool = True, format: Format = "policy",
        register: RegistryName | None = None, tracking_uri: Text | None = None,
    ) -> Exported:
        """Write what ``autoprune export`` writes: policies, front.csv/json, report.json/md; with
        ``format="onnx"`` each point's ONNX file and packed weights too, logged as MLflow models in the trials'
        runs of ``tracking_uri`` (default: the store the search tracked to) and, with ``register``, registered
        under that name in the Model Registry. Every argument is checked before any work."""
        from autoprune.export import check_export, export_study

        uri = tracking_uri if tracking_uri is not None else self.tracking_uri
        check_export(directory, select=select, format=format, register=register, tracking_uri=uri)
        return export_study(self.context, out=Path(directory), select=select, replay=replay, format=format, register=register, tracking_uri=uri)


def search_config(*, priors: bool | Sequence[str] = True, ray: RayOptions | Mapping[str, Any] | None = None, **options: Any) -> SearchConfig:
    """The validated configuration of a search from ``search``'s keyword arguments (``trials``, ``study``, ...;
    also ``task`` as a built-in ``TaskSpec`` and ``space_path`` / ``objectives_path`` for the runner's own use):
    the one place a ``SearchConfig`` is built."""
    from autoprune.search.study import RayOptions, SearchConfig

    if ray is not None and not isinstance(ray, (RayOptions, Mapping)):
        raise AutopruneError("ray", ray, "must be RayOptions or a mapping of its fields (address, workers, cpus_per_trial, gpus_per_trial, retries)")
    ray_options = ray if isinstance(ray, RayOptions) else RayOptions(**dict(ray or {}))
    return SearchConfig(priors=priors if isinstance(priors, bool) else tuple(priors), ray=ray_options, **options)


@validated
def search(
    task: Task | TaskArgs | Mapping[str, Any] | None = None,
    *,
    space: str | Path | Mapping[str, Any] = "default",
    objectives: str | Path | Mapping[str, Any] = "accuracy_bops",
    trials: PositiveInt = 60,
    study: StudyName = "autoprune",
    storage: Text | None = None,
    tracking_uri: Text | None = None,
    sampler: str = "tpe",
    device: str | None = None,
    executor: str = "local",
    priors: bool | Sequence[str] = True,
    seed: NaturalInt = 0,
    jobs: PositiveInt = 1,
    timeout: PositiveFloat | None = None,
    confirm: NaturalInt = 0,
    fidelity: Share | None = None,
    budget_steps: PositiveInt | None = None,
    ladder: bool = True,
    finalize: bool = False,
    final_steps: PositiveInt | None = None,
    final_seeds: PositiveInt = 1,
    ray: RayOptions | Mapping[str, Any] | None = None,
    export: str | Path | None = None,
    progress: bool | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Search compression policies of ``task``'s model: an Optuna study in ``storage``, tracked in MLflow.

    ``task``: a ``Task``, task arguments (``TaskArgs`` or a mapping: a built-in model and dataset, or your
    weights), or None for the default built-in task. ``priors=False`` enqueues no prior (and a user task skips
    its S/N fine-tune; the study records why); a list names the prior kinds. Worker processes (``jobs > 1``,
    Ray) rebuild a user task from its ``reference``. ``confirm=R`` re-runs each front candidate with R
    fine-tuning seeds after the search and recomputes the front from the means. ``fidelity`` (and
    ``budget_steps``) turn on multi-fidelity trials; ``ray`` holds the Ray executor's options
    (``RayOptions``). ``ladder`` (on by default) fine-tunes a trial only when its post-training result could
    still reach the front; ``finalize`` trains the candidates that could be on the final front further
    (``final_steps``, default 1,500, with ``final_seeds`` seeds each), and the front, hypervolume and export
    then read the final models. ``export``: a folder the front is exported to at the end. As the CLI, it
    shows the predicted front, a progress bar and the front table at the end; ``quiet=True`` shows none of
    them (``progress`` sets the bar alone).
    """
    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.search.runner import run_search
    from autoprune.search.space import SpaceSpec

    from autoprune.search.ladder import DEFAULT_STEPS

    config = search_config(
        study=study, storage=storage, trials=trials, timeout=timeout, sampler=sampler, seed=seed, jobs=jobs, tracking_uri=tracking_uri,
        priors=priors, executor=executor, ray=ray, progress=(not quiet) if progress is None else progress, confirm=confirm, fidelity=fidelity,
        budget_steps=budget_steps, ladder=ladder, finalize=finalize, final_steps=DEFAULT_STEPS if final_steps is None else final_steps,
        final_seeds=final_seeds,
    )
    if executor == "local":
        _check_jobs(jobs)
    space_spec = _spec("search_spaces", space, SpaceSpec, "space")
    objective_spec = _spec("objectives", objectives, ObjectiveSpec, "objectives")
    from autoprune.tracking.store import check_writable_store

    check_writable_store(tracking_uri, field="tracking_uri", damage=False)
    if export is not None:
        from autoprune.files import check_writable

        check_writable("export", export, kind="folder", replaces=EXPORT_MARKER)
    built = _on_device(task_of(task), device)
    if (jobs > 1 or executor != "local") and not _rebuildable(built):
        raise AutopruneError("jobs" if jobs > 1 else "executor", jobs if jobs > 1 else executor, NOT_REBUILDABLE)
    if not config.priors:
        built.skip_signals(reason="priors=False (--no-priors): no S/N prior is enqueued")
    if built.is_user:
        # the user's metric and loss meet the given model now: a metric that returns no number, or no finite
        # one, is refused before the study's database exists (a built-in task's base model is trained later)
        built.base(progress=config.progress)
    try:
        outcome = run_search(config, task=built, space=space_spec, objectives=objective_spec)
    except Exception as exc:
        full = disk_full(exc)
        if full:
            raise FaultError(
                f"the disk is full ({full}): the study keeps every finished trial and the one cut short runs again; "
                "free some space and run the same search to resume"
            ) from exc
        raise
    result = SearchResult(outcome.study, context=outcome.context, tracking_uri=tracking_uri)
    if not quiet:
        from autoprune.search.report import print_front

        print_front(result.rows())
    if export is not None:
        written = result.export(export)
        if not quiet:
            print(f"exported {len(written.policies)} policies to {export} (report: {written.report})")
    return result


@validated
def finalize(
    study: StudyName, *, storage: Text | None = None, steps: PositiveInt | None = None, seeds: PositiveInt = 1, select: str = "pareto",
    out: str | Path | None = None, tracking_uri: Text | None = None, task: Task | None = None, jobs: PositiveInt = 1,
    progress: bool | None = None, quiet: bool = False,
) -> SearchResult:
    """Final training of a stored study's candidates (rung 3 of the fidelity ladder, ``search.finalize``): those
    that could be on the final front (``select="pareto"``; ``"front"``: the whole search front; or a bound), each
    continued from its fine-tuned weights by ``steps`` (default 1,500) more steps of the recipe with ``seeds``
    seeds; the front is recomputed from the final results, and ``out`` exports the trained weights (with the
    policy; ONNX too when the deploy extra is installed). ``task``: the study's task, when this process holds it.
    ``jobs``: candidates trained at once, each in its own process (the cores shared between them)."""
    from autoprune.files import check_writable
    from autoprune.search.ladder import DEFAULT_STEPS
    from autoprune.search.runner import run_finalize

    _check_jobs(jobs)
    if jobs > 1 and task is not None and not _rebuildable(task):
        raise AutopruneError("jobs", jobs, NOT_REBUILDABLE)
    if out is not None:
        check_writable("out", out, kind="folder", replaces=EXPORT_MARKER)
    ctx = run_finalize(
        study_name=study, storage=storage, tracking_uri=tracking_uri, steps=DEFAULT_STEPS if steps is None else steps, seeds=seeds, select=select,
        progress=(not quiet) if progress is None else progress, task=task, jobs=jobs,
    )
    result = SearchResult(ctx.study, context=ctx, tracking_uri=tracking_uri)
    if not quiet:
        from autoprune.search.report import earlier_finals_note, print_front

        print_front(result.rows())
        note = earlier_finals_note(ctx.study)
        if note:
            print(note)
    if out is not None:
        written = result.export(out)
        if not quiet:
            print(f"exported {len(written.policies)} final models to {out} (report: {written.report})")
    return result


@validated
def load(study: StudyName, *, storage: Text | None = None, tracking_uri: Text | None = None) -> SearchResult:
    """A study a search created, reopened from its storage (its task is rebuilt from the record when needed);
    ``tracking_uri``: the MLflow store its search tracked to, where an ONNX export logs its models."""
    from autoprune.search.study import load_study

    return SearchResult(load_study(study, storage), tracking_uri=tracking_uri)


@validated
def pareto(study: StudyName, *, storage: Text | None = None) -> dict[str, Any]:
    """A study's front as rows, with its objectives, base model and hypervolume (``autoprune pareto --json``)."""
    return load(study, storage=storage).rows()


@validated
def export(
    study: StudyName, *, out: str | Path, storage: Text | None = None, select: str = "pareto", format: Format = "policy",
    register: RegistryName | None = None, tracking_uri: Text | None = None,
) -> Exported:
    """Export a stored study's chosen points (``SearchResult.export``); every argument is checked before the study is read."""
    from autoprune.export import check_export

    check_export(out, select=select, format=format, register=register, tracking_uri=tracking_uri)
    return load(study, storage=storage, tracking_uri=tracking_uri).export(out, select=select, format=format, register=register)


# --- the base model's signals -----------------------------------------------------------------------


@dataclass(frozen=True)
class Signals:
    """A task's training-time S/N per layer at its plateau epoch, the priors they imply, and the sensitivity table."""

    epoch: int
    layers: list[dict[str, Any]]
    sensitivity: SensitivityTable


@validated
def signals(task: Task | TaskArgs | Mapping[str, Any] | None = None, *, progress: bool = False) -> Signals:
    """The base model's training-time S/N record (seed 000 eq. 5) and the sensitivity table behind the default priors."""
    from autoprune.search.evaluate import Evaluator
    from autoprune.sensitivity import load_or_measure
    from autoprune.signals import plateau_epoch, prior_rows

    built = task_of(task)
    evaluator = Evaluator.for_task(built, progress=progress)
    record = evaluator.base.extras.get("signals")
    if record is None:
        if built.is_user:
            raise AutopruneError("task", built.key(), "gives a task with signal_steps=0: it has no training-time S/N record to show")
        raise AutopruneError("signals", str(built.cache_dir()), "has no training-time S/N record (delete the cached model to retrain)")
    epoch = plateau_epoch(record)
    return Signals(
        epoch=record["epochs"][epoch],
        layers=prior_rows(evaluator.base.model, record, epoch=epoch),
        sensitivity=load_or_measure(evaluator.base.model, built),
    )


# --- workers and the UI -----------------------------------------------------------------------------


class WorkerArgs(Validated):
    """A worker process's arguments; ``parent``: the process whose end ends this one too."""

    study: str
    storage: str
    tracking_uri: str | None = None
    threads: PositiveInt | None = None
    device: str | None = None
    progress: bool = True
    parent: int | None = None


@validated
def worker(
    *, study: StudyName, storage: Text, tracking_uri: Text | None = None, threads: PositiveInt | None = None, device: str | None = None, progress: bool = True,
) -> int:
    """Join a study created by a search and run its trials until its budget is spent by all its processes."""
    from autoprune.search.runner import run_worker

    args = WorkerArgs(study=study, storage=storage, tracking_uri=tracking_uri, threads=threads, device=device, progress=progress)
    return run_worker(study_name=args.study, storage=args.storage, tracking_uri=args.tracking_uri, progress=args.progress, threads=args.threads, device=args.device)


def worker_process(arguments: str) -> int:
    """The entry point of a worker process a search starts (``--jobs N``): ``WorkerArgs`` as JSON. Ctrl-C ends it
    as it ends the CLI (status 130, its trial failed as interrupted); bad input is one line and status 2."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = WorkerArgs(**json.loads(arguments))
        if args.parent is not None:
            from autoprune.processes import watch_parent

            watch_parent(args.parent)  # a search killed outright (SIGKILL) takes its workers with it
        return worker(**args.model_dump(exclude={"parent"}))
    except AutopruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


@validated
def ui(*, port: Port = 5000, tracking_uri: Text | None = None) -> int:
    """Serve the MLflow UI on 127.0.0.1 over the tracking store, opened on the runs of machine-learning runs."""
    from autoprune.tracking import serve_ui

    return serve_ui(port=port, tracking_uri=tracking_uri)


__all__ = [
    "TaskArgs", "WorkerArgs", "FrontPoint", "SearchResult", "Signals",
    "search", "search_config", "finalize", "apply", "cost", "export", "pareto", "load", "signals", "worker", "worker_process", "ui", "task_of",
]
