"""Schedule ticks: cron in a time zone across daylight-saving changes, intervals, start/end, bad input."""

from __future__ import annotations

import datetime as dt

import pytest

from mljobs.errors import InvalidArgumentError
from mljobs.server.schedules import check_cron, parse_every, tick_after

UTC = dt.timezone.utc


def _row(**kw):
    row = {"cron": None, "every_s": None, "timezone": "UTC", "start_at": None, "end_at": None,
           "created_time": dt.datetime(2026, 1, 1, tzinfo=UTC)}
    row.update(kw)
    return row


def test_every_counts_from_the_start_and_never_repeats_a_tick():
    row = _row(every_s=30.0)
    t = dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
    ticks = []
    for _ in range(4):
        t = tick_after(row, t)
        ticks.append(t)
    assert ticks == [dt.datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in (30,)] + [
        dt.datetime(2026, 1, 1, 0, 1, s, tzinfo=UTC) for s in (0, 30)] + [dt.datetime(2026, 1, 1, 0, 2, tzinfo=UTC)]
    # a tick is strictly after the time asked about
    assert tick_after(row, ticks[0]) == ticks[1]


def test_cron_follows_the_zone_across_daylight_saving_changes():
    berlin = _row(cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29: 02:30 does not exist in Berlin (clocks jump 02:00 -> 03:00): the tick comes at 03:00 CEST
    t = tick_after(berlin, dt.datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert t == dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    # the next day 02:30 CEST is 00:30 UTC (it was 01:30 UTC in winter)
    assert tick_after(berlin, t) == dt.datetime(2026, 3, 30, 0, 30, tzinfo=UTC)
    assert tick_after(berlin, dt.datetime(2026, 1, 10, tzinfo=UTC)) == dt.datetime(2026, 1, 10, 1, 30, tzinfo=UTC)
    # hourly across the autumn change: 02:00 comes twice (CEST then CET), each one tick, an hour apart
    hourly = _row(cron="0 * * * *", timezone="Europe/Berlin")
    t = dt.datetime(2026, 10, 24, 23, 30, tzinfo=UTC)
    seen = []
    for _ in range(3):
        t = tick_after(hourly, t)
        seen.append(t)
    assert [b - a for a, b in zip(seen, seen[1:])] == [dt.timedelta(hours=1)] * 2


def test_start_and_end_bound_the_ticks():
    start = dt.datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC)
    row = _row(every_s=60.0, start_at=start, end_at=start + dt.timedelta(minutes=2))
    assert tick_after(row, dt.datetime(2026, 1, 1, tzinfo=UTC)) == start
    assert tick_after(row, start) == start + dt.timedelta(minutes=1)
    assert tick_after(row, start + dt.timedelta(minutes=2)) is None
    cron = _row(cron="0 0 * * *", start_at=start)
    assert tick_after(cron, dt.datetime(2026, 1, 1, tzinfo=UTC)) == dt.datetime(2026, 6, 2, tzinfo=UTC)


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1.5s", 1.5),
                                          (" 10 min ", 600)])
def test_every_parses(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text,words", [("0.5s", "under 1 s"), ("10", "a number and a unit"),
                                        ("fast", "a number and a unit"), ("", "a number and a unit")])
def test_bad_intervals_are_named(text, words):
    with pytest.raises(InvalidArgumentError, match=words):
        parse_every(text)


@pytest.mark.parametrize("expr", ["61 * * * *", "* * *", "0 3 * * * *", "every day", ""])
def test_bad_cron_is_named_with_an_example(expr):
    with pytest.raises(InvalidArgumentError, match="5-field cron expression.*0 3 \\* \\* \\*"):
        check_cron(expr)


def test_cron_is_normalized():
    assert check_cron("  */15   * * * * ") == "*/15 * * * *"
