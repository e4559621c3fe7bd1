"""The study: a search's validated configuration, its Optuna storage and sampler, and the context every
process running its trials shares.

Below everything that runs trials (lifecycle, the trial loop, executors, the runner) and everything that
reads a finished study (export, the API): ``prepare`` validates every input and creates or resumes the
study, ``context_from_study`` rebuilds the same context from the study alone (a worker, another machine,
an export), and ``SearchConfig`` is the one validated form of a search's options, built by the API.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import optuna
from optuna.trial import FrozenTrial
from pydantic import Field, field_validator, model_validator

from autoprune.deps import require
from autoprune.errors import AutopruneError
from autoprune.policy import Policy
from autoprune.search.evaluate import Evaluator
from autoprune.search.fidelity import FidelitySpec
from autoprune.search.ladder import DEFAULT_STEPS, check_final
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.priors import DEFAULT_PRIORS, KINDS
from autoprune.search.record import SAMPLERS, BaseSummary, StudyMeta, read_meta, update_meta, write_meta
from autoprune.search.space import SearchSpace, SpaceSpec
from autoprune.task import Task, TaskSpec, task_from_record
from autoprune.validated import StudyName, Validated

# Heartbeats are what let a resume fail the trials of a dead worker; Optuna calls them experimental and
# expects them with Study.optimize, while we drive ask/tell ourselves. Its INFO lines duplicate our bar.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_STORAGE = "sqlite:///autoprune.db"
# How long a trial may go without sign of its process (a heartbeat; an owner, for one just asked) before
# another process fails it as interrupted. Optuna's storage is opened with it as its grace period.
GRACE_SECONDS = 40
EXECUTOR_NAMES = ("local", "ray")
"""The executors a search may name (``executors.EXECUTORS`` holds their classes)."""

PositiveInt = Annotated[int, Field(ge=1)]
NaturalInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RayOptions(Validated):
    """How the Ray executor places trials; read by it alone."""

    address: str | None = None
    workers: PositiveInt | None = None
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    retries: NaturalInt = 0


class SearchConfig(Validated):
    """One search's options, validated when built: a bad value fails here, before any work. The API builds it."""

    task: TaskSpec = Field(default_factory=TaskSpec)
    space_path: Path | str | None = None
    objectives_path: Path | str | None = None
    study: StudyName = "autoprune"
    storage: str | None = None
    trials: PositiveInt = 60
    timeout: PositiveFloat | None = None
    sampler: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    seed: NaturalInt = 0
    jobs: PositiveInt = 1
    tracking_uri: str | None = None
    # prior kinds enqueued before sampling (priors.KINDS); True/False: the default set or none
    priors: tuple[str, ...] | list[str] | bool = DEFAULT_PRIORS
    executor: Literal[EXECUTOR_NAMES] = "local"  # type: ignore[valid-type]
    ray: RayOptions = Field(default_factory=RayOptions)
    progress: bool = True
    # multi-fidelity trials (search.fidelity): the share of finetune_steps of the short fine-tune; None: off
    fidelity: Annotated[float, Field(gt=0, lt=1)] | None = None
    # fine-tune steps the study may spend with multi-fidelity; None: trials x the space's finetune_steps
    budget_steps: PositiveInt | None = None
    # fine-tuning seeds each front candidate is re-run with after the search (0: no confirmation stage)
    confirm: NaturalInt = 0
    # the fidelity ladder (search.ladder): a sampled trial is fine-tuned only when its post-training result could
    # still reach the front; off (or with multi-fidelity), every trial is fine-tuned
    ladder: bool = True
    # final training after the search (search.finalize): the candidates that could be on the final front
    finalize: bool = False
    final_steps: PositiveInt = DEFAULT_STEPS
    final_seeds: Annotated[int, Field(ge=1, le=100)] = 1
    final_select: str = "pareto"

    @field_validator("priors", mode="after")
    @classmethod
    def _kinds(cls, priors: tuple[str, ...] | bool) -> tuple[str, ...]:
        kinds = DEFAULT_PRIORS if priors is True else () if priors is False else tuple(priors)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"names an unknown prior kind {unknown[0]!r} (kinds: {', '.join(KINDS)})")
        return kinds

    @model_validator(mode="after")
    def _combinations(self) -> "SearchConfig":
        check_final(steps=self.final_steps, seeds=self.final_seeds, select=self.final_select)
        if self.budget_steps is not None and self.fidelity is None:
            raise AutopruneError("budget_steps", self.budget_steps, "counts the fine-tune steps of a multi-fidelity search: give fidelity too")
        if self.fidelity is not None and self.executor == "ray":
            raise AutopruneError("fidelity", self.fidelity, "runs with the local executor (the Ray executor evaluates one fidelity)")
        if self.ray != RayOptions() and self.executor != "ray":
            changed = next(k for k, v in self.ray.model_dump().items() if v != getattr(RayOptions(), k))
            raise AutopruneError(changed, getattr(self.ray, changed), "is an option of the Ray executor: add executor='ray' (--executor ray)")
        return self


