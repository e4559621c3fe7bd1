"""The study runner: the Optuna study is the one source of truth, driven by ask/tell.

Trials run in this process (default), in worker processes sharing the study's storage (``--jobs``,
``autoprune worker``), or on Ray Tune (``--executor ray``); all of them evaluate with ``Evaluator.evaluate``
and tell the study through ``record_result`` / ``record_failure``, so a trial means the same thing everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.space import SearchSpace, SpaceSpec
from autoprune.task import Task, TaskSpec, task_from_record

# Heartbeats are what let a resume fail the trials of a dead worker; Optuna calls them experimental and
# expects them with Study.optimize, while we drive ask/tell ourselves. Its INFO lines duplicate our bar.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_STORAGE = "sqlite:///autoprune.db"
SAMPLERS = ("tpe", "nsga2", "random", "qmc")
META_KEY = "autoprune"


@dataclass(frozen=True)
class SearchConfig:
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
    priors: bool = True
    executor: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    retries: int = 0
    progress: bool = True


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
        return optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=40, engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or a down server
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError("--storage", url, f"cannot be reached ({first[:160]})") from None


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
    return optuna.load_study(study_name=name, storage=backend)


def make_sampler(name: str, *, seed: int, objectives: ObjectiveSpec) -> optuna.samplers.BaseSampler:
    constraints = _constraints_func if objectives.constraints else None
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16, constraints_func=constraints)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise AutopruneError("--sampler", name, f"is not a sampler ({', '.join(SAMPLERS)})")


def _constraints_func(trial: FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("constraints", [1.0]))


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

    def ensure_evaluator(self, *, progress: bool) -> Any:
        if self.evaluator is None:
            from autoprune.search.evaluate import Evaluator

            self.evaluator = Evaluator.for_task(self.task, progress=progress)
        return self.evaluator


def prepare(config: SearchConfig, *, task: Task | None = None, space: SpaceSpec | None = None, objectives: ObjectiveSpec | None = None) -> SearchContext:
    """Validate every input, then create or resume the study. No training happens before this passes.

    ``task``, ``space`` and ``objectives``, when given (the Python API), replace config.task and the spec paths.
    """
    if config.trials < 1:
        raise AutopruneError("--trials", config.trials, "must be at least 1")
    if config.jobs < 1:
        raise AutopruneError("--jobs", config.jobs, "must be at least 1")
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
    meta = study.user_attrs.get(META_KEY)
    wanted = {"task": task.record(), "space": space_spec.raw, "objectives": objectives.to_dict()}
    if meta is None:
        study.set_user_attr(META_KEY, {**wanted, "budget": config.trials, "sampler": config.sampler, "seed": config.seed})
    else:
        for key, value in wanted.items():
            if _normalised(meta.get(key)) != _normalised(value):
                raise AutopruneError("--study", config.study_name, f"exists with a different {key}; resume it with the same arguments or pick a new --study")
        if meta.get("budget") != config.trials:
            study.set_user_attr(META_KEY, {**meta, "budget": config.trials})
    return SearchContext(study, task, space, objectives, config.trials)


def _normalised(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def context_from_study(study: optuna.Study) -> SearchContext:
    meta = study.user_attrs.get(META_KEY)
    if meta is None:
        raise AutopruneError("--study", study.study_name, "was not created by autoprune search")
    task = task_from_record(meta["task"])
    space = SpaceSpec.from_dict(meta["space"]).bind(task.build(), input_shape=task.input_shape)
    if "prior_bits" in meta:
        space.narrowed_to(meta["prior_bits"])
    objectives = ObjectiveSpec.from_dict(meta["objectives"])
    return SearchContext(study, task, space, objectives, int(meta["budget"]))


def record_base(ctx: SearchContext, evaluator: Any) -> None:
    meta = dict(ctx.study.user_attrs[META_KEY])
    if "base" not in meta:
        meta["base"] = evaluator.base_summary()
        ctx.study.set_user_attr(META_KEY, meta)


# --- budget and liveness --------------------------------------------------------------------------

_OWNER = f"{socket.gethostname()}:{os.getpid()}"


def counts_toward_budget(trial: FrozenTrial) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "failure" in trial.user_attrs and not trial.user_attrs.get("interrupted")


def spent(study: optuna.Study) -> int:
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def completed(study: optuna.Study) -> int:
    return sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A dead child its parent has not reaped yet (a worker of `search --jobs`) still takes signals.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no procfs: trust the signal
        return True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials whose process is gone become FAIL (interrupted), so a resume redoes them.

    A trial owned by a dead process on this host is failed at once; one on another host waits for
    Optuna's heartbeat grace period.
    """
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner", "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            study._storage.set_trial_user_attr(trial._trial_id, "failure", f"interrupted: process {owner} died")
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    try:
        failed += [t.number for t in optuna.storages.fail_stale_trials(study) or []]
    except Exception:  # noqa: BLE001 - fail_stale_trials is best effort on storages without heartbeats
        pass
    return failed


