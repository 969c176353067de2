"""Schedules on a real server: ticks fire on time, once each (across kill -9 and restarts),
concurrency policies, catch-up, and bad input."""

from __future__ import annotations

import signal
import time

import pytest

import mljobs
from mljobs.errors import ConflictError, InvalidArgumentError, NotFoundError


def stamp(tag: str) -> str:
    return tag


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _runs(session, name: str) -> list[dict]:
    return session.request("GET", "/jobs", params={"limit": 0, "schedule": name}).json()


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_a_one_second_schedule_fires_once_a_second(server, session):
    defn = mljobs.MLJobDefinition.register(stamp, "DEFAULT_POOL", "SCHED", session=session)
    made = mljobs.create_schedule("EVERY_SECOND", defn, every="1s", args=("tick",), concurrency="allow",
                                  session=session)
    assert made["next_tick"] and made["definition"] == "STAMP"
    t0 = time.monotonic()
    time.sleep(5.0)
    mljobs.pause_schedule("every_second", session=session)
    elapsed = time.monotonic() - t0
    runs = _runs(session, "EVERY_SECOND")
    assert abs(len(runs) - elapsed) <= 1.5, (len(runs), elapsed)
    ticks = [r["scheduled_tick"] for r in runs]
    assert len(set(ticks)) == len(ticks), "a tick made two runs"
    for r in runs:
        job = mljobs.get_job(r["id"], session=session)
        assert job.result(timeout=60) == "tick"
        assert r["name"].startswith("EVERY_SECOND_") and r["schedule_name"] == "EVERY_SECOND"
    df = mljobs.list_schedules(session=session)
    assert bool(df.loc["EVERY_SECOND", "paused"]) and df.loc["EVERY_SECOND", "last_status"] in ("DONE", "RUNNING")
    jobs_df = mljobs.list_jobs(limit=0, session=session, schedule="EVERY_SECOND")
    assert len(jobs_df) == len(runs)
    fired = [e for e in mljobs.schedule_events("EVERY_SECOND", session=session) if e["kind"] == "fired"]
    assert len(fired) == len(runs)
    mljobs.drop_schedule("EVERY_SECOND", session=session)
    with pytest.raises(NotFoundError, match="schedule EVERY_SECOND does not exist"):
        mljobs.get_schedule("EVERY_SECOND", session=session)
    assert len(_runs(session, "EVERY_SECOND")) == len(runs)  # its runs stay


def test_forbid_skips_ticks_while_a_run_is_active_and_replace_cancels_it(lite):
    defn = mljobs.MLJobDefinition.register(nap, "DEFAULT_POOL", "SCHED", session=lite)
    mljobs.create_schedule("FORBID", defn, every="1s", args=(3.0,), session=lite)
    _wait_for(lambda: len(_runs(lite, "FORBID")) >= 2, 20, "a second run of FORBID")
    mljobs.pause_schedule("FORBID", session=lite)
    runs = _runs(lite, "FORBID")
    events = mljobs.schedule_events("FORBID", session=lite)
    skipped = [e for e in events if e["kind"] == "skipped"]
    assert skipped and all("concurrency=forbid" in e["message"] for e in skipped), events
    # never two runs at once: each run started after the one before had ended
    done = sorted((mljobs.get_job(r["id"], session=lite)._refresh() for r in runs), key=lambda r: r["created_time"])
    for a, b in zip(done, done[1:]):
        assert a["completed_time"] is not None and a["completed_time"] <= b["created_time"], (a, b)

    mljobs.create_schedule("REPLACE", defn, every="2s", args=(30.0,), concurrency="replace", session=lite)
    _wait_for(lambda: len(_runs(lite, "REPLACE")) >= 2, 20, "a second run of REPLACE")
    mljobs.pause_schedule("REPLACE", session=lite)
    first = sorted(_runs(lite, "REPLACE"), key=lambda r: r["scheduled_tick"])[0]
    assert mljobs.get_job(first["id"], session=lite).wait(30) == "CANCELLED"
    assert any(e["kind"] == "replaced" for e in mljobs.schedule_events("REPLACE", session=lite))
    for r in _runs(lite, "REPLACE"):
        mljobs.get_job(r["id"], session=lite).cancel()


