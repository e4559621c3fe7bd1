"""The study's record and the incremental front: typed round trips, ranks equal to a full re-ranking,
and the layering rules (only record.py touches user attributes, tracking never imports the search)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.search.front import Front, Ranking
from autoprune.search.pareto import hypervolume, nondomination_ranks, pareto_ranks
from autoprune.search.record import StudyMeta, TrialRecord, read_meta, read_trial, write_meta, write_trial

REPO = Path(__file__).resolve().parent.parent
BASE = {"val_accuracy": 90.0, "test_accuracy": 89.0, "cost": {"bops": 1e9, "macs": 1e7, "memory_mb": 1.0}}
OBJECTIVES = {"objectives": [{"metric": "accuracy", "direction": "maximize"}, {"metric": "bops", "direction": "minimize"}], "constraints": []}


def new_study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    write_meta(study, StudyMeta(task={"model": "digits_cnn"}, space={}, objectives=OBJECTIVES, budget=10, base=BASE))
    return study


def test_trial_record_round_trips_and_defaults_fill_old_trials() -> None:
    study = new_study()
    trial = study.ask()
    write_trial(study, trial, owner="host:1", policy={"layers": {}}, prior="snr:kappa=1", strategy="prior")
    write_trial(study, trial, metrics={"accuracy": 80.0, "bops": float("inf")}, constraints=[-1.0])
    frozen = study.tell(trial, [80.0, 1e6])
    record = read_trial(frozen)
    assert record == TrialRecord(owner="host:1", policy={"layers": {}}, prior="snr:kappa=1", strategy="prior", metrics={"accuracy": 80.0, "bops": float("inf")}, constraints=[-1.0])
    assert record.feasible and record.fidelity == 1.0 and not record.interrupted and record.metric_interval == {}
    with pytest.raises(TypeError):
        write_trial(study, trial, colour="red")
    with pytest.raises(ValueError):
        write_trial(study, study.ask(), interrupted="sometimes")


def test_study_meta_reads_the_parent_run_that_older_studies_kept_apart() -> None:
    study = new_study()
    study.set_user_attr("mlflow_parent_run_id", "abc")
    meta = read_meta(study)
    assert meta.mlflow_parent_run_id == "abc" and meta.base.reference()["accuracy"] == 90.0
    assert read_meta(optuna.create_study()) is None


def test_incremental_ranks_equal_a_full_reranking() -> None:
    rng = random.Random(0)
    ranking = Ranking()
    points: list[tuple[float, float]] = []
    for i in range(300):
        # coarse values make ties and duplicates, the hard cases of domination
        point = (float(rng.randint(0, 20)), float(rng.randint(0, 20)))
        points.append(point)
        ranking.add(i, point)
        if i % 37 == 0 or i == 299:
            assert [ranking.rank[j] for j in range(len(points))] == nondomination_ranks(points, ["minimize", "minimize"])


def test_front_snapshot_matches_the_study() -> None:
    study = new_study()
    front = Front(study, read_meta(study))
    rng = random.Random(1)
    for _ in range(40):
        trial = study.ask()
        accuracy, bops = rng.uniform(50, 90), 10 ** rng.uniform(6, 9)
        if rng.random() < 0.1:
            write_trial(study, trial, failure="RuntimeError: boom")
            snapshot = front.add(study.tell(trial, state=TrialState.FAIL))
            continue
        write_trial(study, trial, metrics={"accuracy": accuracy, "bops": bops}, policy={"layers": {}}, constraints=[])
        snapshot = front.add(study.tell(trial, [accuracy, bops]))
    assert dict(snapshot.ranks) == pareto_ranks(study)
    assert snapshot.hypervolume == pytest.approx(hypervolume(study), rel=1e-12)
    assert snapshot.complete + snapshot.failed == 40
    assert set(snapshot.front) == {n for n, r in pareto_ranks(study).items() if r == 0}


def test_only_the_record_touches_user_attributes_and_tracking_never_imports_the_search() -> None:
    sources = {p: p.read_text() for p in (REPO / "autoprune").rglob("*.py")}
    touching = sorted(str(p.relative_to(REPO)) for p, text in sources.items() if "user_attrs" in text)
    assert touching == ["autoprune/search/record.py"]
    mlflow_importers = sorted(str(p.relative_to(REPO)) for p, text in sources.items() if re.search(r"^\s*(from|import) mlflow", text, re.M))
    assert all(p.startswith("autoprune/tracking/") for p in mlflow_importers), mlflow_importers
    for path, text in sources.items():
        if "tracking" in path.parts:
            assert "autoprune.search" not in text, path
    code = "import sys, autoprune.tracking; print(any(m.startswith('autoprune.search') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