# --- one trial ------------------------------------------------------------------------------------


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def record_result(ctx: SearchContext, trial: optuna.Trial, metrics: dict[str, float], layers: dict[str, Any]) -> None:
    """Tell the study an evaluated trial; raises TrialFailed (telling nothing) when an objective is not finite."""
    import math

    from autoprune.search.evaluate import TrialFailed

    values = ctx.objectives.values(metrics)
    bad = [m for m, v in zip(ctx.objectives.metrics, values) if not math.isfinite(v)]
    if bad:
        raise TrialFailed(f"{bad[0]} is {metrics[bad[0]]}")
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("layers", layers)
    trial.set_user_attr("constraints", ctx.objectives.violations(metrics))
    ctx.study.tell(trial, values)


def record_failure(ctx: SearchContext, trial: optuna.Trial, reason: str, *, interrupted: bool = False) -> None:
    """Tell the study a failed trial. An ``interrupted`` one (cut short, not the policy's fault) does not
    count toward the budget, so a resume runs it again."""
    trial.set_user_attr("failure", reason)
    if interrupted:
        trial.set_user_attr("interrupted", True)
    ctx.study.tell(trial, state=TrialState.FAIL)


def run_one_trial(ctx: SearchContext, trial: optuna.Trial, *, on_result: Callable[[FrozenTrial], None] | None = None) -> FrozenTrial:
    """Evaluate an asked trial and tell the study; failures are recorded with their reason."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    evaluator = ctx.ensure_evaluator(progress=False)
    trial.set_user_attr("owner", _OWNER)
    with get_heartbeat_thread(trial._trial_id, ctx.study._storage):
        try:
            policy = ctx.space.policy(trial.params)
            trial.set_user_attr("policy", policy.to_dict())
            record_result(ctx, trial, *evaluator.evaluate(policy))
        except KeyboardInterrupt:
            record_failure(ctx, trial, "interrupted: Ctrl-C", interrupted=True)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one trial is recorded, the study goes on
            record_failure(ctx, trial, failure_reason(exc))
    frozen = ctx.study._storage.get_trial(trial._trial_id)
    if on_result is not None:
        on_result(frozen)
    return frozen


@contextmanager
def reporting(ctx: SearchContext, *, tracker: Any, progress: bool) -> Iterator[Callable[[FrozenTrial], None]]:
    """What follows every told trial, whichever executor ran it: its MLflow run, the front, the progress bar."""
    from tqdm.auto import tqdm

    from autoprune.search.pareto import front_trials, hypervolume

    bar = tqdm(total=ctx.budget, initial=min(spent(ctx.study), ctx.budget), desc="trials", disable=not progress, unit="trial")

    def on_result(frozen: FrozenTrial) -> None:
        if tracker is not None:
            tracker.log_trial(frozen)
            tracker.refresh(study=ctx.study)
        bar.n = min(spent(ctx.study), ctx.budget)
        bar.set_postfix(front=len(front_trials(ctx.study)), hv=f"{hypervolume(ctx.study):.4f}", failed=sum(t.state == TrialState.FAIL for t in ctx.study.get_trials(deepcopy=False)))
        bar.refresh()

    try:
        yield on_result
    finally:
        bar.close()


def run_trials(ctx: SearchContext, *, deadline: float | None, progress: bool, tracker: Any = None) -> int:
    """Ask/tell until the budget is spent (by every process of the study) or the deadline passes."""
    distributions = ctx.space.distributions()
    ran = 0
    with reporting(ctx, tracker=tracker, progress=progress) as on_result:
        while deadline is None or time.monotonic() < deadline:
            # A worker process that died mid-trial left it RUNNING, holding a slot of the budget: fail it
            # (as interrupted) so that the remaining workers run a trial in its place.
            fail_orphaned_trials(ctx.study)
            if spent(ctx.study) >= ctx.budget:
                break
            trial = ctx.study.ask(distributions)
            if over_budget(ctx, trial.number):
                record_failure(ctx, trial, "skipped: another worker took the last trial of the budget", interrupted=True)
                break
            run_one_trial(ctx, trial, on_result=on_result)
            ran += 1
    return ran


def over_budget(ctx: SearchContext, number: int) -> bool:
    """Whether the budget was already taken by trials asked before this one (by any process)."""
    earlier = [t for t in ctx.study.get_trials(deepcopy=False) if t.number < number and counts_toward_budget(t)]
    return len(earlier) >= ctx.budget


# --- entry points ---------------------------------------------------------------------------------


def _open_tracker(ctx: SearchContext, tracking_uri: str | None) -> Any:
    from autoprune.tracking import Tracker

    tracker = Tracker(study_name=ctx.study.study_name, tracking_uri=tracking_uri)
    tracker.start(study=ctx.study)
    tracker.reconcile(study=ctx.study)
    return tracker


def run_search(config: SearchConfig, *, task: Task | None = None, space: SpaceSpec | None = None, objectives: ObjectiveSpec | None = None) -> SearchOutcome:
    start = time.monotonic()
    if config.executor == "ray":
        from autoprune.search.ray_executor import preflight

        preflight(config)  # a bad Ray flag or an unreachable cluster fails before any training
    ctx = prepare(config, task=task, space=space, objectives=objectives)
    fail_orphaned_trials(ctx.study)
    evaluator = ctx.ensure_evaluator(progress=config.progress)
    record_base(ctx, evaluator)
    if config.priors:
        from autoprune.search.priors import enqueue_priors

        enqueue_priors(ctx, evaluator)
    tracker = _open_tracker(ctx, config.tracking_uri)
    signals = evaluator.base.extras.get("signals")
    if signals:
        tracker.log_signals(signals)
    deadline = start + config.timeout if config.timeout else None
    status = "FAILED"
    try:
        if config.executor == "ray":
            from autoprune.search.ray_executor import run_ray

            ran = run_ray(ctx, config, tracker=tracker, deadline=deadline)
        else:
            ran = _run_local(ctx, config, tracker=tracker, deadline=deadline)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.reconcile(study=ctx.study)
        tracker.refresh(study=ctx.study)
        tracker.close(status=status)
    return SearchOutcome(ctx.study, ran, time.monotonic() - start)


def share_cores(processes: int) -> int:
    """Torch threads per process when ``processes`` share this machine: oversubscribed cores make small
    models many times slower (measured here: 2 processes x 2 threads on 2 cores ran 15x slower per trial)."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    return threads


