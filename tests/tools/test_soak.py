"""The soak's memory verdict: a slope over each minute's floor, so a chunk's passing buffers are not a leak."""

from __future__ import annotations

import pytest

from radio.tools.soak import churn_floors, floor_samples, rss_slope


def test_passing_spikes_are_not_a_slope_but_a_rising_floor_is() -> None:
    flat = [(t, 500.0 + (120.0 if t % 60 == 30 else 0.0)) for t in range(0, 1800, 10)]  # a spike each minute
    for i in (-3, -9, -14):  # and more of them near the end
        flat[i] = (flat[i][0], 650.0)
    assert rss_slope(flat) > 5  # single samples see a slope that is not there
    assert rss_slope(floor_samples(flat)) == pytest.approx(0.0, abs=0.01)
    leak = [(t, 500.0 + 10.0 * t / 3600 + (120.0 if t % 60 == 30 else 0.0)) for t in range(0, 7200, 10)]
    assert rss_slope(floor_samples(leak)) == pytest.approx(10.0, rel=0.02)


def test_each_minute_keeps_its_lowest_sample() -> None:
    assert floor_samples([(0, 5.0), (10, 3.0), (59, 4.0), (60, 9.0), (70, 8.0)]) == [(10, 3.0), (70, 8.0)]


def test_a_minute_cut_short_has_no_floor() -> None:
    """The run's last sample alone in its minute (taken mid-chunk, 50 MB up) must not bend the slope: a 16-station
    run's verdict read +71 MB/h from flat floors because of it."""
    flat = [(t, 700.0 + (5.0 if t % 30 == 0 else 0.0)) for t in range(600, 1800, 10)] + [(1801, 795.0)]
    assert (1801, 795.0) not in floor_samples(flat)
    assert rss_slope(floor_samples(flat)) == pytest.approx(0.0, abs=0.01)


def test_churn_floors_split_the_minutes_by_whether_the_churned_station_is_on_air() -> None:
    """Step s (create, edit, delete, ...) runs at minute s + 1: gone in minutes 0, 3, 6, on air in 1, 2, 4, 5."""
    floors = [(m * 60.0 + 7, 600.0 + (0.0 if m % 3 == 0 else 9.0)) for m in range(12)]
    gone, on_air = churn_floors(floors)
    assert [int(t // 60) for t, _ in gone] == [0, 3, 6, 9]
    assert [int(t // 60) for t, _ in on_air] == [1, 2, 4, 5, 7, 8, 10, 11]
    assert {r for _, r in gone} == {600.0} and {r for _, r in on_air} == {609.0}
    assert rss_slope(gone) == pytest.approx(0.0, abs=0.01)
