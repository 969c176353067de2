"""Fair share, priorities, quotas and preemption: the start decision (scheduler.plan,
choose_victims) and each user's decayed usage, without a server."""

from __future__ import annotations

import datetime as dt
from collections import deque

from mljobs.server.records import JobRecord
from mljobs.server.scheduler import choose_victims, plan
from mljobs.server.usage import Usage, family_weight, is_fair

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def _pool(max_nodes=2, suspended=False):
    return {"name": "P", "max_nodes": max_nodes, "suspended": suspended}


def _job(owner, i, priority=0, target=1, min_=None, started=None, ran=0):
    return JobRecord(id=f"{owner}{i}", name=f"{owner}{i}", status="PENDING", message="", database_name="D",
                     schema_name="S", owner=owner, compute_pool="P", stage_name="ST", target_instances=target,
                     min_instances=min_ or target, instances_ran=ran, created_time=T0 + dt.timedelta(seconds=i),
                     started_time=started, priority=priority)


def _ids(p):
    return [j.id for j, _ in p.starts]


def test_the_user_with_less_recent_usage_goes_first():
    heads = {"a": [_job("a", 1), _job("a", 2)], "b": [_job("b", 50)]}
    # FIFO: a's older jobs first
    assert _ids(plan(_pool(1), set(), heads, fair=False)) == ["a1"]
    # fair: b has used nothing, a a lot
    assert _ids(plan(_pool(1), set(), heads, fair=True, usage={"a": 1000.0})) == ["b50"]
    # equal users alternate within one decision; FIFO within a user
    heads = {"a": [_job("a", 1), _job("a", 2)], "b": [_job("b", 3), _job("b", 4)]}
    assert _ids(plan(_pool(4), set(), heads, fair=True)) == ["a1", "b3", "a2", "b4"]


def test_priority_comes_before_fair_share_and_fifo():
    heads = {"a": [_job("a", 1, priority=5)], "b": [_job("b", 0)]}
    assert _ids(plan(_pool(1), set(), heads, fair=True, usage={"a": 1e9})) == ["a1"]
    assert _ids(plan(_pool(1), set(), heads, fair=False)) == ["a1"]


def test_a_user_at_max_instances_waits_and_others_go_on():
    heads = {"a": [_job("a", 1), _job("a", 2)], "b": [_job("b", 3)]}
    p = plan(_pool(3), {0}, heads, fair=True, running={"a": 1}, max_instances={"a": 1, "b": None})
    assert _ids(p) == ["b3"] and "max_instances=1" in p.held["a"]
    # a multi-instance job takes no more than the quota leaves
    heads = {"a": [_job("a", 1, target=3, min_=1)]}
    p = plan(_pool(4), set(), heads, fair=True, max_instances={"a": 2})
    assert [len(s) for _, s in p.starts] == [2]


def test_never_more_than_max_nodes_and_a_big_job_is_not_starved():
    heads = {u: [_job(u, i) for i in range(5)] for u in "abc"}
    p = plan(_pool(2), set(), heads, fair=True)
    assert sum(len(s) for _, s in p.starts) == 2 and p.free == 0
    # the first job needs 2, one is free: nothing behind it starts; it is the one to preempt for
    heads = {"a": [_job("a", 1, target=2, priority=1)], "b": [_job("b", 2)]}
    p = plan(_pool(2), {0}, heads, fair=True)
    assert p.starts == [] and p.blocked is not None and p.blocked.id == "a1"
    assert plan(_pool(2, suspended=True), set(), heads, fair=True).starts == []


def test_victims_are_the_lowest_priority_most_recently_started():
    waiting = _job("hi", 1, priority=10, target=2)
    running = [_job("x", 2, priority=0, started=T0, ran=1), _job("y", 3, priority=0, started=T0 + dt.timedelta(1), ran=1),
               _job("z", 4, priority=-5, started=T0, ran=1), _job("w", 5, priority=10, started=T0, ran=1)]
    assert [j.id for j in choose_victims(waiting, 0, running)] == ["z4", "y3"]
    assert [j.id for j in choose_victims(waiting, 1, running)] == ["z4"]
    assert choose_victims(waiting, 2, running) == []  # fits without taking anything
    # never an equal or higher priority, and nothing when the lower ones are not enough
    assert choose_victims(_job("hi", 1, priority=0, target=1), 0, running) == [running[2]]
    assert choose_victims(_job("hi", 1, priority=0, target=2), 0, running) == []  # z alone is not enough


def test_usage_decays_with_its_half_life():
    u = Usage(half_life_s=100.0)
    u.add("a", 800.0, at=1000.0)
    assert u.get("a", 1000.0) == 800.0
    assert abs(u.get("a", 1100.0) - 400.0) < 1e-6 and abs(u.get("a", 1300.0) - 100.0) < 1e-6
    u.add("a", 100.0, at=1100.0)
    assert abs(u.get("a", 1100.0) - 500.0) < 1e-6
    u.add("a", 200.0, at=1000.0)  # an older record (a rebuild) decays to the value's time
    assert abs(u.get("a", 1100.0) - 600.0) < 1e-6
    assert u.get("nobody", 5.0) == 0.0
    assert family_weight("CPU_X64_S") == 2 and family_weight("GPU_NV_S") == 6 + 8
    assert is_fair({"scheduling": None}, True) and not is_fair({"scheduling": None}, False)
    assert is_fair({"scheduling": "fair"}, False) and not is_fair({"scheduling": "fifo"}, True)


def _simulate(fair: bool, seconds: float = 600.0, half_life_s: float = 3600.0) -> dict[str, float]:
    """Two busy users on a pool of 2 for ``seconds`` of simulated time: a queued its jobs of 1 s
    first, b its jobs of 5 s after them; each slot that frees is given by the real start
    decision (plan) with the usage the server would pass it (the decayed record of ended
    instances plus what running ones ran so far). Returns each user's instance-seconds."""
    length = {"a": 1.0, "b": 5.0}
    queued = {u: deque(_job(u, i + (5000 if u == "b" else 0)) for i in range(2000)) for u in "ab"}
    usage = Usage(half_life_s)
    running: dict[int, tuple[str, float]] = {}  # slot -> (owner, started)
    got = {"a": 0.0, "b": 0.0}
    now = 0.0
    while now < seconds:
        live: dict[str, float] = usage.snapshot(now)
        for owner, started in running.values():
            live[owner] = live.get(owner, 0.0) + (now - started)
        heads = {u: list(q)[:2] for u, q in queued.items()}
        decision = plan(_pool(2), set(running), heads, fair=fair, usage=live)
        for job, slots in decision.starts:
            queued[job.owner].popleft()
            running[slots[0]] = (job.owner, now)
        slot, (owner, started) = min(running.items(), key=lambda kv: kv[1][1] + length[kv[1][0]])
        now = started + length[owner]
        del running[slot]
        usage.add(owner, length[owner], now)
        got[owner] += length[owner]
    return got


def test_two_busy_users_each_get_half_of_a_fair_pool_over_a_long_load():
    got = _simulate(fair=True)
    share = got["a"] / (got["a"] + got["b"])
    assert abs(share - 0.5) < 0.05, got  # within 10% of half, whatever their jobs' lengths
    fifo = _simulate(fair=False)
    assert fifo["b"] == 0.0  # the same load FIFO: the user who queued first holds the pool
