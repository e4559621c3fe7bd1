"""Pareto fronts, non-domination ranks and hypervolume of a study, feasible complete trials only.

Hypervolume is computed in a normalised space so that numbers compare across runs of one task:
accuracy becomes ``1 - accuracy/100``; a cost is read on a log scale over four decades,
``1 + log10(cost / float-model cost) / 4`` clipped to [0, 1] (compression spans orders of magnitude:
on a linear scale 100x and 1000x would look the same); a maximised ratio uses ``base / value`` the same
way. The reference point is 1 in every axis: the float model's cost at 0% accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.search.objectives import METRICS, ObjectiveSpec
from autoprune.search.record import FinalRecord, current_finals, read_meta, read_trial


def feasible(trial: FrozenTrial) -> bool:
    """Constraint violations are stored by the runner on every trial, whatever the sampler (<= 0 is feasible)."""
    return read_trial(trial).feasible


def scored_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values is not None and feasible(t)]


def _as_losses(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return arr * signs


def nondomination_ranks(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Rank 0 is the front; rank r is the front once ranks < r are removed."""
    losses = _as_losses(values, directions)
    n = len(losses)
    ranks = [-1] * n
    remaining = set(range(n))
    rank = 0
    while remaining:
        idx = sorted(remaining)
        sub = losses[idx]
        for i, row in zip(idx, sub):
            dominated = np.any(np.all(sub <= row, axis=1) & np.any(sub < row, axis=1))
            if not dominated:
                ranks[i] = rank
        remaining -= {i for i in idx if ranks[i] == rank}
        rank += 1
    return ranks


def pareto_ranks(study: optuna.Study) -> dict[int, int]:
    trials = scored_trials(study)
    if not trials:
        return {}
    directions = [d.name.lower() for d in study.directions]
    ranks = nondomination_ranks([t.values for t in trials], directions)
    return {t.number: r for t, r in zip(trials, ranks)}


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    ranks = pareto_ranks(study)
    front = [t for t in scored_trials(study) if ranks.get(t.number) == 0]
    return sorted(front, key=lambda t: t.values[0], reverse=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE)


def final_front(study: optuna.Study, objectives: ObjectiveSpec, finals: Mapping[int, FinalRecord] | None = None) -> list[tuple[int, FinalRecord]]:
    """The front of the finally trained points (``search.finalize``; feasible means), best first objective first:
    those of the latest recipe (``record.current_finals``) unless ``finals`` are given."""
    finals = current_finals(study) if finals is None else finals
    return front_of_means(list(finals.items()), objectives)


def front_of_means(pairs: list[tuple[Any, Any]], objectives: ObjectiveSpec) -> list[tuple[Any, Any]]:
    """The nondominated feasible pairs (key, record with a ``mean`` of metrics over seeds or repeats), best first
    objective first: the front of final training and of confirmation alike."""
    kept = [(key, record) for key, record in pairs if all(v <= 0 for v in objectives.violations(record.mean))]
    if not kept:
        return []
    ranks = nondomination_ranks([objectives.values(record.mean) for _, record in kept], objectives.directions)
    front = [pair for pair, rank in zip(kept, ranks) if rank == 0]
    first = objectives.metrics[0]
    return sorted(front, key=lambda pair: pair[1].mean[first], reverse=objectives.directions[0] == "maximize")


COST_DECADES = 4.0


def _log_ratio_loss(ratio: float) -> float:
    return min(1.0, max(0.0, 1.0 + math.log10(max(ratio, 1e-30)) / COST_DECADES))


def normalised_losses(metrics: Mapping[str, float], spec: ObjectiveSpec, base: Mapping[str, float]) -> list[float]:
    losses = []
    for metric, direction in zip(spec.metrics, spec.directions):
        if metric in ("accuracy", "accuracy_drop"):
            losses.append(1.0 - float(metrics["accuracy"]) / 100.0)
        elif metric not in METRICS:
            # A task's own metric (or its drop) has no known scale: the loss is its drop relative to the base's size.
            name = metric.removesuffix("_drop") if metric.endswith("_drop") and metric not in base else metric
            drop = float(base[name]) - float(metrics[name])
            losses.append(min(1.0, max(0.0, drop / max(abs(float(base[name])), 1e-30))))
        elif direction == "minimize":
            losses.append(_log_ratio_loss(float(metrics[metric]) / max(float(base[metric]), 1e-30)))
        else:
            losses.append(_log_ratio_loss(float(base[metric]) / max(float(metrics[metric]), 1e-30)))
    return losses


def hypervolume_of(points: Sequence[Sequence[float]]) -> float:
    """Hypervolume of normalised losses against the reference point 1; points beyond it add nothing."""
    kept = [tuple(float(v) for v in p) for p in points if all(v < 1.0 for v in p)]
    return _slices(kept) if kept else 0.0


def _nondominated(points: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """The points no other point dominates (duplicates kept once): only they bound the volume."""
    unique = sorted(set(points))
    return [p for p in unique if not any(q != p and all(a <= b for a, b in zip(q, p)) for q in unique)]


def _slices(points: list[tuple[float, ...]]) -> float:
    """Exact volume dominated by ``points`` (losses, all below 1) up to the reference point 1, by slicing
    along the last objective (HSO): between two consecutive last-objective values the section is the
    hypervolume, one dimension down, of the points already passed. A front has tens of points and two to
    four objectives, so the quadratic sweep costs milliseconds; two objectives take one sweep."""
    if len(points[0]) == 2:  # the common case, a staircase: one sweep
        volume, lowest = 0.0, 1.0
        ordered = sorted(points)
        for i, (x, y) in enumerate(ordered):
            lowest = min(lowest, y)
            volume += ((ordered[i + 1][0] if i + 1 < len(ordered) else 1.0) - x) * (1.0 - lowest)
        return volume
    ordered = sorted(points, key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(ordered):
        upper = ordered[i + 1][-1] if i + 1 < len(ordered) else 1.0
        if upper > point[-1]:
            volume += (upper - point[-1]) * _slices(_nondominated([p[:-1] for p in ordered[: i + 1]]))
    return volume


def study_spec_and_base(study: optuna.Study) -> tuple[ObjectiveSpec, dict[str, Any]]:
    meta = read_meta(study)
    if meta is None or meta.base is None:
        raise AutopruneError("--study", study.study_name, "has no base model recorded (it was not created by autoprune search)")
    return ObjectiveSpec.from_dict(meta.objectives), meta.base.reference()


def hypervolume(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> float:
    spec, base = study_spec_and_base(study)
    chosen = scored_trials(study) if trials is None else [t for t in trials if t.state == TrialState.COMPLETE and feasible(t)]
    return hypervolume_of([normalised_losses(read_trial(t).metrics or {}, spec, base) for t in chosen])


def hypervolume_history(study: optuna.Study) -> list[float]:
    """Hypervolume after each trial number (failed trials repeat the previous value)."""
    spec, base = study_spec_and_base(study)
    history: list[float] = []
    points: list[list[float]] = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        record = read_trial(trial)
        if trial.state == TrialState.COMPLETE and record.feasible and record.metrics:
            points.append(normalised_losses(record.metrics, spec, base))
            history.append(hypervolume_of(points))
        else:
            history.append(history[-1] if history else 0.0)
    return history
