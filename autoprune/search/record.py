"""The study's record: what autoprune keeps in an Optuna study, typed and versioned.

``StudyMeta`` (one study user attribute, ``autoprune``) and ``TrialRecord`` (one user attribute per
field, so a trial's owner and policy are visible while it runs and optuna-dashboard shows each field)
are the only schema; ``read_meta``/``write_meta`` and ``read_trial``/``write_trial`` are the only code
that touches Optuna's user attributes, and ``update_meta`` the way to change fields of a study that other
processes may be changing too. A field added here is read back as its default from studies
written before it, so old studies keep loading.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

META_KEY = "autoprune"
RECORD_VERSION = 1
# the samplers a study may be created with (study.make_sampler builds them)
SAMPLERS = ("tpe", "nsga2", "random", "qmc")


class BaseSummary(BaseModel):
    """The float base model the study compresses: its accuracy and its cost, the reference of every ratio."""

    model_config = ConfigDict(extra="allow")
    # the task's metric (``val_accuracy`` holds its value, whatever its name: accuracy, miou, neg_mse...)
    metric: str = "accuracy"
    val_accuracy: float
    test_accuracy: float | None = None
    train_seconds: float | None = None
    cost: dict[str, float]
    performance_density: float = 1.0
    # where the S/N record behind the priors came from: {"source": "training" | "finetune" | "none", ...}
    priors: dict[str, Any] | None = None

    def reference(self) -> dict[str, float]:
        """Metric -> the base model's value, as hypervolume and knee normalise against it."""
        return {**self.cost, self.metric: self.val_accuracy, "performance_density": self.performance_density}


class StudyMeta(BaseModel):
    """What a study was created with, so a worker or a resume rebuilds the same search from the study alone."""

    model_config = ConfigDict(extra="ignore")
    version: int = RECORD_VERSION
    task: dict[str, Any]
    space: dict[str, Any]
    objectives: dict[str, Any]
    budget: int
    sampler: str = "tpe"
    seed: int = 0
    base: BaseSummary | None = None
    prior_bits: dict[str, int] | None = None
    # multi-fidelity trials (search.fidelity.FidelitySpec as a mapping); None: every trial at full fidelity
    fidelity: dict[str, Any] | None = None
    mlflow_parent_run_id: str | None = None
    # the fidelity ladder (search.ladder): a trial's post-training result decides whether it is fine-tuned
    ladder: bool = False
    # rung 0: the integer program's predicted front, one point per cost budget (search.ladder.PredictedPoint)
    predicted: list[dict[str, Any]] | None = None
    # rung 3: the steps of the latest final training; the final front holds only points trained for as many
    # (None: a study finalized before this was recorded, whose records are all read)
    final_steps: int | None = None

    def identity(self) -> dict[str, Any]:
        """The fields a resumed search must repeat exactly."""
        return {"task": self.task, "space": self.space, "objectives": self.objectives}


Strategy = Literal["sampled", "prior"]


class Confirmation(BaseModel):
    """A front candidate re-run with several fine-tuning seeds (Policy.seed): per metric, the mean and
    the sample standard deviation over the seeds; the confirmed front is recomputed from the means."""

    model_config = ConfigDict(extra="ignore")
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]


class TrialRecord(BaseModel):
    """One trial as autoprune records it. ``failure`` set and ``interrupted`` false: the policy's fault
    (counts toward the budget); ``interrupted``: cut short (Ctrl-C, a dead process), run again on resume."""

    model_config = ConfigDict(extra="ignore")
    version: int = RECORD_VERSION
    owner: str | None = None
    # where the evaluation ran when not in the owner's process: ``ray:<node id>`` of a Ray node
    worker: str | None = None
    # how the trial got its policy: "sampled", "prior" (enqueued) or a learned strategy ("djpq", "two_stage")
    strategy: str = "sampled"
    # a learned strategy's run config (DJPQConfig, seed included) and the file of the model it learned
    learn: dict[str, Any] | None = None
    artifact: str | None = None
    # the prior's name and settings as tagged in MLflow, e.g. "snr:kappa=1"
    prior: str | None = None
    policy: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    layers: dict[str, dict[str, Any]] | None = None
    constraints: list[float] | None = None
    failure: str | None = None
    interrupted: bool = False
    # fraction of the full evaluation the metrics come from (1: full fine-tuning), for multi-fidelity
    fidelity: float = 1.0
    # a promoted multi-fidelity trial's metrics after the short fine-tune (``metrics`` holds the full one's)
    low_metrics: dict[str, float] | None = None
    # fine-tune steps the trial spent (low + full fidelity), what a multi-fidelity budget counts
    steps: int = 0
    # metric -> (low, high) 95% confidence interval, when the evaluator estimates one (autoprune.intervals)
    metric_interval: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # validation samples the metric was scored on (the interval's n)
    val_samples: int | None = None
    # the fidelity ladder: each rung's metrics ("post_training", "finetune"), the highest rung the told values
    # come from, and the checksum of that rung's weights, which final training starts from (search.ladder)
    rungs: dict[str, dict[str, float]] = Field(default_factory=dict)
    rung: str | None = None
    checksum: str | None = None

    @property
    def feasible(self) -> bool:
        return self.constraints is None or all(c <= 0 for c in self.constraints)


