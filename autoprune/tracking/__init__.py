"""MLflow tracking: the only package that imports mlflow, and only inside its functions.

``store`` says where MLflow's data lives, ``tracker`` mirrors a study into it from plain events and
front snapshots (``events``), ``ui`` serves the MLflow UI. Nothing here imports the search.
"""

from autoprune.tracking.events import FrontSnapshot, StudyInfo, TrialEvent
from autoprune.tracking.store import default_tracking_uri, resolve_store
from autoprune.tracking.tracker import FAILED_REASON, FAILURE_TAG, PARENT_TAG, PARETO_TAG, RANK_TAG, TRIAL_TAG, Tracker
from autoprune.tracking.ui import serve_ui

__all__ = [
    "Tracker", "StudyInfo", "TrialEvent", "FrontSnapshot", "default_tracking_uri", "resolve_store", "serve_ui",
    "FAILED_REASON", "FAILURE_TAG", "PARENT_TAG", "PARETO_TAG", "RANK_TAG", "TRIAL_TAG",
]
