"""The Ray Tune executor: Ray schedules and runs the trials, the Optuna study stays the one source of truth.

Ray Tune only sees ``StudySearcher``: its ``suggest`` asks the study for a trial and begins it (the same
``lifecycle.begin`` as the local executors) and hands the worker the trial's job (a policy, or a DJPQ config); its
``on_trial_complete`` finishes it (``lifecycle.finish``), which tells the study and reports the trial. Ray's own Optuna searcher is not
used: it keeps a private study, and trials would land somewhere ``pareto``, ``export`` and the UI never look.

A worker process builds the task's ``Evaluator`` once, from the base model the driver trained, and reuses
it for every trial it runs (``reuse_actors`` keeps the process across trials).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from autoprune.errors import AutopruneError
from autoprune.files import write_atomic
from autoprune.search.budget import over_budget, spent
from autoprune.search.evaluate import Evaluator
from autoprune.search.lifecycle import SKIPPED, Outcome, begin, failure_reason, finish, heartbeat
from autoprune.search.progress import Reporter, open_tracker
from autoprune.search.strategies import TrialJob, run_job
from autoprune.search.study import RayOptions, SearchConfig, SearchContext, context_from_study, load_study, storage_url
from autoprune.task import task_from_record

try:  # this module is imported only for --executor ray, so Ray loads only then (design decision 4)
    import ray
    from ray import tune
    from ray.tune.search import Searcher
except ImportError:
    raise AutopruneError("--executor", "ray", "needs Ray Tune: pip install 'ray[tune]'") from None

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


RESULT_KEY = "autoprune"
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Tune's per-trial CSV/JSON/TensorBoard files would only duplicate the study.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # The classic reporter honours verbose=0; the new one prints its tables whatever verbose says.
    "RAY_AIR_NEW_OUTPUT": "0",
}
# A local Ray instance listens on every interface unless this is off; Ray reads it once, at import.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_CONNECT_TIMEOUT_S = 5.0
_EVALUATORS: dict[str, Evaluator] = {}


# --- the worker side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """What every trial of a search shares, shipped once to each worker through Ray's object store."""

    task: dict[str, Any]
    cache_dir: str
    base_files: dict[str, bytes]
    threads: int
    # cuda where the trial was given a GPU (Ray makes only that one visible to it), else cpu
    device: str = "cpu"
    # the objectives read latency_ms: each worker measures it with its own latency model
    latency: bool = False


def _evaluator(job: WorkerJob) -> Evaluator:
    from autoprune.files import CACHE_ENV

    key = json.dumps(job.task, sort_keys=True)
    if key not in _EVALUATORS:
        os.environ[CACHE_ENV] = job.cache_dir
        task = task_from_record(job.task, device=job.device)
        if not task.is_user:
            _install_base(task.cache_dir(), job.base_files)
        _EVALUATORS[key] = Evaluator.for_task(task, progress=False, latency=job.latency)
    return _EVALUATORS[key]


