"""The study runner: the Optuna study is the one source of truth, driven by ask/tell.

``run_search`` validates every input, creates or resumes the study, enqueues the priors, and hands the
remaining budget to the executor the config names (``executors``). Every executor runs a trial through
the same lifecycle (``lifecycle.begin``/``finish``) and every told trial goes to one ``Reporter``, which
updates the front once and shares its snapshot with the progress bar and the tracker.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.search.fidelity import FidelitySpec, steps_spent
from autoprune.search.lifecycle import GRACE_SECONDS, OWNER, SKIPPED, awaiting_owner, Outcome, counted_before, fail_orphaned_trials, finish, new_trial, run_in_process, spent
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.priors import DEFAULT_PRIORS, KINDS
from autoprune.search.record import SAMPLERS, BaseSummary, StudyMeta, read_meta, read_trial, sampler_constraints, write_meta
from autoprune.policy import Policy
from autoprune.search.space import SearchSpace, SpaceSpec
from autoprune.task import Task, TaskSpec, task_from_record

# Heartbeats are what let a resume fail the trials of a dead worker; Optuna calls them experimental and
# expects them with Study.optimize, while we drive ask/tell ourselves. Its INFO lines duplicate our bar.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_STORAGE = "sqlite:///autoprune.db"
# how often a process whose budget looks spent looks again while a trial there has no owner yet
ORPHAN_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class RayOptions:
    """How the Ray executor places trials; read by it alone."""

    address: str | None = None
    workers: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    retries: int = 0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise AutopruneError("--workers", self.workers, "must be at least 1")
        if not self.cpus_per_trial > 0:
            raise AutopruneError("--cpus-per-trial", self.cpus_per_trial, "must be positive")
        if not self.gpus_per_trial >= 0:
            raise AutopruneError("--gpus-per-trial", self.gpus_per_trial, "must not be negative")
        if self.retries < 0:
            raise AutopruneError("--retries", self.retries, "must not be negative")


@dataclass(frozen=True)
class SearchConfig:
    """One search, validated when built: a bad number fails here, before any work."""

    task: TaskSpec = field(default_factory=TaskSpec)
    space_path: Path | None = None
    objectives_path: Path | None = None
    study_name: str = "autoprune"
    storage: str | None = None
    trials: int = 60
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int = 0
    jobs: int = 1
    tracking_uri: str | None = None
    # prior kinds enqueued before sampling (see priors.PRIOR_KINDS); True/False: the default set or none
    priors: tuple[str, ...] | bool = DEFAULT_PRIORS
    executor: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)
    progress: bool = True
    # multi-fidelity trials (search.fidelity): the share of finetune_steps of the short fine-tune; None: off
    fidelity: float | None = None
    # fine-tune steps the study may spend with multi-fidelity; None: trials x the space's finetune_steps
    budget_steps: int | None = None
    # fine-tuning seeds each front candidate is re-run with after the search (0: no confirmation stage)
    confirm: int = 0

    def __post_init__(self) -> None:
        if self.confirm < 0:
            raise AutopruneError("--confirm", self.confirm, "must be 0 (no confirmation) or a number of seeds")
        if self.trials < 1:
            raise AutopruneError("--trials", self.trials, "must be at least 1")
        if self.jobs < 1:
            raise AutopruneError("--jobs", self.jobs, "must be at least 1")
        if self.timeout is not None and not self.timeout > 0:
            raise AutopruneError("--timeout", self.timeout, "must be a positive number of seconds")
        if self.seed < 0:
            raise AutopruneError("--seed", self.seed, "must not be negative")
        if self.sampler not in SAMPLERS:
            raise AutopruneError("--sampler", self.sampler, f"is not a sampler ({', '.join(SAMPLERS)})")
        kinds = DEFAULT_PRIORS if self.priors is True else () if self.priors is False else tuple(self.priors)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise AutopruneError("--priors", ",".join(kinds), f"names an unknown prior kind {unknown[0]!r} (kinds: {', '.join(KINDS)})")
        object.__setattr__(self, "priors", kinds)
        if self.fidelity is not None and not 0 < self.fidelity < 1:
            raise AutopruneError("--fidelity", self.fidelity, "must be a share of the fine-tune steps, between 0 and 1 exclusive")
        if self.budget_steps is not None and self.budget_steps < 1:
            raise AutopruneError("--budget-steps", self.budget_steps, "must be at least 1")
        if self.fidelity is not None and self.executor == "ray":
            raise AutopruneError("--fidelity", self.fidelity, "runs with the local executor (the Ray executor evaluates one fidelity)")
        from autoprune.search.executors import EXECUTORS

        if self.executor not in EXECUTORS:
            raise AutopruneError("--executor", self.executor, f"is not an executor ({', '.join(EXECUTORS)})")

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **overrides: Any) -> "SearchConfig":
        """A config from a mapping of field names (say, parsed arguments); Ray's options are taken from
        the same mapping by their own field names, unknown keys are ignored."""
        ray = RayOptions(**{f.name: values[f.name] for f in fields(RayOptions) if f.name in values})
        own = {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name != "ray"}
        return cls(**{**own, "ray": ray, **overrides})


@dataclass
class SearchOutcome:
    study: optuna.Study
    ran: int
    seconds: float


def storage_url(storage: str | None) -> str:
    return storage or DEFAULT_STORAGE


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so trials of a dead worker on another machine end up failed."""
    if url.startswith("sqlite:///"):
        parent = Path(url[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise AutopruneError("--storage", url, f"points into a folder that does not exist ({parent})")
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=GRACE_SECONDS, engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or a down server
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError("--storage", url, f"cannot be reached ({first[:160]})") from None
    if url.startswith("sqlite:///"):
        _write_ahead(storage.engine)
    return storage


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
    url = storage_url(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise AutopruneError("--storage", url, "holds no studies (the database file does not exist)")
    backend = open_storage(url)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(backend, include_best_trial=False)]
    if name not in names:
        raise AutopruneError("--study", name, f"is not in {url} (studies: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=backend)
    if read_meta(study) is None:
        raise AutopruneError("--study", name, f"in {url} was not created by autoprune search")
    return study


def make_sampler(name: str, *, seed: int, objectives: ObjectiveSpec) -> optuna.samplers.BaseSampler:
    constraints = sampler_constraints if objectives.constraints else None
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16, constraints_func=constraints)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise AutopruneError("--sampler", name, f"is not a sampler ({', '.join(SAMPLERS)})")


# --- study set-up ---------------------------------------------------------------------------------


@dataclass
class SearchContext:
    """Everything a process needs to run trials of one study; rebuilt from the study in a worker."""

    study: optuna.Study
    task: Task
    space: SearchSpace
    objectives: ObjectiveSpec
    budget: int
    evaluator: Any = None
    # called with every told trial (the Reporter's ``told``)
    notify: Callable[[FrozenTrial], None] | None = None
    # multi-fidelity trials and the fine-tune steps they may spend (search.fidelity); None: off
    fidelity: FidelitySpec | None = None
    # the study's seed (StudyMeta.seed), kept here because every trial's job derives its own from it
    seed: int = 0

    @property
    def budget_steps(self) -> int | None:
        return None if self.fidelity is None else self.fidelity.budget_steps

    def ensure_evaluator(self, *, progress: bool) -> Any:
        if self.evaluator is None:
            from autoprune.search.evaluate import Evaluator

            self.evaluator = Evaluator.for_task(self.task, progress=progress)
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
    model = task.build()
    space = space_spec.bind(model, input_shape=task.input_shape)
    sampler = make_sampler(config.sampler, seed=config.seed, objectives=objectives)
    storage = open_storage(storage_url(config.storage))
    study = optuna.create_study(
        study_name=config.study_name, storage=storage, sampler=sampler, directions=objectives.directions, load_if_exists=True
    )
    fidelity = None
    if config.fidelity is not None:
        steps = space.policy(space.params_for(Policy())).finetune_steps
        if steps == 0:
            raise AutopruneError("--fidelity", config.fidelity, "needs a space whose policies fine-tune (finetune_steps is 0)")
        fidelity = FidelitySpec(fraction=config.fidelity, budget_steps=config.budget_steps or config.trials * steps)
    wanted = StudyMeta(
        task=task.record(), space=space_spec.raw, objectives=objectives.to_dict(), budget=config.trials, sampler=config.sampler, seed=config.seed,
        fidelity=fidelity.model_dump() if fidelity else None,
    )
    meta = read_meta(study)
    if meta is None:
        write_meta(study, wanted)
        # optuna-dashboard and Optuna's own tools show "accuracy", "bops" instead of "Objective 0/1"
        study.set_metric_names(objectives.metrics)
    else:
        for key, value in wanted.identity().items():
            if _normalised(meta.identity()[key]) != _normalised(value):
                raise AutopruneError("--study", config.study_name, f"exists with a different {key}; resume it with the same arguments or pick a new --study")
        if meta.budget != config.trials or meta.fidelity != wanted.fidelity:
            write_meta(study, meta.model_copy(update={"budget": config.trials, "fidelity": wanted.fidelity}))
        if meta.prior_bits:
            # the same narrowed space as the first run and as every worker (context_from_study)
            space.narrowed_to(meta.prior_bits)
    return SearchContext(study, task, space, objectives, config.trials, fidelity=fidelity, seed=(meta or wanted).seed)


def _normalised(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def context_from_study(study: optuna.Study, *, device: str | None = None) -> SearchContext:
    meta = read_meta(study)
    if meta is None:
        raise AutopruneError("--study", study.study_name, "was not created by autoprune search")
    task = task_from_record(meta.task, device=device)
    space = SpaceSpec.from_dict(meta.space).bind(task.build(), input_shape=task.input_shape)
    if meta.prior_bits:
        space.narrowed_to(meta.prior_bits)
    objectives = ObjectiveSpec.from_dict(meta.objectives)
    fidelity = FidelitySpec.model_validate(meta.fidelity) if meta.fidelity else None
    return SearchContext(study, task, space, objectives, meta.budget, fidelity=fidelity, seed=meta.seed)


def record_base(ctx: SearchContext, evaluator: Any) -> None:
    meta = ctx.meta
    if meta.base is None:
        write_meta(ctx.study, meta.model_copy(update={"base": BaseSummary.model_validate(evaluator.base_summary())}))


# --- what follows every told trial ------------------------------------------------------------------


def study_info(study: optuna.Study) -> Any:
    """The tracker's view of an autoprune study."""
    from autoprune.tracking import StudyInfo

    meta = read_meta(study)
    assert meta is not None, "tracking needs a study created by autoprune search"
    objectives = ObjectiveSpec.from_dict(meta.objectives)
    return StudyInfo(
        name=study.study_name,
        objectives=tuple(zip(objectives.metrics, objectives.directions)),
        constraints=tuple(str(c) for c in objectives.constraints),
        task=meta.task,
        space=meta.space,
        base=meta.base.model_dump() if meta.base else {},
        parent_run_id=meta.mlflow_parent_run_id,
    )


def start_tracker(tracker: Any, study: optuna.Study) -> None:
    """Start the tracker on the study and record its parent run, which a resume then reuses."""
    info = study_info(study)
    parent = tracker.start(study=info)
    if parent is not None and parent != info.parent_run_id:
        write_meta(study, read_meta(study).model_copy(update={"mlflow_parent_run_id": parent}))


def open_tracker(ctx: SearchContext, tracking_uri: str | None) -> Any:
    """The MLflow mirror of the study, on its own thread (``tracking.background``), started there and
    caught up with what it missed: opening the store (importing MLflow, creating or migrating its schema,
    about 2 s) overlaps the first trial instead of delaying it."""
    from autoprune.tracking import Tracker
    from autoprune.tracking.background import BackgroundTracker

    tracker = BackgroundTracker(Tracker(study_name=ctx.study.study_name, tracking_uri=tracking_uri))
    tracker.submit(start_tracker, ctx.study)
    tracker.submit(_catch_up, ctx.study)
    return tracker


def _catch_up(tracker: Any, study: optuna.Study) -> None:
    tracker.reconcile(finished_events(study))


def finished_events(study: optuna.Study) -> list[Any]:
    from autoprune.search.front import event_of

    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return [event_of(t) for t in study.get_trials(deepcopy=False, states=states)]


class Reporter:
    """Takes every told trial once: updates the front, then the tracker and the progress bar from the
    same snapshot. Nothing here reads the whole study per trial. ``tracker``: ``open_tracker``'s (its calls
    run on its own thread), or None."""

    def __init__(self, ctx: SearchContext, *, tracker: Any, progress: bool) -> None:
        from tqdm.auto import tqdm

        from autoprune.search.front import Front

        self.ctx = ctx
        self.tracker = tracker
        self.front = Front(ctx.study, ctx.meta)
        self.snapshot = self.front.snapshot()
        self.bar = tqdm(total=ctx.budget, initial=min(spent(ctx.study), ctx.budget), desc="trials", disable=not progress, unit="trial")

    def told(self, frozen: FrozenTrial) -> None:
        from autoprune.search.front import event_of

        record = read_trial(frozen)
        self.snapshot = self.front.add(frozen, record)
        if self.tracker is not None:
            self.tracker.log_trial(event_of(frozen, record), rank=self.snapshot.changed.get(frozen.number))
            self.tracker.refresh(self.snapshot)
        if not self.bar.disable:
            self.bar.n = min(counted_before(self.ctx.study, frozen.number + 1), self.ctx.budget)
            hv = self.snapshot.hypervolume
            self.bar.set_postfix(front=len(self.snapshot.front), hv=f"{hv:.4f}" if hv is not None else "-", failed=self.snapshot.failed)
            self.bar.refresh()

    def close(self, *, status: str | None) -> None:
        """Final state: MLflow reconciled with the study, every rank tagged; ``status`` ends the parent run."""
        self.bar.close()
        if self.tracker is None:
            return
        self.tracker.reconcile(finished_events(self.ctx.study))
        self.front.sync(force=True)
        full = self.front.snapshot()
        # every rank, so that trials other processes told get their tags too
        self.tracker.refresh(replace(full, changed=full.ranks))
        if status is not None:
            self.tracker.close(status=status)
        else:
            self.tracker.flush()
            self.tracker.drain()


def run_trials(ctx: SearchContext, *, deadline: float | None) -> int:
    """Ask/tell until the budget is spent (by every process of the study) or the deadline passes."""
    if ctx.fidelity is not None:
        return _run_fidelity_trials(ctx, deadline=deadline)
    distributions = ctx.space.distributions()
    ran = 0
    # ``asked`` bounds the trials that count toward the budget from above (counted_before(n) <= n: trial
    # numbers are dense), so the study is read to count them exactly only once the bound reaches the budget.
    asked = _next_number(ctx.study)
    while deadline is None or time.monotonic() < deadline:
        if asked >= ctx.budget:
            asked = counted_before(ctx.study, _next_number(ctx.study))
            if asked < ctx.budget:
                continue
            # A worker process that died mid-trial left it RUNNING, holding a slot of the budget: fail it
            # (as interrupted) so that a trial runs in its place. That changes nothing until the slots look
            # spent, so the study is read for orphans then, not before every trial. One killed while it
            # was being asked has no owner to tell by: the loop waits out its grace period.
            if not fail_orphaned_trials(ctx.study):
                if not awaiting_owner(ctx.study):
                    break
                time.sleep(ORPHAN_POLL_SECONDS)
            continue  # ``asked`` still bounds at the budget: the top of the loop counts again
        with new_trial(ctx, distributions) as trial:
            if trial.number >= ctx.budget and counted_before(ctx.study, trial.number) >= ctx.budget:
                finish(ctx, trial, Outcome(failure=SKIPPED, interrupted=True))
                break
            run_in_process(ctx, trial)
        ran += 1
        asked = trial.number + 1
    return ran


def _run_fidelity_trials(ctx: SearchContext, *, deadline: float | None) -> int:
    """Ask/tell until the next short fine-tune would overrun the step budget (search.fidelity): the budget is
    compute, so the number of trials is whatever it buys."""
    from autoprune.search.fidelity import low_fidelity

    assert ctx.fidelity is not None and ctx.budget_steps is not None
    distributions = ctx.space.distributions()
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        fail_orphaned_trials(ctx.study)
        with new_trial(ctx, distributions) as trial:
            try:
                short = low_fidelity(ctx.space.policy(trial.params), ctx.fidelity.fraction).finetune_steps
            except Exception:  # noqa: BLE001 - a point the space cannot turn into a policy fails in begin, spending nothing
                short = 0
            if steps_spent(ctx.study) + short > ctx.budget_steps:
                finish(ctx, trial, Outcome(failure=SKIPPED, interrupted=True))
                break
            run_in_process(ctx, trial)
        ran += 1
    return ran


def _next_number(study: optuna.Study) -> int:
    """The number the next asked trial would get: one read of the study, once per process."""
    trials = study.get_trials(deepcopy=False)
    return max((t.number for t in trials), default=-1) + 1


def over_budget(ctx: SearchContext, number: int) -> bool:
    """Whether the budget was already taken by trials asked before this one (by any process)."""
    return counted_before(ctx.study, number) >= ctx.budget


# --- entry points ---------------------------------------------------------------------------------


def run_search(config: SearchConfig, *, task: Task | None = None, space: SpaceSpec | None = None, objectives: ObjectiveSpec | None = None) -> SearchOutcome:
    """Run (or resume) a search; ``task``, ``space`` and ``objectives`` objects (the Python API) replace the
    config's built-in task and spec paths."""
    from autoprune.search.executors import executor_for

    start = time.monotonic()
    executor = executor_for(config)
    executor.preflight(config)  # a bad executor flag or an unreachable cluster fails before any training
    ctx = prepare(config, task=task, space=space, objectives=objectives)
    fail_orphaned_trials(ctx.study)
    evaluator = ctx.ensure_evaluator(progress=config.progress)
    record_base(ctx, evaluator)
    # a learned strategy's trials learn their policy: there is no policy to warm-start
    if config.priors and not ctx.space.learned:
        from autoprune.search.priors import enqueue_priors

        enqueue_priors(ctx, evaluator, kinds=config.priors)
    tracker = open_tracker(ctx, config.tracking_uri)
    signals = evaluator.base.extras.get("signals")
    if signals:
        tracker.log_signals(signals)
    deadline = start + config.timeout if config.timeout else None
    if executor.starts_other_processes:
        tracker.drain()  # the parent run is recorded in the study before any other process looks it up
    reporter = Reporter(ctx, tracker=tracker, progress=config.progress)
    ctx.notify = reporter.told
    status = "FAILED"
    try:
        ran = executor.run(ctx, config, deadline=deadline)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        reporter.close(status=status)
    if config.confirm:
        from autoprune.search.confirm import confirm_front

        confirm_front(ctx, evaluator, repeats=config.confirm)
    return SearchOutcome(ctx.study, ran, time.monotonic() - start)


def run_worker(*, study_name: str, storage: str, tracking_uri: str | None, progress: bool, threads: int | None = None, device: str | None = None) -> int:
    """Join a study created by `autoprune search` and run trials until its budget is spent.

    The task is rebuilt from the study's record (a built-in spec, ``--model --weights``, or a ``--task`` /
    ``reference=`` function), on ``device`` (default: CUDA when available).
    """
    from autoprune.device import resolve_device

    resolve_device(device, field="--device")
    if threads is not None:
        if threads < 1:
            raise AutopruneError("--threads", threads, "must be at least 1")
        import torch

        torch.set_num_threads(threads)
    study = load_study(study_name, storage)
    ctx = context_from_study(study, device=device)
    if ctx.fidelity is None and spent(study) >= ctx.budget:
        print(f"study {study_name} has spent its budget of {ctx.budget} trials: nothing to do")
        return 0
    ctx.ensure_evaluator(progress=progress)
    # The parent run belongs to the coordinating `search`: a worker logs its trials but never ends it.
    reporter = Reporter(ctx, tracker=open_tracker(ctx, tracking_uri), progress=progress)
    ctx.notify = reporter.told
    try:
        ran = run_trials(ctx, deadline=None)
    finally:
        reporter.close(status=None)
    print(f"worker {OWNER} ran {ran} trials of {study_name}")
    return 0


__all__ = [
    "SearchConfig", "RayOptions", "SearchOutcome", "SearchContext", "Reporter", "run_search", "run_worker", "load_study",
    "prepare", "context_from_study", "record_base", "open_tracker", "start_tracker", "study_info", "finished_events", "run_trials", "over_budget", "storage_url",
]
