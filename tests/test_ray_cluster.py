"""A 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), searched through ``--address``:
trials run on both nodes, one node is removed mid-search, and every trial of the budget is accounted for
(complete, or failed with its reason and counted), none left running. Marked e2e."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from cli_support import PATIENCE, _no_leftover_processes, autoprune, storage_of, tracking_of, wait_for  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.e2e
BUDGET = 8
# Trials of a few seconds, so that the removed node is in the middle of one.
SPACE = "layers: {_default: {w_bits: {choices: [4, 8]}}}\npolicy: {finetune_steps: 300}\n"


@pytest.fixture
def cluster() -> Iterator[object]:
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    try:
        yield nodes
    finally:
        nodes.shutdown()


def test_a_two_node_cluster_loses_a_node_and_accounts_for_every_trial(tmp_path: Path, cluster: object) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    args = [
        "search", "--executor", "ray", "--address", cluster.address, "--space", str(tmp_path / "space.yaml"), "--trials", str(BUDGET),
        "--study", "s", "--no-priors", "--storage", storage_of(tmp_path), "--tracking-uri", tracking_of(tmp_path), "--quiet", "--workers", "2",
    ]
    driver = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = cluster.list_all_nodes()[1]
    second_id = f"ray:{second.node_id}"

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="s", storage=storage_of(tmp_path)).trials
        except KeyError:
            return []

    def ran_on_both() -> bool:
        workers = {t.user_attrs.get("worker") for t in trials() if t.state == TrialState.COMPLETE}
        return second_id in workers and len(workers - {None}) >= 2

    wait_for("complete trials on both nodes", ran_on_both, driver)
    wait_for("a running trial", lambda: any(t.state == TrialState.RUNNING for t in trials()), driver)
    cluster.remove_node(second)
    _, err = driver.communicate(timeout=PATIENCE)
    assert driver.returncode == 0, err.decode()[-2000:]

    final = trials()
    assert not [t.number for t in final if t.state == TrialState.RUNNING], "a trial was left running"
    counted = [t for t in final if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
    assert len(counted) == BUDGET
    for trial in final:
        if trial.state == TrialState.FAIL:
            assert trial.user_attrs.get("failure"), f"trial {trial.number} failed without a reason"
        else:
            assert trial.user_attrs.get("metrics") and trial.user_attrs.get("worker")