def _install_base(folder: Path, files: dict[str, bytes]) -> None:
    """Put the driver's trained base model into this node's cache, so no node trains its own copy."""
    if (folder / "meta.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    # meta.json last: the cache trusts a folder only once it is there; write_atomic's per-process temp
    # names keep apart several workers of one node arriving at the same moment.
    for name in sorted(files, key=lambda n: n == "meta.json"):
        write_atomic(folder / name, files[name])


def run_trial(config: dict[str, Any], job: WorkerJob) -> None:
    """The Ray Tune trainable: run one trial job (``strategies.run_job``) and report the outcome as one JSON result.

    A failure of the policy (diverged, invalid) is reported as a result with its reason; only a worker
    that dies, or a fault of Ray itself, becomes a Ray trial error, which ``--retries`` may retry.
    """
    import torch

    torch.set_num_threads(job.threads)
    # the driver records a failure's reason and the search goes on
    node = f"ray:{ray.get_runtime_context().get_node_id()}"
    outcome = Outcome.of(lambda: run_job(_evaluator(job), TrialJob.model_validate(config["job"])), worker=node)
    # Tune flattens nested results into "a/b" keys; one JSON string comes back as it was sent.
    tune.report({RESULT_KEY: json.dumps(outcome.to_dict())})


def trial_dirname(trial: Any) -> str:
    # Tune names trial folders after the config, which here holds a whole policy.
    return f"trial_{trial.config['number']:05d}"


# --- the driver side --------------------------------------------------------------------------------


class StudySearcher(Searcher):
    """Ray Tune's view of the Optuna study: ``suggest`` asks it, ``on_trial_complete`` tells it.

    Tune pickles its search algorithm (into its experiment folder, and to the cluster's head node when
    the driver connects through ``ray://``, where the Tune loop then runs). Only the recipe travels: the
    study's name and storage, the tracking URI and the deadline; a copy rebuilds the study and its own
    MLflow tracker from them on first use.
    """

    def __init__(
        self,
        ctx: SearchContext,
        *,
        storage: str,
        tracking_uri: str | None,
        deadline: float | None,
        on_result: Callable[["FrozenTrial"], None],
    ) -> None:
        super().__init__()  # no metric/mode: the study holds the objectives and their directions
        self._recipe = {
            "study": ctx.study.study_name,
            "storage": storage,
            "tracking_uri": tracking_uri,
            # wall-clock, not monotonic: the copy may run on another machine
            "deadline": None if deadline is None else time.time() + (deadline - time.monotonic()),
        }
        self._live(ctx, on_result)

    def _live(self, ctx: SearchContext, on_result: Callable[["FrozenTrial"], None]) -> None:
        self._ctx = ctx
        ctx.notify = on_result
        self._distributions = ctx.space.distributions()
        self._pending: dict[str, tuple["optuna.Trial", ExitStack]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"_recipe": self._recipe, "_metric": self._metric, "_mode": self._mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ctx = None

    def _context(self) -> SearchContext:
        if self._ctx is None:
            ctx = context_from_study(load_study(self._recipe["study"], self._recipe["storage"]))
            tracker = open_tracker(ctx, self._recipe["tracking_uri"]) if self._recipe["tracking_uri"] else None
            self._live(ctx, Reporter(ctx, tracker=tracker, progress=False).told)
        return self._ctx

    def finished(self) -> bool:
        """The budget is spent or the deadline passed: no more trials to suggest."""
        ctx, deadline = self._context(), self._recipe["deadline"]
        return (deadline is not None and time.time() >= deadline) or spent(ctx.study) >= ctx.budget

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        ctx = self._context()
        while not self.finished():
            trial = ctx.study.ask(self._distributions)
            if over_budget(ctx.study, trial.number, ctx.budget):
                finish(ctx, trial, Outcome(failure=SKIPPED, interrupted=True))
                break
            # The driver tells the study, so it owns the trial: if it dies, a resume fails the trial.
            job = begin(ctx, trial)
            if job is None:
                continue  # as in the local executors, a bad point is a failed trial
            beat = ExitStack()
            beat.enter_context(heartbeat(ctx, trial))
            self._pending[trial_id] = (trial, beat)
            return {"job": job.model_dump(), "number": trial.number}
        return self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if error or trial_id not in self._pending:
            return  # an error is told by TrialErrors, which Tune calls next with the error itself
        ctx = self._context()
        trial, beat = self._pending.pop(trial_id)
        with beat:
            sent = json.loads(result[RESULT_KEY]) if result and RESULT_KEY in result else {"failure": "Ray Tune ended it without a result"}
            finish(ctx, trial, Outcome.from_dict(sent))

    def fail(self, trial_id: str, reason: str) -> None:
        """A trial Ray gave up on (its worker died, after any --retries): failed, and it spends the budget."""
        if trial_id not in self._pending:
            return
        ctx = self._context()
        trial, beat = self._pending.pop(trial_id)
        with beat:
            finish(ctx, trial, Outcome(failure=reason))

    def abandon(self, reason: str) -> None:
        """Trials Tune started but never finished (the driver was interrupted): failed as interrupted,
        so they do not count toward the budget and a resume runs them again."""
        for trial_id in list(self._pending):
            trial, beat = self._pending.pop(trial_id)
            with beat:
                finish(self._context(), trial, Outcome(failure=reason, interrupted=True))


class TrialErrors(tune.Callback):
    """Tells the study why Ray gave up on a trial: Tune calls the searcher's ``on_trial_complete`` with
    no more than ``error=True``, and this callback right after it with the trial and its error."""

    def __init__(self, searcher: StudySearcher) -> None:
        self._searcher = searcher

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # Tune has written the error next to the trial, not yet to its storage, where get_pickled_error looks.
        path = Path(trial.pickled_error_file) if trial.pickled_error_file else None
        error = ray.cloudpickle.loads(path.read_bytes()) if path is not None and path.is_file() else None
        # A RayTaskError wraps what the trainable raised (say, autoprune missing on a node).
        cause = getattr(error, "cause", None) or error
        reason = failure_reason(cause) if cause is not None else "Ray ended it with an error (see the Ray logs of its node)"
        self._searcher.fail(trial.trial_id, reason)


# --- connecting and running -------------------------------------------------------------------------


@contextmanager
def _environment(*, local: bool) -> Iterator[None]:
    env = {**_RAY_ENV, **({_LOOPBACK_ENV: "0"} if local else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the processes Ray starts, which inherit it
    from ray._private import ray_constants

    cluster = ray_constants.ENABLE_RAY_CLUSTER
    if local:
        # Ray imported the switch before this run could set it: this process needs the constant too,
        # or its node and its ports bind the machine's public address.
        ray_constants.ENABLE_RAY_CLUSTER = False
    quiet = [logging.getLogger(name) for name in ("ray.tune", "ray.train")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        # Tune warns that this searcher cannot be checkpointed and that trials wrote no result files (both
        # by design: the study is the checkpoint and holds the results), and lists the trials that failed
        # at the end, which the study records with their reasons.
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cluster_address(opts: RayOptions) -> str | None:
    """--address, else RAY_ADDRESS (set by ``ray job submit`` on a cluster), else None: start a local instance."""
    return opts.address or os.environ.get("RAY_ADDRESS") or None


def _source(opts: RayOptions) -> str:
    """What an address error names: the flag, or the environment variable the address came from."""
    return "--address" if opts.address else "RAY_ADDRESS"


def preflight(config: SearchConfig) -> None:
    """Every check that needs no training, so an unreachable cluster fails in seconds (the numbers of
    RayOptions are checked when it is built)."""
    address, source = cluster_address(config.ray), _source(config.ray)
    if address is None:
        # the local instance is this machine: what a trial asks for is known before Ray starts (once started,
        # a trial that cannot fit was refused only after Ray's start-up, with the study already created)
        if not ray.is_initialized():
            _check_fits(config.ray, {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus())})
        return
    if address.startswith("ray://"):
        storage = storage_url(config.storage)
        if storage.startswith("sqlite"):
            raise AutopruneError(
                "--storage", storage, "is a file on this machine, but through ray:// the Tune loop runs on the cluster's head node: give a database URL it can reach (postgresql://...)"
            )
        if importlib.util.find_spec("grpc") is None:
            raise AutopruneError(source, address, "needs the Ray Client: pip install 'ray[client]'")
    _probe(address, source)


def _probe(address: str, source: str) -> None:
    """A plain TCP connect: Ray itself retries an unreachable HOST:PORT for minutes."""
    target = address.removeprefix("ray://")
    if target == "auto":
        # what ray.init("auto") resolves: RAY_ADDRESS or the cluster `ray start` last started here
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise AutopruneError(source, address, f"finds no running Ray cluster on this machine ({_first_line(exc)})") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise AutopruneError(source, address, "must be auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise AutopruneError(source, address, f"cannot be reached ({exc.strerror or exc})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


@contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Ray for one search: joins the cluster at ``address``, or starts a local instance sized to this
    machine, on loopback only, and shuts it down at the end. Yields whether it started one. A Ray already
    initialised in this process (a notebook, a bench) is used as it is."""
    started = not ray.is_initialized() and address is None
    with _environment(local=started):
        if started:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        elif not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, gRPC errors...
                raise AutopruneError("--address", address, f"cannot be reached ({_first_line(exc)})") from None
        try:
            yield started
        finally:
            if started:
                ray.shutdown()


def _slots(config: RayOptions, resources: dict[str, float]) -> int:
    """Trials run at once: --workers, else as many as the cluster's CPUs (and GPUs) hold."""
    if config.workers is not None:
        return config.workers
    fits = resources.get("CPU", 1.0) / config.cpus_per_trial
    if config.gpus_per_trial > 0:
        fits = min(fits, resources.get("GPU", 0.0) / config.gpus_per_trial)
    return max(1, int(fits))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_fits(config: RayOptions, resources: dict[str, float]) -> None:
    """On the local instance a trial that cannot fit would wait forever (a cluster may scale up)."""
    for flag, wanted, kind in (("--cpus-per-trial", config.cpus_per_trial, "CPU"), ("--gpus-per-trial", config.gpus_per_trial, "GPU")):
        have = resources.get(kind, 0.0)
        if wanted > have:
            raise AutopruneError(flag, wanted, f"is more than the {have:g} {kind}s of this machine's Ray instance")


def _worker_job(ctx: SearchContext, config: RayOptions) -> WorkerJob:
    from autoprune.files import cache_root

    evaluator = ctx.ensure_evaluator(progress=False)
    folder = evaluator.base.cache_path
    # A user task's node rebuilds it from its reference: there is no trained base to ship.
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} if folder else {}
    return WorkerJob(
        task=ctx.task.record(),
        cache_dir=str(cache_root().resolve()),
        base_files=files,
        threads=max(1, int(config.cpus_per_trial)),
        device="cuda" if config.gpus_per_trial > 0 else "cpu",
        latency=ctx.objectives.needs_latency,
    )


def _shared_tracking_uri(tracking_uri: str | None) -> str | None:
    """The MLflow store a copy of the searcher on the head node may log to live. A SQLite file of this
    machine is not one: those trials reach MLflow when the driver reconciles at the end."""
    from autoprune.tracking.store import resolve_store

    uri = resolve_store(tracking_uri)[0]
    return None if uri.startswith(("sqlite:", "file:")) else uri


class RayExecutor:
    """Trials on Ray Tune: a local instance, or the cluster at ``--address``."""

    starts_other_processes = True

    def preflight(self, config: SearchConfig) -> None:
        preflight(config)

    def run(self, ctx: SearchContext, config: SearchConfig, *, deadline: float | None) -> int:
        """Run the study's remaining budget on Ray Tune; returns how many trials Tune ran."""
        opts = config.ray
        with ray_session(cluster_address(opts)) as started:
            resources = ray.cluster_resources()
            if started:
                _check_fits(opts, resources)
            searcher = StudySearcher(
                ctx,
                storage=storage_url(config.storage),
                tracking_uri=_shared_tracking_uri(config.tracking_uri),
                deadline=deadline,
                on_result=ctx.notify or (lambda frozen: None),
            )
            try:
                ran = _fit(searcher, _worker_job(ctx, opts), opts, slots=_slots(opts, resources), name=ctx.study.study_name)
                if not searcher.finished():
                    # Tune's Ctrl-C handler stops its trials and returns from fit() as if it were done
                    raise KeyboardInterrupt
                return ran
            except KeyboardInterrupt:
                searcher.abandon("interrupted: Ctrl-C")
                raise
            finally:
                searcher.abandon("interrupted: Ray Tune stopped before the trial finished")


def _fit(searcher: StudySearcher, job: WorkerJob, config: RayOptions, *, slots: int, name: str) -> int:
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial})
    with tempfile.TemporaryDirectory(prefix="autoprune-tune-") as storage:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=-1,  # the searcher ends the run when the study's budget is spent
                max_concurrent_trials=slots,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name="".join(c if c.isalnum() or c in "-_" else "_" for c in name),
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=config.retries),
                callbacks=[TrialErrors(searcher)],
            ),
        )
        return len(tuner.fit())


__all__ = ["RayExecutor", "ray_session", "preflight", "StudySearcher", "TrialErrors", "WorkerJob", "run_trial", "RESULT_KEY"]