_LEGACY_PARENT_ATTR = "mlflow_parent_run_id"


def read_meta(study: "optuna.Study") -> StudyMeta | None:
    """The study's metadata; None for a study autoprune did not create."""
    attrs = study.user_attrs
    raw = attrs.get(META_KEY)
    if raw is None:
        return None
    if "mlflow_parent_run_id" not in raw and _LEGACY_PARENT_ATTR in attrs:
        raw = {**raw, "mlflow_parent_run_id": attrs[_LEGACY_PARENT_ATTR]}
    return StudyMeta.model_validate(raw)


def write_meta(study: "optuna.Study", meta: StudyMeta) -> None:
    study.set_user_attr(META_KEY, meta.model_dump(exclude_none=True))


def update_meta(study: "optuna.Study", **fields: Any) -> StudyMeta:
    """Set some fields of the study's metadata, read and written under one lock: processes of one study (a
    worker recording the MLflow parent run while a finalize records its steps) each change their own fields
    without writing back a copy that undoes another's."""
    from autoprune.processes import this_process

    with study_lock(study, "meta", owner=this_process()):
        meta = read_meta(study)
        assert meta is not None, "only a study created by autoprune search has metadata to update"
        updated = StudyMeta.model_validate(meta.model_copy(update=fields).model_dump())
        write_meta(study, updated)
        return updated


# TrialRecord fields stored as their own user attribute; defaults are not written.
_TRIAL_FIELDS = tuple(f for f in TrialRecord.model_fields if f != "version")


def read_trial(trial: "FrozenTrial | optuna.Trial") -> TrialRecord:
    attrs = trial.user_attrs
    return TrialRecord.model_validate({k: attrs[k] for k in _TRIAL_FIELDS if k in attrs})


def write_trial(study: "optuna.Study", trial: "optuna.Trial | FrozenTrial | int", **fields: Any) -> None:
    """Set some fields of a trial's record (validated, each its own user attribute). ``trial`` is a live
    trial, a FrozenTrial or a storage trial id."""
    unknown = set(fields) - set(_TRIAL_FIELDS)
    if unknown:
        raise TypeError(f"TrialRecord has no field {sorted(unknown)}")
    checked = TrialRecord.model_validate(fields).model_dump(include=set(fields))
    trial_id = trial if isinstance(trial, int) else trial._trial_id
    for key, value in checked.items():
        study._storage.set_trial_user_attr(trial_id, key, value)


def enqueue(study: "optuna.Study", params: dict[str, Any], **fields: Any) -> None:
    """Enqueue a point with its record fields (a prior's name and strategy) already set."""
    checked = TrialRecord.model_validate(fields).model_dump(include=set(fields))
    study.enqueue_trial(params, user_attrs=checked)


class FinalRecord(BaseModel):
    """A candidate's final training (rung 3, ``search.finalize``): the steps it continued its fine-tuned weights
    by, the seeds it ran with, per metric the mean, sample standard deviation and 95% interval over the
    seeds, the seed whose model is kept (best on validation) with its own metrics, the checksum of the weights
    it started from and of the kept model, and the kept model's file."""

    model_config = ConfigDict(extra="ignore")
    steps: int
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    interval: dict[str, tuple[float, float]] = Field(default_factory=dict)
    kept_seed: int
    kept: dict[str, float]
    start_checksum: str
    checksum: str
    weights: str | None = None


FINAL_KEY = "autoprune_final"


def read_finals(study: "optuna.Study") -> dict[int, FinalRecord]:
    """Trial number -> its final training, kept in a study attribute (finished trials take no new user attributes)."""
    raw = study.user_attrs.get(FINAL_KEY) or {}
    return {int(number): FinalRecord.model_validate(value) for number, value in raw.items()}