def storage_url(storage: str | None) -> str:
    return storage or DEFAULT_STORAGE


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so trials of a dead worker on another machine end up failed."""
    if url.startswith("sqlite:///"):
        parent = Path(url[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise AutopruneError("storage", url, f"points into a folder that does not exist ({parent})")
    for attempt in range(SCHEMA_RACE_RETRIES):
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=GRACE_SECONDS, engine_kwargs=_engine_kwargs(url))
            break
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or a down server
            if _schema_race(exc) and attempt + 1 < SCHEMA_RACE_RETRIES:
                # two processes started on one new database: both built Optuna's schema, one lost the race on its
                # version row; the schema is there now
                time.sleep(0.2 * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutopruneError("storage", url, f"cannot be reached ({first[:160]})") from None
    if url.startswith("sqlite:///"):
        _write_ahead(storage.engine)
    return storage


SCHEMA_RACE_RETRIES = 5


def _schema_race(exc: BaseException) -> bool:
    from sqlalchemy.exc import IntegrityError, OperationalError

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, IntegrityError) and "alembic_version" in text or isinstance(seen, OperationalError) and "already exists" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_ahead(engine: Any) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints rather than at every commit. A trial's record is
    a dozen small commits, and the default rollback journal syncs the disk two or three times for each
    (measured here: 29 ms of storage per trial, 13 ms in this mode). A killed process loses nothing; a power
    cut can lose the last commits but never corrupts the file, and a lost trial is one a resume runs again."""
    from sqlalchemy import event

    event.listen(engine, "connect", lambda connection, _record: connection.execute("PRAGMA synchronous=NORMAL"))
    engine.dispose()  # pooled connections were opened before the listener
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def _engine_kwargs(url: str) -> dict[str, Any]:
    # Several worker processes write one SQLite file: wait for the lock instead of failing at once.
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}


