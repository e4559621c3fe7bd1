"""Mirrors a study into MLflow from the events and front snapshots the search hands it.

Layout in MLflow: one experiment per study name, one parent run per study (a resumed search reuses it:
``start`` returns its id and the search records it in the study), one nested child run per trial (tag
``autoprune.trial``). Child runs carry the policy as params, every metric, the trial state, the failure
reason and the tags ``pareto`` ("true"/"false") and ``pareto_rank``; the parent carries the specs, the
base model, the Pareto plots and tables.

Tracking never stops a search: the first MLflow failure prints one line to stderr, and a store that cannot
be reached leaves the tracker quiet for the rest of the process. The Optuna study is the source of truth:
``reconcile`` on resume logs what MLflow missed and ends the runs of trials that the study has ended.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

from autoprune.metrics import FrontRow, front_csv
from autoprune.processes import owner_alive, this_process
from autoprune.tracking.events import FrontSnapshot, StudyInfo, TrialEvent
from autoprune.tracking.store import DamagedStore, all_runs, fluent_store, open_client, resolve_store

if TYPE_CHECKING:
    from mlflow.entities import Run

TRIAL_TAG = "autoprune.trial"
STATE_TAG = "autoprune.state"
FAILURE_TAG = "autoprune.failure"
ROLE_TAG = "autoprune.role"
STUDY_TAG = "autoprune.study"
PARETO_TAG = "pareto"
RANK_TAG = "pareto_rank"
PRIOR_TAG = "prior"
STRATEGY_TAG = "strategy"
FEASIBLE_TAG = "feasible"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
FAILED_REASON = "the trial failed without a recorded reason"
# MLflow's own limits (mlflow.utils.validation): params and tags per batch, entities per batch, lengths.
PARAMS_PER_BATCH = 100
ENTITIES_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_TAG_LENGTH = 8000
# Every MLflow call on its SQLite store costs about 10 ms of Python, on the thread that trains trials' GIL.
# So during a search the front's plots (about a second to draw) are redrawn at most every REDRAW_SECONDS,
# without the per-layer plot (the slowest: close() draws it), and the parent's progress metrics, one row
# per trial, are written in one batch at most every PROGRESS_SECONDS.
REDRAW_SECONDS = 60.0
PROGRESS_SECONDS = 10.0
# how long after another host's trial ended its own tracker has to log it before reconcile does
OWNER_GRACE_SECONDS = 120.0
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


def _metric_rows(metrics: Mapping[str, float], *, step: int, timestamp: int) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(_safe_key(k)[:MAX_KEY_LENGTH], float(v), timestamp, step) for k, v in metrics.items()]


def _pareto(rank: int) -> str:
    """The pareto tag of a complete trial of this Pareto rank."""
    return "true" if rank == 0 else "false"


def _drawing(snapshot: FrontSnapshot) -> tuple[Any, ...]:
    """What the parent's plots show of a snapshot: they are redrawn only when it changes."""
    return (snapshot.front, snapshot.complete)


def _ms(moment: datetime | None) -> int:
    return int((moment.timestamp() if moment else time.time()) * 1000)


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


