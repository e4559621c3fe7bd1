"""Confidence intervals against values computed by hand."""

import math

import pytest

from autoprune.errors import AutopruneError
from autoprune.intervals import bootstrap, mean_spread, wilson


def test_wilson_95_of_100_by_hand():
    # z = 1.959964, z^2 = 3.841459; center = (0.95 + 0.0192073) / 1.0384146 = 0.933353;
    # half = 1.959964 / 1.0384146 * sqrt(0.000475 + 0.0000960365) = 1.887456 * 0.0238963 = 0.045103
    low, high = wilson(95.0, 100)
    assert low == pytest.approx(88.825, abs=0.005)
    assert high == pytest.approx(97.846, abs=0.005)


def test_wilson_ends_stay_inside_and_shrink_with_n():
    low, high = wilson(100.0, 50)
    assert high == 100.0 and low == pytest.approx(100 * 50 / (50 + 1.959964**2), abs=1e-3)  # p=1: low = n / (n + z^2)
    assert wilson(0.0, 50)[0] == 0.0
    width = lambda n: (lambda lo, hi: hi - lo)(*wilson(90.0, n))  # noqa: E731
    assert width(2000) < width(360) < width(100)
    # at large n it approaches the normal half-width z sqrt(p(1-p)/n)
    assert width(2000) / 2 == pytest.approx(100 * 1.959964 * math.sqrt(0.09 / 2000), rel=0.01)


def test_bootstrap_brackets_the_mean_and_is_seeded():
    values = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05
    low, high = bootstrap(values)
    assert low < 0.5 < high
    assert (high - low) == pytest.approx(2 * 1.96 * 0.05, rel=0.15)
    assert bootstrap(values) == (low, high)


def test_mean_spread():
    assert mean_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_spread([4.0]) == (4.0, 0.0)


@pytest.mark.parametrize("call", [lambda: wilson(95, 0), lambda: wilson(101, 10), lambda: wilson(50, 10, confidence=1.0), lambda: bootstrap([1.0])])
def test_bad_input(call):
    with pytest.raises(AutopruneError):
        call()
