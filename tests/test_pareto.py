from __future__ import annotations

import pytest

from autoprune.search.pareto import hypervolume_of, nondomination_ranks


def test_ranks_by_hand() -> None:
    values = [[90, 10], [95, 20], [80, 30], [95, 5], [50, 50]]
    assert nondomination_ranks(values, ["maximize", "minimize"]) == [1, 1, 2, 0, 3]


def test_hypervolume_by_hand() -> None:
    # two boxes against reference (1, 1): 0.5*0.5 + 0.8*0.2 - 0.5*0.2 overlap
    assert hypervolume_of([[0.5, 0.5], [0.2, 0.8]]) == pytest.approx(0.31)
    assert hypervolume_of([[1.2, 0.1]]) == 0.0


def test_costs_count_in_decades() -> None:
    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.search.pareto import normalised_losses

    spec = ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}]})
    base = {"bops": 1000.0}
    assert normalised_losses({"accuracy": 90.0, "bops": 10.0}, spec, base) == pytest.approx([0.1, 0.5])
    assert normalised_losses({"accuracy": 90.0, "bops": 0.001}, spec, base)[1] == 0.0