def test_kill9_of_the_server_never_fires_a_tick_twice_and_skips_missed_ticks(sqlite_server):
    s = mljobs.Session(url=sqlite_server.url)
    defn = mljobs.MLJobDefinition.register(stamp, "DEFAULT_POOL", "SCHED", session=s)
    mljobs.create_schedule("SKIP", defn, every="1s", args=("s",), concurrency="allow", session=s)
    mljobs.create_schedule("CATCHUP", defn, every="1s", args=("c",), concurrency="allow", catchup=True, session=s)
    _wait_for(lambda: len(_runs(s, "SKIP")) >= 2 and len(_runs(s, "CATCHUP")) >= 2, 20, "two runs of each")
    sqlite_server.kill(signal.SIGKILL)
    down = time.monotonic()
    time.sleep(4.0)
    sqlite_server.start()
    s2 = mljobs.Session(url=sqlite_server.url)
    time.sleep(2.0)
    for name in ("SKIP", "CATCHUP"):
        mljobs.pause_schedule(name, session=s2)
    outage = time.monotonic() - down
    for name in ("SKIP", "CATCHUP"):
        ticks = sorted(r["scheduled_tick"] for r in _runs(s2, name))
        assert len(ticks) == len(set(ticks)), f"{name}: a tick made two runs"
    skip_events = mljobs.schedule_events("SKIP", session=s2)
    missed = [e for e in skip_events if e["kind"] == "skipped"]
    assert missed and "fell while no server ran" in missed[0]["message"], skip_events
    # with catchup every tick of the outage made a run: the ticks are one second apart, none missing
    import datetime as dt

    catch = sorted(dt.datetime.fromisoformat(r["scheduled_tick"]) for r in _runs(s2, "CATCHUP"))
    gaps = {round((b - a).total_seconds()) for a, b in zip(catch, catch[1:])}
    assert gaps == {1}, gaps
    # without catchup the outage left a gap: the last tick before the kill fell at most 1 s before
    # it, the first after it at least the 4 s of the pause later (a slow restart only widens it)
    skip = sorted(dt.datetime.fromisoformat(r["scheduled_tick"]) for r in _runs(s2, "SKIP"))
    assert max(round((b - a).total_seconds()) for a, b in zip(skip, skip[1:])) >= 3, (skip, outage)
    s2.close()
    s.close()


def test_bad_schedules_are_refused_and_change_nothing(lite):
    defn = mljobs.MLJobDefinition.register(stamp, "DEFAULT_POOL", "SCHED", session=lite)
    bad = [
        (dict(cron="61 * * * *"), "5-field cron expression"),
        (dict(every="0.5s"), "under 1 s"),
        (dict(every="soon"), "a number and a unit"),
        (dict(), "exactly one of cron"),
        (dict(cron="* * * * *", every="1m"), "exactly one of cron"),
        (dict(every="1m", timezone="Mars/Olympus"), "not a time zone"),
        (dict(every="1m", concurrency="sometimes"), "forbid, allow, replace"),
    ]
    for kw, words in bad:
        with pytest.raises(InvalidArgumentError, match=words):
            mljobs.create_schedule("BAD", defn, args=("x",), session=lite, **kw)
    with pytest.raises(InvalidArgumentError, match="missing a required argument: 'tag'"):
        mljobs.create_schedule("BAD", defn, every="1m", session=lite)
    with pytest.raises(InvalidArgumentError, match="unexpected keyword argument"):
        mljobs.create_schedule("BAD", defn, every="1m", args=("x",), kwargs={"nope": 1}, session=lite)
    with pytest.raises(NotFoundError, match="job definition NOPE does not exist"):
        mljobs.create_schedule("BAD", "NOPE", every="1m", session=lite)
    assert mljobs.list_schedules(session=lite).empty
    mljobs.create_schedule("GOOD", defn, every="1h", args=("x",), session=lite)
    with pytest.raises(ConflictError, match="schedule GOOD already exists"):
        mljobs.create_schedule("GOOD", defn, every="1h", args=("x",), session=lite)
    # a schedule on a suspended pool: its runs queue, and the schedule says why
    mljobs.alter_compute_pool("DEFAULT_POOL", suspend=True, session=lite)
    try:
        assert "SUSPENDED" in mljobs.get_schedule("GOOD", session=lite)["note"]
    finally:
        mljobs.alter_compute_pool("DEFAULT_POOL", resume=True, session=lite)
    mljobs.drop_schedule("GOOD", session=lite)