def load_study(name: str, storage: str | None) -> optuna.Study:
    """An existing study autoprune created; anything else is a one-line error naming the study or storage."""
    url = storage_url(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise AutopruneError("storage", url, "holds no studies (the database file does not exist)")
    backend = open_storage(url)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(backend, include_best_trial=False)]
    if name not in names:
        raise AutopruneError("study", name, f"is not in {url} (studies: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=backend)
    if read_meta(study) is None:
        raise AutopruneError("study", name, f"in {url} was not created by autoprune search")
    return study


def make_sampler(name: str, *, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler; constraints reach it from each told trial (``trial.set_constraint``)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise AutopruneError("sampler", name, f"is not a sampler ({', '.join(SAMPLERS)})")


@dataclass
class SearchContext:
    """Everything a process needs to run trials of one study; rebuilt from the study in a worker."""

    study: optuna.Study
    task: Task
    space: SearchSpace
    objectives: ObjectiveSpec
    budget: int
    evaluator: Evaluator | None = None
    # called with every told trial (the Reporter's ``told``)
    notify: Callable[[FrozenTrial], None] | None = None
    # multi-fidelity trials and the fine-tune steps they may spend (search.fidelity); None: off
    fidelity: FidelitySpec | None = None
    # the study's seed (StudyMeta.seed), kept here because every trial's job derives its own from it
    seed: int = 0
    # the fidelity ladder decides whether a sampled trial climbs from post-training to its fine-tune
    ladder: bool = False

    @property
    def budget_steps(self) -> int | None:
        return None if self.fidelity is None else self.fidelity.budget_steps

    def ensure_evaluator(self, *, progress: bool) -> Evaluator:
        if self.evaluator is None:
            self.evaluator = Evaluator.for_task(self.task, progress=progress, latency=self.objectives.needs_latency)
        return self.evaluator

    @property
    def meta(self) -> StudyMeta:
        meta = read_meta(self.study)
        assert meta is not None, "a SearchContext is built from an autoprune study"
        return meta


def prepare(config: SearchConfig, *, task: Task | None = None, space: SpaceSpec | None = None, objectives: ObjectiveSpec | None = None) -> SearchContext:
    """Validate every input, then create or resume the study. No training happens before this passes.

    ``task``, ``space`` and ``objectives``, when given (the Python API), replace config.task and the spec paths.
    """
    space_spec = space or (SpaceSpec.load(config.space_path) if config.space_path else SpaceSpec.from_dict({}))
    if objectives is None:
        objectives = ObjectiveSpec.load(config.objectives_path) if config.objectives_path else ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}]})
    task = task or Task(config.task)
    objectives = objectives.for_metric(task.metric_name)
    if objectives.needs_latency:
        # measured with onnxruntime on the exported layers: refused here, before any training, when it is missing
        require("onnxruntime")
        require("onnx")
    model = task.build()
    bound = space_spec.bind(model, input_shape=task.input_shape)
    sampler = make_sampler(config.sampler, seed=config.seed)
    storage = open_storage(storage_url(config.storage))
    study = optuna.create_study(
        study_name=config.study, storage=storage, sampler=sampler, directions=objectives.directions, load_if_exists=True
    )
    fidelity = None
    if config.fidelity is not None:
        steps = bound.policy(bound.params_for(Policy())).finetune_steps
        if steps == 0:
            raise AutopruneError("fidelity", config.fidelity, "needs a space whose policies fine-tune (finetune_steps is 0)")
        fidelity = FidelitySpec(fraction=config.fidelity, budget_steps=config.budget_steps or config.trials * steps)
    wanted = StudyMeta(
        task=task.record(), space=space_spec.raw, objectives=objectives.to_dict(), budget=config.trials, sampler=config.sampler, seed=config.seed,
        fidelity=fidelity.model_dump() if fidelity else None, ladder=config.ladder and fidelity is None,
    )
    meta = read_meta(study)
    if meta is None:
        write_meta(study, wanted)
        # optuna-dashboard and Optuna's own tools show "accuracy", "bops" instead of "Objective 0/1"
        study.set_metric_names(objectives.metrics)
    else:
        for key, value in wanted.identity().items():
            if _normalised(meta.identity()[key]) != _normalised(value):
                raise AutopruneError("study", config.study, f"exists with a different {key}; resume it with the same arguments or pick a new --study")
        if meta.budget != config.trials or meta.fidelity != wanted.fidelity or meta.ladder != wanted.ladder:
            update_meta(study, budget=config.trials, fidelity=wanted.fidelity, ladder=wanted.ladder)
        if meta.prior_bits:
            # the same narrowed space as the first run and as every worker (context_from_study)
            bound.narrowed_to(meta.prior_bits)
    return SearchContext(study, task, bound, objectives, config.trials, fidelity=fidelity, seed=(meta or wanted).seed, ladder=wanted.ladder)


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def context_from_study(study: optuna.Study, *, device: str | None = None, task: Task | None = None) -> SearchContext:
    """The context a study was created with, rebuilt from its record; ``task``: the task itself, when the
    caller holds it (the API's ``SearchResult``), instead of rebuilding it from the record."""
    meta = read_meta(study)
    if meta is None:
        raise AutopruneError("study", study.study_name, "was not created by autoprune search")
    task = task or task_from_record(meta.task, device=device)
    space = SpaceSpec.from_dict(meta.space).bind(task.build(), input_shape=task.input_shape)
    if meta.prior_bits:
        space.narrowed_to(meta.prior_bits)
    objectives = ObjectiveSpec.from_dict(meta.objectives)
    fidelity = FidelitySpec.model_validate(meta.fidelity) if meta.fidelity else None
    return SearchContext(study, task, space, objectives, meta.budget, fidelity=fidelity, seed=meta.seed, ladder=meta.ladder)


def record_base(ctx: SearchContext, evaluator: Evaluator) -> None:
    meta = ctx.meta
    if meta.base is None:
        update_meta(ctx.study, base=BaseSummary.model_validate(evaluator.base_summary()))


__all__ = [
    "SearchConfig", "RayOptions", "SearchContext", "EXECUTOR_NAMES", "DEFAULT_STORAGE", "GRACE_SECONDS",
    "storage_url", "open_storage", "load_study", "make_sampler", "prepare", "context_from_study", "record_base",
]