class Tracker:
    """Mirrors one study into MLflow. Call ``start`` first; every method is safe to call again."""

    def __init__(self, *, study_name: str, tracking_uri: str | None = None) -> None:
        self.study_name = study_name
        self.tracking_uri, self.artifact_root = resolve_store(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.offline = False
        self._client: Any = None
        self._study: StudyInfo | None = None
        self._children: dict[int, _Child] = {}
        self._latest: FrontSnapshot | None = None
        self._drawn_key: tuple[Any, ...] | None = None
        self._drawn_in_full = False
        self._drawn_at = -math.inf
        self._progress: list[Any] = []
        self._progress_at = -math.inf
        self._warned = False
        self._plot_warned = False
        self._parent_metrics: frozenset[str] = frozenset()

    # -- failures -------------------------------------------------------------------------------------
    def _failed(self, exc: BaseException, *, stop: bool) -> None:
        """One line on the first failure. Without a store to talk to (``stop``), the tracker goes quiet
        rather than wait on every call; after a single bad call it goes on logging."""
        self.offline = self.offline or stop
        if self._warned:
            return
        self._warned = True
        if isinstance(exc, DamagedStore):
            print(
                f"autoprune: {exc}: this search runs untracked; its trials stay in the Optuna study and reach MLflow "
                "when the search is resumed with a sound store (move the damaged one aside: a new one is made)",
                file=sys.stderr,
                flush=True,
            )
            return
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
    def start(self, *, study: StudyInfo, on_parent: Callable[[str], None] | None = None) -> str | None:
        """Experiment and parent run (reused when ``study.parent_run_id`` still exists); specs and base.
        Returns the parent run's id. ``on_parent`` is handed a new parent's id the moment it exists, before
        anything is logged to it: a search killed while logging then leaves a parent its resume reuses, not
        an orphan left RUNNING beside a second one."""
        client = open_client(self.tracking_uri)
        self.experiment_id = self._experiment(client)
        self._study = study
        parent = self._recorded_parent(client, study.parent_run_id)
        if parent is None:
            run = client.create_run(
                self.experiment_id,
                run_name="search",
                tags={ROLE_TAG: "parent", STUDY_TAG: self.study_name, NOTE_TAG: PARENT_NOTE},
            )
            self.parent_run_id = run.info.run_id
            if on_parent is not None:
                on_parent(self.parent_run_id)
            logged: Mapping[str, str] = {}
        else:
            self.parent_run_id = parent.info.run_id
            client.update_run(self.parent_run_id, status="RUNNING")
            logged = parent.data.params
            # MLflow keeps every logged value as history: a resume that logged them again would double it
            self._parent_metrics = frozenset(parent.data.metrics)
        self._client = client
        base = {k: v for k, v in _base_metrics(study.base).items() if k not in self._parent_metrics}
        self._log(self.parent_run_id, params=self._study_params(study), logged=logged, metrics=base)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write_json(folder / "base.json", dict(study.base))
            _write_yaml(folder / "search_space.yaml", dict(study.space))
            objectives = {"objectives": [{"metric": m, "direction": d} for m, d in study.objectives], "constraints": list(study.constraints)}
            _write_yaml(folder / "objectives.yaml", objectives)
            _write_json(folder / "task.json", dict(study.task))
            client.log_artifacts(self.parent_run_id, str(folder))
        self._children = self._load_children()
        # the first plots wait REDRAW_SECONDS too: a search shorter than that draws once, at close
        self._drawn_at = time.monotonic()
        return self.parent_run_id

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

    def _study_params(self, study: StudyInfo) -> dict[str, Any]:
        return {
            "study": self.study_name,
            "objectives": ", ".join(f"{m} ({d})" for m, d in study.objectives),
            "constraints": "; ".join(study.constraints) or "none",
            **{f"task.{k}": v for k, v in flatten(study.task).items()},
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
        metric_rows: Sequence[Any] = (),
    ) -> dict[str, str]:
        """As few batches as MLflow's limits allow (one, for a trial). ``metric_rows``: MLflow ``Metric``s
        with their own steps, beside ``metrics`` at ``step``. Returns params too long for MLflow, for an
        artifact.

        Params already logged are skipped: MLflow refuses to change a param, and a resumed run logs again.
        """
        from mlflow.entities import Param, RunTag

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
        rows = [*metric_rows, *_metric_rows(metrics or {}, step=step, timestamp=timestamp or _ms(None))]
        tag_rows = [RunTag(_safe_key(k), str(v)[:MAX_TAG_LENGTH]) for k, v in (tags or {}).items()]
        while fresh or tag_rows or rows:
            params_now, fresh = fresh[:PARAMS_PER_BATCH], fresh[PARAMS_PER_BATCH:]
            tags_now, tag_rows = tag_rows[:PARAMS_PER_BATCH], tag_rows[PARAMS_PER_BATCH:]
            room = ENTITIES_PER_BATCH - len(params_now) - len(tags_now)
            metrics_now, rows = rows[:room], rows[room:]
            self._client.log_batch(run_id, metrics=metrics_now, params=params_now, tags=tags_now)
        return too_long

    def _load_children(self) -> dict[int, _Child]:
        children: dict[int, _Child] = {}
        for run in all_runs(self._client, self.experiment_id, f"tags.{PARENT_TAG} = '{self.parent_run_id}'"):
            number = run.data.tags.get(TRIAL_TAG, "")
            if number.isdigit():
                children.setdefault(int(number), _Child.of(run))
        return children

    def _child(self, number: int) -> _Child | None:
        # Loaded at start and by reconcile. Another process logs only the trials it ran (_left_to_owner) and
        # keeps their tags, so a trial this process told needs no search of MLflow for a run made elsewhere;
        # the close's reconcile takes in the rest before the last tags.
        return self._children.get(number)

    # -- trials ---------------------------------------------------------------------------------------
    @_guarded
    def log_trial(self, event: TrialEvent, *, rank: int | None = None) -> None:
        """One child run per trial number: a RUNNING event opens it, the finished one completes it.
        ``rank``: the told trial's Pareto rank, tagged in the same write (``refresh`` then skips it)."""
        self._log_trial(event, rank=rank)

    def _log_trial(self, event: TrialEvent, *, rank: int | None = None) -> None:
        client, parent = self._require_started()
        state = event.state
        if state not in RUN_STATUS:
            return  # WAITING: enqueued, nothing ran yet
        # the search marks a trial cut short (Ctrl-C, its process died) as a FAIL with ``interrupted``
        status = "KILLED" if state == "FAIL" and event.interrupted else RUN_STATUS[state]
        child = self._child(event.number)
        if child is not None and child.status == status and child.state == state:
            return
        policy = dict(event.policy)
        tags = {STATE_TAG: state, STRATEGY_TAG: event.strategy}
        if event.prior:
            tags[PRIOR_TAG] = event.prior
        if state == "FAIL":
            tags[FAILURE_TAG] = event.failure or FAILED_REASON
        finished = state in FINISHED_STATES
        metrics: dict[str, float] = {}
        if finished:
            metrics = {**self._metrics(event), "trial": float(event.number)}
            if event.started and event.completed:
                metrics["duration_s"] = (event.completed - event.started).total_seconds()
            tags[FEASIBLE_TAG] = str(state == "COMPLETE" and event.feasible).lower()
        if state in ("FAIL", "PRUNED"):
            # only complete trials can be on the front; refresh() tags those
            tags[PARETO_TAG] = "false"
        elif state == "COMPLETE" and rank is not None:
            tags[PARETO_TAG], tags[RANK_TAG] = _pareto(rank), str(rank)
        params = flatten(policy)
        timestamp = _ms(event.completed) if event.completed else None
        unwritten = tags
        if child is None:
            # a new run takes its tags as it is created, which saves log_batch a round of tag writes
            run = client.create_run(
                self.experiment_id,
                start_time=_ms(event.started),
                run_name=f"trial-{event.number:04d}",
                tags={PARENT_TAG: parent, TRIAL_TAG: str(event.number), **{_safe_key(k): str(v)[:MAX_TAG_LENGTH] for k, v in tags.items()}},
            )
            child, unwritten = _Child(run.info.run_id, "RUNNING", "", frozenset(), None, None), {}
        too_long = self._log(child.run_id, params=params, logged=child.params, metrics=metrics, tags=unwritten, timestamp=timestamp)
        if policy and (finished or not child.params):  # resolved layers may arrive only with the result
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                _write_json(folder / "policy.json", policy)
                if event.layers:
                    _write_json(folder / "layers.json", dict(event.layers))
                if too_long:
                    _write_json(folder / "long_params.json", too_long)
                client.log_artifacts(child.run_id, str(folder))
        if status != "RUNNING":
            client.set_terminated(child.run_id, status=status, end_time=timestamp)
        self._children[event.number] = _Child(
            child.run_id, status, state, child.params | {_safe_key(k) for k in params}, tags.get(PARETO_TAG, child.pareto), tags.get(RANK_TAG, child.rank)
        )

    def _metrics(self, event: TrialEvent) -> dict[str, float]:
        """The recorded metrics as floats, plus any objective value not recorded there."""
        metrics = {k: float(v) for k, v in event.metrics.items() if isinstance(v, (int, float))}
        names = self._study.metric_names if self._study else []
        for metric, value in zip(names, event.values or ()):
            metrics.setdefault(metric, float(value))
        return metrics

    @_guarded
    def reconcile(self, events: Iterable[TrialEvent]) -> None:
        """Make MLflow match the study: log the finished trials it missed and end runs left RUNNING whose
        trial has ended (FAILED, or KILLED when the trial is ``interrupted``). Running trials belong to a
        live process (the search fails those of dead ones first)."""
        self._require_started()
        self._children = self._load_children()
        for event in events:
            if event.state in FINISHED_STATES and not self._left_to_owner(event):
                self._log_trial(event)

    def _left_to_owner(self, event: TrialEvent) -> bool:
        """A trial another live process ran is logged by that process's own tracker (perhaps a moment from
        now): logging it here too would make two child runs of one trial. Another host's processes cannot be
        seen from here, so their trials are left to them for OWNER_GRACE_SECONDS after they ended."""
        if not event.owner or event.owner == this_process():
            return False
        alive = owner_alive(event.owner)
        if alive is not None:
            return alive
        ended = event.completed.timestamp() if event.completed else -math.inf
        return time.time() - ended < OWNER_GRACE_SECONDS

    # -- the front ------------------------------------------------------------------------------------
    @_guarded
    def refresh(self, snapshot: FrontSnapshot) -> None:
        """Pareto tags of the child runs whose rank changed and progress metrics of the parent; the
        parent's plots and tables when the front or the set of complete trials changed, at most every
        REDRAW_SECONDS (close() draws the rest)."""
        _client, parent = self._require_started()
        for number, rank in snapshot.changed.items():
            child = self._child(number)
            if child is None:
                continue
            pareto = _pareto(rank)
            tags = {PARETO_TAG: pareto} if pareto != child.pareto else {}
            if str(rank) != child.rank:
                tags[RANK_TAG] = str(rank)
            if tags:
                self._log(child.run_id, tags=tags)
                self._children[number] = _Child(child.run_id, child.status, child.state, child.params, pareto, str(rank))
        progress = {
            "front_size": float(len(snapshot.front)),
            "trials_complete": float(snapshot.complete),
            "trials_failed": float(snapshot.failed),
        }
        if snapshot.hypervolume is not None:
            progress["hypervolume"] = snapshot.hypervolume
        self._progress += _metric_rows(progress, step=snapshot.complete + snapshot.failed, timestamp=_ms(None))
        if time.monotonic() - self._progress_at >= PROGRESS_SECONDS:
            self._flush_progress()
        self._latest = snapshot
        if _drawing(snapshot) != self._drawn_key and time.monotonic() - self._drawn_at >= REDRAW_SECONDS:
            self._draw(snapshot, in_full=False)

    @_guarded
    def flush(self) -> None:
        """Write the buffered progress metrics now (a worker's last call: the search's close() draws)."""
        self._flush_progress()

    def _flush_progress(self) -> None:
        _client, parent = self._require_started()
        rows, self._progress = self._progress, []
        self._progress_at = time.monotonic()
        if rows:
            self._log(parent, metric_rows=rows)

    def _draw(self, snapshot: FrontSnapshot, *, in_full: bool) -> None:
        """The parent's front plots and tables; ``in_full`` adds the per-layer plot."""
        from autoprune import plots

        client, parent = self._require_started()
        study = self._study
        assert study is not None
        self._drawn_key = _drawing(snapshot)
        self._drawn_in_full = in_full
        self._drawn_at = time.monotonic()
        metric_names = study.metric_names
        base = _base_point(study.base)
        points = [plots.TrialPoint(n, row.metrics, snapshot.ranks.get(n), row.prior, row.summary, row.strategy) for n, row in snapshot.rows.items()]
        front = snapshot.front_rows()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            try:
                title = f"{self.study_name}: Pareto front ({len(front)} of {len(points)} complete trials)"
                plots.pareto_png(points, metric_names, folder / "pareto_front.png", base=base, title=title)
                plots.pareto_html(points, metric_names, folder / "pareto_front.html", base=base, title=title)
                if in_full:
                    rows = [(f"trial {r.trial} ({_values_text(r, metric_names)})", {k: dict(v) for k, v in (r.layers or {}).items()}) for r in front]
                    plots.layers_png(rows, folder / "pareto_layers.png")
            except Exception as exc:  # a drawing bug must not stop tracking: tables and tags still go out
                if not self._plot_warned:
                    self._plot_warned = True
                    print(f"autoprune: could not draw the Pareto plots ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            _write_json(folder / "pareto_front.json", [self._front_json(r, metric_names) for r in front])
            (folder / "pareto_front.csv").write_text(front_csv(front, metric_names))
            client.log_artifacts(parent, str(folder))

    def _front_json(self, row: FrontRow, metric_names: Sequence[str]) -> dict[str, Any]:
        child = self._children.get(row.trial)
        return {
            "trial": row.trial,
            "mlflow_run_id": child.run_id if child else None,
            "values": dict(zip(metric_names, row.values)),
            "metrics": dict(row.metrics),
            "prior": row.prior,
            "strategy": row.strategy,
            "summary": row.summary,
            "policy": row.policy,
        }

    # -- the fidelity ladder ---------------------------------------------------------------------------
    @_guarded
    def log_predicted(self, points: Sequence[Mapping[str, Any]], *, metric: str) -> None:
        """Rung 0, the predicted front (one point per cost budget: ``cost``, ``predicted_loss``, ``tag``,
        ``summary``), in the parent run before any trial: metrics at step = budget index, and a table."""
        client, parent = self._require_started()
        if any(name.startswith("predicted.") for name in self._parent_metrics):
            return
        now = _ms(None)
        rows = [
            row for i, point in enumerate(points)
            for row in _metric_rows({f"predicted.{metric}": float(point["cost"]), "predicted.loss_increase": float(point["predicted_loss"])}, step=i, timestamp=now)
        ]
        from autoprune import plots

        study = self._study
        assert study is not None
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write_json(folder / "predicted_front.json", list(points))
            # the ladder's plot, its first front only until the search and final training add theirs
            plots.ladder_png(points, [], [], folder / "ladder_fronts.png", objectives=study.metric_names, cost=metric, title=f"{self.study_name}: predicted front")
            client.log_artifacts(parent, str(folder))
        self._log(parent, metric_rows=rows)

    @_guarded
    def log_final(self, number: int, *, metrics: Mapping[str, float], model: Any = None, example: Any = None, files: Sequence[Path] = ()) -> None:
        """A trial's final training (rung 3) in its run: ``final.*`` metrics, its files, and the kept model as
        an MLflow model (pytorch flavour) of that run, which ``mlflow.pytorch.load_model`` loads back."""
        client, _ = self._require_started()
        child = self._child(number)
        if child is None:
            return
        self._log(child.run_id, metrics={f"final.{k}": float(v) for k, v in metrics.items()})
        for path in files:
            client.log_artifact(child.run_id, str(path), artifact_path="final")
        if model is not None:
            _log_torch_model(self.tracking_uri, child.run_id, model, example)

    @_guarded
    def log_ladder(self, *, predicted: Sequence[Mapping[str, Any]], proxy: Sequence[FrontRow], final: Sequence[FrontRow], metric: str) -> None:
        """The predicted (rung 0), proxy (rung 2) and final (rung 3) fronts on one plot in the parent run."""
        from autoprune import plots

        client, parent = self._require_started()
        study = self._study
        assert study is not None
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            plots.ladder_png(
                predicted, [dict(r.metrics) for r in proxy], [dict(r.metrics) for r in final], folder / "ladder_fronts.png",
                objectives=study.metric_names, cost=metric, base=_base_point(study.base), title=f"{self.study_name}: predicted, proxy and final fronts",
            )
            _write_json(folder / "final_front.json", [self._front_json(r, study.metric_names) for r in final])
            client.log_artifacts(parent, str(folder))

    # -- the base model -------------------------------------------------------------------------------
    @_guarded
    def log_signals(self, signals: Mapping[str, Any]) -> None:
        """Training-time S/N, noise and ESN_a of the base model per epoch (step = epoch) and their plot; once
        per parent run (a resumed search's parent has them)."""
        from autoprune import plots

        client, parent = self._require_started()
        if any(name.startswith("signals.") for name in self._parent_metrics):
            return
        with tempfile.TemporaryDirectory() as tmp:
            # the plot first: the metrics are what says the signals are logged
            folder = Path(tmp)
            _write_json(folder / "signals.json", signals)
            plots.signals_png(signals, folder / "signals.png")
            client.log_artifacts(parent, str(folder))
        epochs = [int(e) for e in signals["epochs"]]
        series: dict[str, Sequence[float]] = {}
        for layer, curves in signals.get("layers", {}).items():
            series.update({f"signals.{layer}.{name}": values for name, values in curves.items()})
        series.update({f"signals.total.{name}": values for name, values in signals.get("total", {}).items()})
        if signals.get("val_accuracy"):
            series["signals.val_accuracy"] = signals["val_accuracy"]
        now = _ms(None)
        rows = [row for i, epoch in enumerate(epochs) for row in _metric_rows({k: v[i] for k, v in series.items() if i < len(v)}, step=epoch, timestamp=now)]
        self._log(parent, metric_rows=rows)

    @_guarded
    def close(self, *, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, FAILED (the search raised) or KILLED (interrupted)."""
        client, parent = self._require_started()
        self._flush_progress()
        latest = self._latest
        if latest is not None and (_drawing(latest) != self._drawn_key or not self._drawn_in_full):
            self._draw(latest, in_full=True)
        client.set_terminated(parent, status=status)


def _log_torch_model(tracking_uri: str, run_id: str, model: Any, example: Any) -> str:
    """The model as an MLflow model of the run (pytorch flavour, pickled: loading it needs autoprune), with the
    signature of the example and the model's output on it; its URI. Requirements are given, not inferred (an
    inference imports and times every package, about 15 s)."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    signature = None
    if example is not None:
        inputs = np.asarray(example, dtype=np.float32)
        with torch.no_grad():
            signature = infer_signature(inputs, model(torch.from_numpy(inputs)).numpy())
    # its warning that pickles run code when loaded, once per model: the model is the user's own, saved by them
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with fluent_store(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name="final_model", signature=signature, serialization_format="pickle", pip_requirements=["torch", "autoprune"])
    finally:
        quiet.setLevel(level)
    return info.model_uri


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


def _values_text(row: FrontRow, metric_names: Sequence[str]) -> str:
    return ", ".join(f"{m} {v:.4g}" for m, v in zip(metric_names, row.values))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


def _write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))


__all__ = ["Tracker", "flatten", "TRIAL_TAG", "PARENT_TAG", "FAILURE_TAG", "FAILED_REASON", "PARETO_TAG", "RANK_TAG"]