def write_finals(study: "optuna.Study", finals: dict[int, FinalRecord]) -> None:
    study.set_user_attr(FINAL_KEY, {str(n): f.model_dump() for n, f in sorted(finals.items())})


def current_finals(study: "optuna.Study") -> dict[int, FinalRecord]:
    """The final records of the study's latest final training recipe: points trained for another number of
    steps (an earlier finalize) are kept in the study but are not comparable, so no front mixes them."""
    meta = read_meta(study)
    steps = meta.final_steps if meta is not None else None
    return {n: f for n, f in read_finals(study).items() if steps is None or f.steps == steps}


LOCK_PREFIX = "autoprune_lock:"
# how long a process waits for a lock held by a process it cannot see (another host's) before taking it over
LOCK_STALE_SECONDS = 120.0


@contextmanager
def study_lock(study: "optuna.Study", name: str, *, owner: str) -> Iterator[None]:
    """Hold the study-wide lock ``name`` while the block runs: one process at a time, across processes and
    hosts, for work that reads the study and writes to it by what it read (enqueueing the priors).

    The lock is a study user attribute inserted only when absent, atomically in the database (its unique key:
    a second insert fails), and deleted at the end. A lock whose holder died on this host is taken over at
    once, one held from another host after LOCK_STALE_SECONDS. Storages without a database (in memory) serve
    one process, which needs no lock."""
    from autoprune.processes import owner_alive

    key = f"{LOCK_PREFIX}{name}"
    engine = _engine(study)
    if engine is None:
        yield
        return
    waited_since = time.monotonic()
    while not _insert_attr(engine, study, key, owner):
        holder = _read_attr(engine, study, key)
        stale = holder is not None and (owner_alive(holder) is False or time.monotonic() - waited_since > LOCK_STALE_SECONDS)
        if stale:
            _delete_attr(engine, study, key, holder)
        time.sleep(0 if stale else 0.1)
    try:
        yield
    finally:
        _delete_attr(engine, study, key, owner)


def _engine(study: "optuna.Study") -> Any:
    # Optuna wraps its RDB storage in a cache; the study's own record is written through it elsewhere
    storage = getattr(study, "_storage", None)
    return getattr(getattr(storage, "_backend", storage), "engine", None)


def _attributes(engine: Any) -> Any:
    import sqlalchemy

    # Optuna's own table of study user attributes: unique per (study, key)
    return sqlalchemy.Table("study_user_attributes", sqlalchemy.MetaData(), autoload_with=engine)


def _insert_attr(engine: Any, study: "optuna.Study", key: str, owner: str) -> bool:
    import sqlalchemy

    table = _attributes(engine)
    try:
        with engine.begin() as connection:
            connection.execute(table.insert().values(study_id=study._study_id, key=key, value_json=json.dumps(owner)))
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def _read_attr(engine: Any, study: "optuna.Study", key: str) -> str | None:
    table = _attributes(engine)
    with engine.connect() as connection:
        value = connection.execute(table.select().with_only_columns(table.c.value_json).where(table.c.study_id == study._study_id, table.c.key == key)).scalar()
    return None if value is None else str(json.loads(value))


def _delete_attr(engine: Any, study: "optuna.Study", key: str, owner: str) -> None:
    table = _attributes(engine)
    with engine.begin() as connection:
        connection.execute(table.delete().where(table.c.study_id == study._study_id, table.c.key == key, table.c.value_json == json.dumps(owner)))


CONFIRM_KEY = "autoprune_confirmation"


def read_confirmations(study: "optuna.Study") -> dict[int, Confirmation]:
    """Trial number -> its confirmation re-runs. They live in a study attribute because Optuna refuses
    user attributes on a finished trial, and confirmation runs after the search."""
    raw = study.user_attrs.get(CONFIRM_KEY) or {}
    return {int(number): Confirmation.model_validate(value) for number, value in raw.items()}


def write_confirmations(study: "optuna.Study", confirmations: dict[int, Confirmation]) -> None:
    study.set_user_attr(CONFIRM_KEY, {str(n): c.model_dump() for n, c in sorted(confirmations.items())})


__all__ = [
    "StudyMeta", "TrialRecord", "BaseSummary", "Confirmation", "FinalRecord", "META_KEY", "SAMPLERS", "RECORD_VERSION",
    "read_meta", "write_meta", "update_meta", "read_confirmations", "write_confirmations", "read_finals", "write_finals", "current_finals", "read_trial", "write_trial", "enqueue",
    "study_lock",
]