def _run_local(ctx: SearchContext, config: SearchConfig, *, tracker: Any, deadline: float | None) -> int:
    threads = share_cores(config.jobs) if config.jobs > 1 else None
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "autoprune.cli", "worker", "--study", ctx.study.study_name, "--storage", storage_url(config.storage), "--quiet", "--threads", str(threads)]
            + (["--tracking-uri", config.tracking_uri] if config.tracking_uri else []),
        )
        for _ in range(config.jobs - 1)
    ]
    try:
        ran = run_trials(ctx, deadline=deadline, progress=config.progress, tracker=tracker)
    finally:
        for proc in workers:
            if deadline is not None:
                proc.terminate()
            proc.wait()
        fail_orphaned_trials(ctx.study)  # trials of a worker that died after this loop's last look
    return ran


def run_worker(*, study_name: str, storage: str, tracking_uri: str | None, progress: bool, threads: int | None = None) -> int:
    """Join a study created by `autoprune search` and run trials until its budget is spent."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    study = load_study(study_name, storage)
    ctx = context_from_study(study)
    if spent(study) >= ctx.budget:
        print(f"study {study_name} has spent its budget of {ctx.budget} trials: nothing to do")
        return 0
    ctx.ensure_evaluator(progress=progress)
    # The parent run belongs to the coordinating `search`: a worker logs its trials but never ends it.
    tracker = _open_tracker(ctx, tracking_uri)
    ran = run_trials(ctx, deadline=None, progress=progress, tracker=tracker)
    print(f"worker {_OWNER} ran {ran} trials of {study_name}")
    return 0


__all__ = [
    "SearchConfig", "SearchOutcome", "SearchContext", "run_search", "run_worker", "load_study", "prepare",
    "context_from_study", "run_one_trial", "run_trials", "fail_orphaned_trials", "spent", "completed",
    "record_result", "record_failure", "failure_reason", "reporting", "over_budget",
]
