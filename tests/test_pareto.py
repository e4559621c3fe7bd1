from __future__ import annotations

import numpy as np
import pytest

from autoprune.search.pareto import hypervolume_of, nondomination_ranks


def test_ranks_by_hand() -> None:
    values = [[90, 10], [95, 20], [80, 30], [95, 5], [50, 50]]
    assert nondomination_ranks(values, ["maximize", "minimize"]) == [1, 1, 2, 0, 3]


def test_hypervolume_by_hand() -> None:
    # two boxes against reference (1, 1): 0.5*0.5 + 0.8*0.2 - 0.5*0.2 overlap
    assert hypervolume_of([[0.5, 0.5], [0.2, 0.8]]) == pytest.approx(0.31)
    assert hypervolume_of([[1.2, 0.1]]) == 0.0


def test_hypervolume_in_three_dimensions_by_hand() -> None:
    # a box 0.5^3 and a slab 1 x 1 x 0.1 overlapping in 0.5 x 0.5 x 0.1; the dominated point and the
    # duplicate add nothing
    points = [[0.5, 0.5, 0.5], [0.0, 0.0, 0.9], [0.6, 0.6, 0.6], [0.5, 0.5, 0.5]]
    assert hypervolume_of(points) == pytest.approx(0.125 + 0.1 - 0.025)


def _cells(points: list[list[float]]) -> float:
    """Brute force: every cell of the grid the coordinates draw, counted when a point dominates its corner."""
    import itertools

    kept = [p for p in points if all(v < 1.0 for v in p)]
    axes = [sorted({p[d] for p in kept} | {1.0}) for d in range(len(points[0]))]
    volume = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        corner = [axes[d][i] for d, i in enumerate(cell)]
        if any(all(q <= c for q, c in zip(p, corner)) for p in kept):
            volume += float(np.prod([axes[d][i + 1] - axes[d][i] for d, i in enumerate(cell)]))
    return volume


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_brute_force(dims: int) -> None:
    rng = np.random.default_rng(dims)
    for _ in range(5):
        points = rng.uniform(0.0, 1.1, size=(9, dims)).round(2).tolist()
        assert hypervolume_of(points) == pytest.approx(_cells(points), abs=1e-12)


def test_costs_count_in_decades() -> None:
    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.search.pareto import normalised_losses

    spec = ObjectiveSpec.from_dict({"objectives": [{"metric": "accuracy"}, {"metric": "bops"}]})
    base = {"bops": 1000.0}
    assert normalised_losses({"accuracy": 90.0, "bops": 10.0}, spec, base) == pytest.approx([0.1, 0.5])
    assert normalised_losses({"accuracy": 90.0, "bops": 0.001}, spec, base)[1] == 0.0
