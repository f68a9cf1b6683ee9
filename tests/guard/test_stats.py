import math

import numpy as np
import pytest

from enduro.guard.stats import MAX_POINTS, percentile, theil_sen


def test_a_perfect_line_gives_its_exact_slope_and_intercept() -> None:
    xs = [0.0, 2.0, 4.0, 6.0, 8.0]
    fit = theil_sen(xs, [3.0 + 1.5 * x for x in xs])
    assert fit is not None
    assert fit.slope == 1.5
    assert fit.intercept == 3.0
    assert (fit.low, fit.high) == (1.5, 1.5)
    assert fit.num_points == 5


def test_a_fifth_of_wild_outliers_does_not_move_the_slope() -> None:
    rng = np.random.default_rng(1)
    xs = np.arange(100.0)
    ys = 7.0 - 0.25 * xs
    wild = rng.choice(100, size=20, replace=False)
    ys[wild] = rng.uniform(-1e6, 1e6, size=20)
    fit = theil_sen(list(xs), list(ys))
    assert fit is not None
    # Pairs of good points (64 %) all have the true slope, more than either side of it.
    assert abs(fit.slope - -0.25) < 1e-9
    assert abs(fit.intercept - 7.0) < 1e-9


def test_mann_kendall_and_sen_interval_match_the_hand_computation() -> None:
    # y = 1 3 2 5 4 6 at x = 0..5. Signs of y_j - y_i for i < j, row by row:
    # 1: +5; 3: +3 -1; 2: +3; 5: -1 +1; 4: +1  ->  S = 5 + 2 + 3 + 0 + 1 = 11.
    # Var(S) = n(n-1)(2n+5)/18 = 6*5*17/18 = 28.33..., Z = (S - 1)/sqrt(Var) = 1.8787.
    # The 15 pairwise slopes sorted: -1 -1 1/3 .5 .5 .75 .75 1 1 1 1 4/3 2 2 3, median 1;
    # median(y - x) = median(1 2 0 2 0 1) = 1. Sen: C = 1.96 * sqrt(Var) = 10.43, ranks
    # round((15 - C)/2) = 2 and round((15 + C)/2) + 1 = 14: slopes -1 and 2.
    fit = theil_sen([0, 1, 2, 3, 4, 5], [1, 3, 2, 5, 4, 6])
    assert fit is not None
    assert fit.p_value == pytest.approx(math.erfc(10 / math.sqrt(510 / 18) / math.sqrt(2)))
    assert fit.p_value == pytest.approx(0.06029, abs=1e-5)
    assert (fit.slope, fit.intercept, fit.low, fit.high) == (1.0, 1.0, -1.0, 2.0)


def test_tied_values_shrink_the_variance() -> None:
    # y = 1 2 2 4 3: S = 4 + 2 + 2 - 1 = 7 (the tied pair counts zero); one tie of size 2:
    # Var(S) = (5*4*15 - 2*1*9)/18 = 282/18.
    fit = theil_sen([0, 1, 2, 3, 4], [1, 2, 2, 4, 3])
    assert fit is not None
    assert fit.p_value == pytest.approx(math.erfc(6 / math.sqrt(282 / 18) / math.sqrt(2)))


def test_a_clear_trend_is_significant_and_a_flat_series_is_not() -> None:
    rng = np.random.default_rng(7)
    xs = list(np.arange(60.0))
    rising = theil_sen(xs, list(0.5 * np.arange(60.0) + rng.normal(0, 1, 60)))
    flat = theil_sen(xs, list(rng.normal(0, 1, 60)))
    assert rising is not None and flat is not None
    assert rising.p_value < 1e-12
    assert flat.p_value > 0.2


def test_the_interval_holds_the_true_slope_and_narrows_with_more_points() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (20, 200):
        xs = np.arange(float(n))
        fit = theil_sen(list(xs), list(2.0 * xs + rng.normal(0, 5, n)))
        assert fit is not None
        assert fit.low < 2.0 < fit.high
        widths.append(fit.high - fit.low)
    assert widths[1] < widths[0] / 10


def test_long_series_are_thinned_to_max_points() -> None:
    xs = np.arange(1000.0)
    fit = theil_sen(list(xs), list(4.0 * xs + np.sin(xs)))
    assert fit is not None
    assert fit.num_points == MAX_POINTS
    assert fit.slope == pytest.approx(4.0, abs=1e-3)


def test_too_few_points_or_one_x_have_no_fit() -> None:
    assert theil_sen([1.0, 2.0], [1.0, 2.0]) is None
    assert theil_sen([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) is None
    with pytest.raises(ValueError):
        theil_sen([1.0, 2.0, 3.0], [1.0, 2.0])


def test_percentile_interpolates_linearly() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([10.0, 20.0], 25) == 12.5
    assert percentile([10.0, 20.0], 0) == 10.0
    assert percentile([10.0, 20.0], 100) == 20.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
