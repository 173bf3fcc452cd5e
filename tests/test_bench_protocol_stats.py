"""The protocol's statistics on inputs whose answers are known by hand (Student-t table values)."""
import math

import pytest

pytest.importorskip("scipy")

from bench.protocol_stats import (mean_sd, paired_diff_ci, params_ratio, plateau_step,  # noqa: E402
                                  t_quantile, within)


def test_t_quantile_matches_the_printed_table():
    # two-sided 95%: t(0.975; 1) = 12.706, t(0.975; 2) = 4.303, t(0.975; 4) = 2.776, t(0.975; 30) = 2.042
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        mean_sd([])


def test_paired_ci_known_values():
    # differences 1, 2, 3: mean 2, sd 1, half-width 4.3027 / sqrt(3) = 2.48414
    ref = {0: 10.0, 1: 20.0, 2: 30.0}
    got = paired_diff_ci({0: 11.0, 1: 22.0, 2: 33.0}, ref)
    assert got.mean == pytest.approx(2.0) and got.n == 3 and got.seeds == [0, 1, 2]
    assert got.lo == pytest.approx(2.0 - 2.48414, abs=1e-4) and got.hi == pytest.approx(2.0 + 2.48414, abs=1e-4)
    # five seeds of accuracies, differences .01 .. .05: mean .03, sd .0158114, half 2.77645·.0158114/√5 = .019632
    a = {s: 0.7 + 0.01 * (s + 1) for s in range(5)}
    b = {s: 0.7 for s in range(5)}
    got = paired_diff_ci(a, b)
    assert (got.lo, got.mean, got.hi) == pytest.approx((0.03 - 0.019632, 0.03, 0.03 + 0.019632), abs=1e-5)
    # a 90% interval is narrower than the 95% one: t(0.95; 4) = 2.132
    narrow = paired_diff_ci(a, b, conf=0.90)
    assert narrow.hi - narrow.mean == pytest.approx(2.132 * 0.0158114 / math.sqrt(5), abs=1e-5)


def test_paired_ci_pairs_by_seed_not_by_position():
    # the same accuracies listed in another seed order; unpaired seeds (3 only in one) are left out
    m = {2: 0.80, 0: 0.70, 1: 0.75, 3: 0.10}
    r = {0: 0.69, 1: 0.74, 2: 0.79}
    got = paired_diff_ci(m, r)
    assert got.seeds == [0, 1, 2] and got.mean == pytest.approx(0.01)
    assert got.hi - got.lo == pytest.approx(0.0, abs=1e-12)    # constant difference: zero-width interval


def test_paired_ci_edge_cases():
    one = paired_diff_ci({0: 0.8}, {0: 0.7})
    assert one.mean == pytest.approx(0.1) and one.lo == -math.inf and one.hi == math.inf
    with pytest.raises(ValueError, match="share no seed"):
        paired_diff_ci({0: 0.8}, {1: 0.7})
    with pytest.raises(ValueError, match="conf"):
        paired_diff_ci({0: 0.8}, {0: 0.7}, conf=1.5)


def test_params_ratio_and_tolerance():
    assert params_ratio(102, 100) == pytest.approx(1.02) and within(1.02) and within(0.98)
    assert not within(params_ratio(103, 100)) and not within(0.97)
    with pytest.raises(ValueError):
        params_ratio(1, 0)


def test_plateau_step():
    steps = [10, 20, 30, 40, 50]
    assert plateau_step(steps, [0.5, 0.7, 0.795, 0.80, 0.798]) == 30
    assert plateau_step(steps, [0.5, 0.81, 0.6, 0.80, 0.805]) == 40    # a dip later resets the plateau
    assert plateau_step(steps, [0.5, 0.9, 0.8, 0.7, 0.6]) is None      # still falling: not flat
    with pytest.raises(ValueError):
        plateau_step([1, 2], [0.5])
