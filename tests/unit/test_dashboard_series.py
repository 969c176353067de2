"""What the dashboard's charts and jobs list show, worked out from the store's rows."""

from __future__ import annotations

import datetime as dt

from mljobs.server.dashboard import _durations, pool_use_series


def T(minute: int, naive: bool = False) -> dt.datetime:
    """3:00 UTC plus ``minute`` minutes (naive, as SQLite gives a time back, when asked)."""
    return dt.datetime(2026, 12, 7, 3, tzinfo=None if naive else dt.timezone.utc) + dt.timedelta(minutes=minute)


def test_pool_use_is_a_step_series_in_all_and_per_user():
    use = pool_use_series([("alice", T(0), T(30)), ("bob", T(10), None), ("alice", T(20), T(30)),
                           ("carol", T(0), T(1))], since=T(5), now=T(40))
    # alice's first instance runs since before the window: it counts from the window's start;
    # carol's ended before it: not shown at all; both of alice's end at one time: one point
    assert use["times"] == [T(m).timestamp() for m in (5, 10, 20, 30, 40)]
    assert use["series"] == {"all": [1, 2, 3, 1, 1], "alice": [1, 1, 2, 0, 0], "bob": [0, 1, 1, 1, 1]}


def test_pool_use_of_an_idle_pool_is_zero_across_the_window():
    assert pool_use_series([], T(0), T(60)) == {"times": [T(0).timestamp(), T(60).timestamp()],
                                                "series": {"all": [0, 0]}}


def test_durations_queued_and_ran_from_the_store_times_naive_or_not():
    now = dt.datetime(2026, 12, 7, 4, 0, tzinfo=dt.timezone.utc)
    running = {"created_time": T(0, naive=True), "started_time": T(0, naive=True) + dt.timedelta(seconds=5),
               "completed_time": None}
    assert _durations(running, now) == ("5.0s", "59m 55s")
    queued = {"created_time": T(30), "started_time": None, "completed_time": None}
    assert _durations(queued, now) == ("30m 00s", "")
    cancelled_in_queue = {"created_time": T(30), "started_time": None, "completed_time": T(31)}
    assert _durations(cancelled_in_queue, now) == ("1m 00s", "")
