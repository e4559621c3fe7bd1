"""MLflow adapter: the only module that talks to MLflow, imported lazily by the search.

Layout in MLflow: one experiment per study name, one parent run per study (a resumed search reuses it,
its id is kept in the study's user attribute ``mlflow_parent_run_id``), one nested child run per trial
(tag ``autoprune.trial``). Child runs carry the policy as params, every metric, the trial state, the
failure reason and the tags ``pareto`` ("true"/"false") and ``pareto_rank``; the parent carries the
specs, the base model, the Pareto plots and tables.

Storage: by default everything lives under ``./mlruns`` (``mlruns/mlflow.db`` and ``mlruns/artifacts``),
so one folder holds a project's history. ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere: a
database or server URI as MLflow knows them, or a plain folder, which gets the same layout as ``./mlruns``.

Tracking never stops a search: the first MLflow failure prints one line to stderr, and a store that cannot
be reached leaves the tracker quiet for the rest of the process. The Optuna study is the source of truth:
``reconcile`` on resume logs what MLflow missed and ends the runs of trials that the study has ended,
such as those of a killed process once the runner has failed them.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial, Trial

PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_TAG = "autoprune.trial"
STATE_TAG = "autoprune.state"
FAILURE_TAG = "autoprune.failure"
ROLE_TAG = "autoprune.role"
STUDY_TAG = "autoprune.study"
PARETO_TAG = "pareto"
RANK_TAG = "pareto_rank"
PRIOR_TAG = "prior"
FEASIBLE_TAG = "feasible"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
DEFAULT_DIR = "mlruns"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
UI_HOST = "127.0.0.1"
RUNS_VIEW = "#/experiments/{id}/runs?workflowType=machine_learning"
FAILED_REASON = "the trial failed without a recorded reason"
# MLflow's own limits (mlflow.utils.validation): params/tags per batch, metrics per batch, lengths.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_TAG_LENGTH = 8000
# SQLite already waits 20 s for a lock (MLflow sets busy_timeout); these retries cover longer bursts of
# several worker processes writing at once.
LOCK_RETRIES = 6
# Plots take about a second to draw: during a search they are redrawn at most this often, and close()
# draws whatever changed since.
REDRAW_SECONDS = 30.0
# Optuna trial state -> MLflow run status. A pruned trial ended by decision, not by a fault.
RUN_STATUS = {"RUNNING": "RUNNING", "COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
PARENT_ARTIFACTS = {
    "pareto_front.png": "the front, static",
    "pareto_front.html": "the front, interactive (hover a point for its policy)",
    "pareto_front.csv": "the front's trials, one per row",
    "pareto_front.json": "the same with full policies",
    "pareto_layers.png": "bits, pruning ratio and sparsity per layer of front points",
    "base.json": "the base model's accuracy and cost",
    "search_space.yaml": "the search-space spec",
    "objectives.yaml": "the objective spec",
}
PARENT_NOTE = (
    "autoprune search. Child runs are the trials: filter them with `tags.pareto = \"true\"` for the Pareto "
    "front, and compare `accuracy` against `bops` (or any cost metric) in the Chart view. Artifacts of this run: "
    + "; ".join(f"`{name}` {what}" for name, what in PARENT_ARTIFACTS.items())
    + "; `signals.png` S/N and ESN_a of the base model during training."
)

_Method = TypeVar("_Method", bound=Callable[..., Any])


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store under ``./mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(Path.cwd() / DEFAULT_DIR / DB_FILE)


def _sqlite_uri(db: Path) -> str:
    return f"sqlite:///{db.expanduser().resolve()}"


def resolve_store(tracking_uri: str | None = None) -> tuple[str, Path | None]:
    """(tracking URI, artifact folder); the folder is None where the store chooses (servers, other databases).

    SQLite paths become absolute, so that worker processes and the UI find the same file whatever their
    working directory, and the artifacts sit next to the database.
    """
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return _sqlite_uri(db), db.expanduser().resolve().parent / ARTIFACTS_DIR
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        folder = Path(uri).expanduser().resolve()
        return _sqlite_uri(folder / DB_FILE), folder / ARTIFACTS_DIR
    return uri, None


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _safe_key(key: str) -> str:
    """MLflow keys allow word characters, ``.-: `` (and ``/``, avoided: keys become file paths)."""
    return re.sub(r"[^\w.\- :]", "_", key)


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _ms(moment: datetime | None) -> int:
    return int((moment.timestamp() if moment else time.time()) * 1000)


def _is_locked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if "database is locked" in text or "database is busy" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _RetryOnLock:
    """Wraps an MlflowClient: every call retries, with jittered backoff, while SQLite reports a lock."""

    def __init__(self, client: "MlflowClient") -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            attempt = 0
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    attempt += 1
                    if attempt >= LOCK_RETRIES or not _is_locked(exc):
                        raise
                    time.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random()))

        return call


def _unreachable(exc: BaseException) -> bool:
    """A connection-level failure (requests' errors are OSErrors too), as opposed to one bad call."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _guarded(method: _Method) -> _Method:
    @functools.wraps(method)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> Any:
        if self.offline:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # tracking must never end a search
            self._failed(exc, stop=method.__name__ == "start" or _unreachable(exc))
            return None

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class _Child:
    """What the tracker knows of a child run, enough to skip writes that would change nothing."""

    run_id: str
    status: str
    state: str
    params: frozenset[str]
    pareto: str | None
    rank: str | None

    @classmethod
    def of(cls, run: "Run") -> "_Child":
        tags = run.data.tags
        return cls(run.info.run_id, run.info.status, tags.get(STATE_TAG, ""), frozenset(run.data.params), tags.get(PARETO_TAG), tags.get(RANK_TAG))


def objectives_of(study: "optuna.Study") -> list[tuple[str, str]]:
    """(metric, direction) of each study value, from the spec the runner stored, else from Optuna."""
    spec = study.user_attrs.get("autoprune", {}).get("objectives", {}).get("objectives")
    if spec:
        return [(o["metric"], o.get("direction") or study.directions[i].name.lower()) for i, o in enumerate(spec)]
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    return [(name, d.name.lower()) for name, d in zip(names, study.directions)]


def trial_metrics(trial: "FrozenTrial", objectives: Sequence[tuple[str, str]]) -> dict[str, float]:
    """The runner's metrics as floats, plus any objective value it did not record there."""
    metrics = {k: float(v) for k, v in trial.user_attrs.get("metrics", {}).items() if isinstance(v, (int, float))}
    for (metric, _), value in zip(objectives, trial.values or ()):
        metrics.setdefault(metric, float(value))
    return metrics


class Tracker:
    """Mirrors one Optuna study into MLflow. Call ``start`` first; every method is safe to call again."""

    def __init__(self, *, study_name: str, tracking_uri: str | None = None) -> None:
        self.study_name = study_name
        self.tracking_uri, self.artifact_root = resolve_store(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.offline = False
        self._client: Any = None
        self._objectives: list[tuple[str, str]] = []
        self._children: dict[int, _Child] = {}
        self._drawn: tuple[Any, ...] | None = None
        self._drawn_at = -math.inf
        self._undrawn: "optuna.Study | None" = None
        self._warned = False
        self._plot_warned = False

    # -- failures -------------------------------------------------------------------------------------
    def _failed(self, exc: BaseException, *, stop: bool) -> None:
        """One line on the first failure. Without a store to talk to (``stop``), the tracker goes quiet
        rather than wait on every call; after a single bad call it goes on logging."""
        self.offline = self.offline or stop
        if self._warned:
            return
        self._warned = True
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        after = "tracking is off for this process" if stop else "later MLflow failures are not reported"
        print(
            f"autoprune: MLflow tracking at {self.tracking_uri} failed ({type(exc).__name__}: {reason}); {after}. "
            "The search goes on, its trials stay in the Optuna study and reach MLflow when the search is resumed",
            file=sys.stderr,
            flush=True,
        )

    def _require_started(self) -> tuple[Any, str]:
        if self._client is None or self.parent_run_id is None:
            raise RuntimeError("Tracker.start(study=...) must run before anything is logged")
        return self._client, self.parent_run_id

    # -- setup ----------------------------------------------------------------------------------------
    @_guarded
    def start(self, *, study: "optuna.Study") -> None:
        """Experiment and parent run (reused when the study records one that still exists); specs and base."""
        from mlflow import MlflowClient

        if _is_server(self.tracking_uri):
            # MLflow retries an unreachable server for minutes by default; a search should not wait that long.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        client = _RetryOnLock(MlflowClient(tracking_uri=self.tracking_uri))
        self.experiment_id = self._experiment(client)
        self._objectives = objectives_of(study)
        parent = self._recorded_parent(client, study.user_attrs.get(PARENT_RUN_ATTR))
        if parent is None:
            run = client.create_run(
                self.experiment_id,
                run_name="search",
                tags={ROLE_TAG: "parent", STUDY_TAG: self.study_name, NOTE_TAG: PARENT_NOTE},
            )
            self.parent_run_id = run.info.run_id
            study.set_user_attr(PARENT_RUN_ATTR, self.parent_run_id)
            logged: Mapping[str, str] = {}
        else:
            self.parent_run_id = parent.info.run_id
            client.update_run(self.parent_run_id, status="RUNNING")
            logged = parent.data.params
        self._client = client
        meta = study.user_attrs.get("autoprune", {})
        self._log(self.parent_run_id, params=self._study_params(meta), logged=logged, metrics=_base_metrics(meta.get("base", {})))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write_json(folder / "base.json", meta.get("base", {}))
            _write_yaml(folder / "search_space.yaml", meta.get("space", {}))
            _write_yaml(folder / "objectives.yaml", meta.get("objectives", {"objectives": [{"metric": m, "direction": d} for m, d in self._objectives]}))
            _write_json(folder / "task.json", meta.get("task", {}))
            client.log_artifacts(self.parent_run_id, str(folder))
        self._children = self._load_children()

    def _experiment(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.study_name)
        if experiment is None:
            location = (self.artifact_root / re.sub(r"[^\w.-]", "_", self.study_name)).as_uri() if self.artifact_root else None
            try:
                return str(client.create_experiment(self.study_name, artifact_location=location, tags={STUDY_TAG: self.study_name}))
            except Exception:
                # another worker of the same study may have created it a moment ago
                experiment = client.get_experiment_by_name(self.study_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)

    def _recorded_parent(self, client: Any, run_id: str | None) -> "Run | None":
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        same = run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"
        return run if same else None

    def _study_params(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        constraints = meta.get("objectives", {}).get("constraints") or []
        return {
            "study": self.study_name,
            "objectives": ", ".join(f"{m} ({d})" for m, d in self._objectives),
            "constraints": "; ".join(map(str, constraints)) or "none",
            **{f"task.{k}": v for k, v in flatten(meta.get("task", {})).items()},
        }

    # -- low-level writes -----------------------------------------------------------------------------
    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        logged: Mapping[str, str] | frozenset[str] = frozenset(),
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
        timestamp: int | None = None,
    ) -> dict[str, str]:
        """Batched within MLflow's limits. Returns params too long for MLflow, for an artifact.

        Params already logged are skipped: MLflow refuses to change a param, and a resumed run logs again.
        """
        from mlflow.entities import Metric, Param, RunTag

        too_long: dict[str, str] = {}
        fresh: list[Param] = []
        for key, value in (params or {}).items():
            safe, text = _safe_key(key), _param_value(value)
            if safe in logged:
                continue
            if len(text) > MAX_PARAM_LENGTH or len(safe) > MAX_KEY_LENGTH:
                too_long[key] = text
            else:
                fresh.append(Param(safe, text))
        now = timestamp or _ms(None)
        metric_rows = [Metric(_safe_key(k)[:MAX_KEY_LENGTH], float(v), now, step) for k, v in (metrics or {}).items()]
        tag_rows = [RunTag(_safe_key(k), str(v)[:MAX_TAG_LENGTH]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(fresh), len(tag_rows)), PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=fresh[i : i + PARAMS_PER_BATCH], tags=tag_rows[i : i + PARAMS_PER_BATCH])
        for i in range(0, len(metric_rows), METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=metric_rows[i : i + METRICS_PER_BATCH])
        return too_long

    def _load_children(self) -> dict[int, _Child]:
        children: dict[int, _Child] = {}
        for run in self._search(f"tags.{PARENT_TAG} = '{self.parent_run_id}'"):
            number = run.data.tags.get(TRIAL_TAG, "")
            if number.isdigit():
                children.setdefault(int(number), _Child.of(run))
        return children

    def _search(self, filter_string: str) -> Iterator["Run"]:
        token = None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _child(self, number: int) -> _Child | None:
        if number not in self._children:
            # another process of the same study may have logged it
            for run in self._search(f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{number}'"):
                self._children[number] = _Child.of(run)
        return self._children.get(number)

    # -- trials ---------------------------------------------------------------------------------------
    @_guarded
    def log_trial(self, trial: "FrozenTrial | Trial") -> None:
        """One child run per trial number. A live ``optuna.Trial`` (no state yet) is logged as RUNNING;
        the FrozenTrial from ``study.tell`` then completes the same run."""
        self._log_trial(trial)

    def _log_trial(self, trial: "FrozenTrial | Trial") -> None:
        client, parent = self._require_started()
        state = trial.state.name if hasattr(trial, "state") else "RUNNING"
        if state not in RUN_STATUS:
            return  # WAITING: enqueued, nothing ran yet
        attrs = trial.user_attrs
        # the runner marks a trial cut short (Ctrl-C, its process died) as a FAIL with ``interrupted``
        status = "KILLED" if state == "FAIL" and attrs.get("interrupted") else RUN_STATUS[state]
        child = self._child(trial.number)
        if child is not None and child.status == status and child.state == state:
            return
        if child is None:
            run = client.create_run(
                self.experiment_id,
                start_time=_ms(trial.datetime_start),
                run_name=f"trial-{trial.number:04d}",
                tags={PARENT_TAG: parent, TRIAL_TAG: str(trial.number)},
            )
            child = _Child(run.info.run_id, "RUNNING", "", frozenset(), None, None)
        policy = attrs.get("policy") or {}
        tags = {STATE_TAG: state}
        if attrs.get("prior"):
            tags[PRIOR_TAG] = str(attrs["prior"])
        if state == "FAIL":
            tags[FAILURE_TAG] = str(attrs.get("failure") or FAILED_REASON)
        finished = state in FINISHED_STATES
        metrics: dict[str, float] = {}
        if finished:
            from autoprune.search.pareto import feasible

            metrics = {**trial_metrics(trial, self._objectives), "trial": float(trial.number)}
            if trial.datetime_start and trial.datetime_complete:
                metrics["duration_s"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
            tags[FEASIBLE_TAG] = str(state == "COMPLETE" and feasible(trial)).lower()
        if state in ("FAIL", "PRUNED"):
            # only complete trials can be on the front; refresh() tags those
            tags[PARETO_TAG] = "false"
        params = flatten(policy)
        timestamp = _ms(getattr(trial, "datetime_complete", None))
        too_long = self._log(child.run_id, params=params, logged=child.params, metrics=metrics, tags=tags, timestamp=timestamp)
        if policy and (finished or not child.params):  # resolved layers may arrive only with the result
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                _write_json(folder / "policy.json", policy)
                if attrs.get("layers"):
                    _write_json(folder / "layers.json", attrs["layers"])
                if too_long:
                    _write_json(folder / "long_params.json", too_long)
                client.log_artifacts(child.run_id, str(folder))
        if status != "RUNNING":
            client.set_terminated(child.run_id, status=status, end_time=timestamp)
        self._children[trial.number] = _Child(
            child.run_id, status, state, child.params | {_safe_key(k) for k in params}, tags.get(PARETO_TAG, child.pareto), child.rank
        )

    @_guarded
    def reconcile(self, *, study: "optuna.Study") -> None:
        """Make MLflow match the study: log the finished trials it missed and end runs left RUNNING whose
        trial has ended (FAILED, or KILLED when the runner marked the trial ``interrupted``). Trials the
        study still has running belong to a live process (the runner fails those of dead ones first)."""
        self._require_started()
        self._children = self._load_children()
        for trial in study.get_trials(deepcopy=False):
            if trial.state.name in FINISHED_STATES:
                self._log_trial(trial)

    # -- the front ------------------------------------------------------------------------------------
    @_guarded
    def refresh(self, *, study: "optuna.Study") -> None:
        """Pareto tags of the child runs and progress metrics of the parent; the parent's plots and tables
        when the front or the set of complete trials changed, at most every REDRAW_SECONDS (close() draws
        the rest)."""
        from autoprune.search.pareto import pareto_ranks

        client, parent = self._require_started()
        ranks = pareto_ranks(study)
        trials = study.get_trials(deepcopy=False)
        if any(n not in self._children for n in ranks):
            self._children = self._load_children()
        states = {t.number: t.state.name for t in trials}
        for number, child in list(self._children.items()):
            if states.get(number) != "COMPLETE":
                continue
            pareto = "true" if ranks.get(number) == 0 else "false"
            rank = str(ranks[number]) if number in ranks else None
            tags = {PARETO_TAG: pareto} if pareto != child.pareto else {}
            if rank is not None and rank != child.rank:
                tags[RANK_TAG] = rank
            if tags:
                self._log(child.run_id, tags=tags)
                self._children[number] = _Child(child.run_id, child.status, child.state, child.params, pareto, rank or child.rank)
        finished = [t for t in trials if t.state.name in FINISHED_STATES]
        progress = {
            "front_size": float(sum(1 for r in ranks.values() if r == 0)),
            "trials_complete": float(sum(1 for t in finished if t.state.name == "COMPLETE")),
            "trials_failed": float(sum(1 for t in finished if t.state.name == "FAIL")),
        }
        if "autoprune" in study.user_attrs:
            from autoprune.search.pareto import hypervolume

            progress["hypervolume"] = hypervolume(study)
        self._log(parent, metrics=progress, step=len(finished))
        drawn = (tuple(sorted(ranks.items())), progress["trials_complete"])
        if drawn != self._drawn:
            self._drawn = drawn
            self._undrawn = study
            if time.monotonic() - self._drawn_at >= REDRAW_SECONDS:
                self._draw(study)

    def _draw(self, study: "optuna.Study") -> None:
        from autoprune import plots
        from autoprune.search.pareto import front_trials, pareto_ranks

        client, parent = self._require_started()
        self._undrawn = None
        self._drawn_at = time.monotonic()
        ranks = pareto_ranks(study)
        metric_names = [m for m, _ in self._objectives]
        base = _base_point(study.user_attrs.get("autoprune", {}).get("base", {}))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.values is not None]
        points = [
            plots.TrialPoint(t.number, trial_metrics(t, self._objectives), ranks.get(t.number), t.user_attrs.get("prior"), _policy_summary(t))
            for t in complete
        ]
        front = front_trials(study)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            try:
                title = f"{self.study_name}: Pareto front ({len(front)} of {len(points)} complete trials)"
                plots.pareto_png(points, metric_names, folder / "pareto_front.png", base=base, title=title)
                plots.pareto_html(points, metric_names, folder / "pareto_front.html", base=base, title=title)
                rows = [(f"trial {t.number} ({_values_text(t, self._objectives)})", _layers(t)) for t in front]
                plots.layers_png(rows, folder / "pareto_layers.png")
            except Exception as exc:  # a drawing bug must not stop tracking: tables and tags still go out
                if not self._plot_warned:
                    self._plot_warned = True
                    print(f"autoprune: could not draw the Pareto plots ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            rows_out = [self._front_row(t) for t in front]
            _write_json(folder / "pareto_front.json", rows_out)
            _write_front_csv(folder / "pareto_front.csv", rows_out, metric_names)
            client.log_artifacts(parent, str(folder))

    def _front_row(self, trial: "FrozenTrial") -> dict[str, Any]:
        child = self._children.get(trial.number)
        return {
            "trial": trial.number,
            "mlflow_run_id": child.run_id if child else None,
            "values": {m: v for (m, _), v in zip(self._objectives, trial.values)},
            "metrics": trial_metrics(trial, self._objectives),
            "prior": trial.user_attrs.get("prior"),
            "summary": _policy_summary(trial),
            "policy": trial.user_attrs.get("policy"),
        }

    # -- the base model -------------------------------------------------------------------------------
    @_guarded
    def log_signals(self, signals: Mapping[str, Any]) -> None:
        """Training-time S/N, noise and ESN_a of the base model per epoch (step = epoch) and their plot."""
        from autoprune import plots

        client, parent = self._require_started()
        epochs = [int(e) for e in signals["epochs"]]
        series: dict[str, Sequence[float]] = {}
        for layer, curves in signals.get("layers", {}).items():
            series.update({f"signals.{layer}.{name}": values for name, values in curves.items()})
        series.update({f"signals.total.{name}": values for name, values in signals.get("total", {}).items()})
        if signals.get("val_accuracy"):
            series["signals.val_accuracy"] = signals["val_accuracy"]
        for i, epoch in enumerate(epochs):
            self._log(parent, metrics={k: v[i] for k, v in series.items() if i < len(v)}, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write_json(folder / "signals.json", signals)
            plots.signals_png(signals, folder / "signals.png")
            client.log_artifacts(parent, str(folder))

    @_guarded
    def close(self, *, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, FAILED (the search raised) or KILLED (interrupted)."""
        client, parent = self._require_started()
        if self._undrawn is not None:
            self._draw(self._undrawn)
        client.set_terminated(parent, status=status)


def _base_metrics(base: Mapping[str, Any]) -> dict[str, float]:
    metrics = {f"base.{k}": float(v) for k, v in base.items() if k != "cost" and isinstance(v, (int, float))}
    metrics.update({f"base.{k}": float(v) for k, v in base.get("cost", {}).items() if isinstance(v, (int, float))})
    return metrics


def _base_point(base: Mapping[str, Any]) -> dict[str, float] | None:
    if not base:
        return None
    point = {k: float(v) for k, v in base.get("cost", {}).items() if isinstance(v, (int, float))}
    if isinstance(base.get("val_accuracy"), (int, float)):
        name = base.get("metric", "accuracy")  # the task's own metric, when it names one
        point[name] = float(base["val_accuracy"])
        point[f"{name}_drop"] = 0.0
    return point


def _layers(trial: "FrozenTrial") -> dict[str, dict[str, float]]:
    """Resolved per-layer settings; without them, the policy's exact layer keys."""
    layers = trial.user_attrs.get("layers") or (trial.user_attrs.get("policy") or {}).get("layers", {})
    return {name: dict(settings) for name, settings in layers.items()}


def _policy_summary(trial: "FrozenTrial") -> str:
    policy = trial.user_attrs.get("policy")
    if not policy:
        return ""
    from autoprune.policy import Policy

    return Policy.from_dict(policy).summary()


def _values_text(trial: "FrozenTrial", objectives: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{m} {v:.4g}" for (m, _), v in zip(objectives, trial.values))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


def _write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))


def _write_front_csv(path: Path, rows: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> None:
    metric_names = list(objectives) + sorted({m for row in rows for m in row["metrics"]} - set(objectives))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *metric_names, "prior", "policy", "mlflow_run_id"])
        for row in rows:
            metrics = row["metrics"]
            writer.writerow([row["trial"], *(metrics.get(m, "") for m in metric_names), row["prior"] or "", row["summary"], row["mlflow_run_id"] or ""])


# -- the UI -----------------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn does: a port left in TIME_WAIT by a server that just stopped is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((UI_HOST, port))
        except OSError:
            return False
    return True


def _get_json(url: str, body: Mapping[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def _runs_view(base_url: str) -> str:
    """The runs table of the experiment with the latest run (else the newest experiment), if any.

    Asked through the server's REST API, so that this process never imports mlflow and stays small.
    """
    api = f"{base_url}/api/2.0/mlflow"
    experiments = _get_json(f"{api}/experiments/search", {"max_results": 1000, "order_by": ["creation_time DESC"]}).get("experiments", [])
    ids = [e["experiment_id"] for e in experiments]
    if not ids:
        return ""
    runs = _get_json(f"{api}/runs/search", {"experiment_ids": ids, "max_results": 1, "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    latest = runs[0]["info"]["experiment_id"] if runs else ids[0]
    return RUNS_VIEW.format(id=latest)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.25)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """The server runs in its own process group (mlflow's CLI plus uvicorn): end the whole group."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_ui(*, port: int, tracking_uri: str | None = None) -> int:
    """Serve the MLflow UI over the tracking store on 127.0.0.1 until Ctrl-C (or SIGTERM/SIGHUP); 0 when
    stopped that way, the server's exit status when it ends by itself.

    Lean on purpose: one uvicorn worker and no job executor (about 0.5 GB instead of ~3 GB for ``mlflow ui``).
    """
    uri, artifacts = resolve_store(tracking_uri)
    if _is_server(uri):
        print(f"error: {uri} is a tracking server already: open it in a browser", file=sys.stderr)
        return 2
    if not _port_free(port):
        print(f"error: port {port} on {UI_HOST} is in use: choose another with --port", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", UI_HOST, "--port", str(port)]
    command += ["--workers", "1", "--uvicorn-opts", "--no-access-log"]
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        command += ["--artifacts-destination", str(artifacts)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base_url = f"http://{UI_HOST}:{port}"
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # The server's log stays out of the terminal (warnings at start-up) unless it fails to start.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if not _wait_ready(process, base_url):
                _stop(process)
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-20:]
                print("error: the MLflow server did not start:\n" + "\n".join(tail), file=sys.stderr)
                return process.returncode or 1
            try:
                view = _runs_view(base_url)
            except (OSError, ValueError, KeyError):
                view = ""
            print(f"MLflow UI over {uri}\n  {base_url}/{view}\nPress Ctrl-C to stop.", flush=True)
            return process.wait()
        except KeyboardInterrupt:
            _stop(process)
            print("MLflow UI stopped.", flush=True)
            return 0
        finally:
            if process.poll() is None:
                _stop(process)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
