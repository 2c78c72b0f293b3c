"""The quality-retained arithmetic the shadow evaluation and the replays share: Wilson intervals and the floor rule."""

from __future__ import annotations

import random

import pytest

from proxy.services.quality import floor_breached, quality_retained, wilson_interval


def test_wilson_interval_matches_the_published_values():
    # Reference values (Newcombe 1998, table I; Wilson score without continuity correction).
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_wilson_interval_with_no_samples_knows_nothing_and_rejects_impossible_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for successes, n in ((3, 2), (-1, 5), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(successes, n)


def test_wilson_interval_covers_the_true_share_about_95_percent_of_the_time():
    rng = random.Random(7)
    p, n, trials = 0.9, 60, 4000
    covered = 0
    for _ in range(trials):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = wilson_interval(k, n)
        covered += lo <= p <= hi
    assert 0.93 <= covered / trials <= 0.97


def test_quality_retained_counts_ties_as_kept():
    q = quality_retained(wins=10, ties=70, losses=20)
    assert (q.n, q.share) == (100, 0.8)
    assert q.low < 0.8 < q.high
    assert quality_retained(0, 0, 0).share == 1.0
    with pytest.raises(ValueError):
        quality_retained(-1, 0, 0)


def test_floor_stops_only_with_enough_samples_and_the_whole_interval_below():
    bad = quality_retained(wins=5, ties=70, losses=25)  # 75% kept, interval ~[0.66, 0.82]
    assert floor_breached(bad, min_quality=0.93, min_samples=30)
    assert not floor_breached(bad, min_quality=0.93, min_samples=200)  # too few judged pairs yet
    assert not floor_breached(bad, min_quality=0.80, min_samples=30)  # the interval still reaches the floor
    few = quality_retained(wins=0, ties=4, losses=1)  # 80% kept on 5 pairs: the interval reaches 0.96
    assert not floor_breached(few, min_quality=0.93, min_samples=5)
