"""Sharing a pool on a real server with users: fair share, quotas, priorities and preemption."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import mljobs
from mljobs.client.session import Session
from mljobs.errors import PermissionDeniedError, QuotaExceededError
from tests.conftest import add_users, wait_status


def quick(i: int) -> int:
    import time

    time.sleep(0.05)
    return i


def hold(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def resumable(n: int):
    import os
    import pathlib
    import time

    ck = pathlib.Path(os.environ["MLJOBS_CHECKPOINT_DIR"])
    done = int((ck / "step").read_text()) if (ck / "step").exists() else 0
    if os.environ["MLJOBS_ATTEMPT"] == "1":
        (ck / "step").write_text("7")
        time.sleep(600)  # preempted here
    return {"attempt": int(os.environ["MLJOBS_ATTEMPT"]), "resumed_from": done, "total": done + n}


def _t(info: dict, key: str) -> dt.datetime:
    return dt.datetime.fromisoformat(info[key])


@pytest.fixture
def team(sqlite_server):
    users = add_users(sqlite_server)
    yield users
    for s in users.values():
        s.close()


def _pool(team, name, **kw):
    return mljobs.create_compute_pool(name, instance_family="CPU_X64_XS", session=team["root"], **kw)


def test_a_late_user_starts_at_the_next_free_slot(team):
    pool = _pool(team, "SHARED", max_nodes=1)
    assert pool["scheduling"] == "fair"  # the default once the server has users
    a = mljobs.remote("SHARED", stage_name="A", session=team["alice"])(quick)
    b = mljobs.remote("SHARED", stage_name="B", session=team["bob"])(quick)
    a_jobs = [a(i) for i in range(100)]
    wait_status(a_jobs[1], {"RUNNING", "DONE"}, timeout=60)
    b_jobs = [b(i) for i in range(10)]
    first_b = b_jobs[0]
    assert first_b.result(timeout=120) == 0
    b_info = first_b._refresh()
    a_infos = [j._refresh() for j in a_jobs]
    # alice's jobs that started after bob's was queued and before it started: at most the one
    # whose start was being decided as bob submitted
    jumped = [i for i in a_infos if i["started_time"] and _t(b_info, "created_time") < _t(i, "started_time")
              < _t(b_info, "started_time")]
    assert len(jumped) <= 1, [j["id"] for j in jumped]
    assert sum(1 for i in a_infos if i["status"] != "DONE") > 50, "alice's queue should still be long"
    desc = mljobs.describe_compute_pool("SHARED", session=team["root"])
    users = {u["user"]: u for u in desc["users"]}
    assert users["alice"]["queued_jobs"] > 0 and "share" in users["alice"]
    df = mljobs.list_jobs(limit=0, session=team["alice"])
    pending = df[df["status"] == "PENDING"]
    assert not pending.empty and pending["pending_reason"].str.contains("fair share").all()
    for j in a_jobs + b_jobs:
        j.cancel()


def test_two_busy_users_each_get_about_half_of_a_fair_pool(team):
    """The long-load rule on a real server: while two users both have jobs waiting, each gets
    within 10% of half the pool's instance-seconds, though one queued all hers first (FIFO gives
    her all of it). Two users new to the server, so no earlier test's usage counts."""
    from mljobs.client.session import Session

    fns = {}
    for name in ("carol", "dave"):
        token = team["root"].request("POST", "/users", json={"name": name}).json()["token"]
        fns[name] = mljobs.remote("BUSY", stage_name=name.upper(), session=Session(url=team["root"].url, token=token))(hold)
    _pool(team, "BUSY", max_nodes=2)
    # the pool suspended while they queue (however slow the submissions), so both start with no usage
    mljobs.alter_compute_pool("BUSY", suspend=True, session=team["root"])
    jobs = {u: [fns[u](0.4) for _ in range(24)] for u in ("carol", "dave")}  # carol's queue first, whole
    mljobs.alter_compute_pool("BUSY", resume=True, session=team["root"])
    for h in jobs["carol"] + jobs["dave"]:
        assert h.wait(timeout=180) == "DONE"
    spans = {u: [(_t(i, "started_time"), _t(i, "ended_time")) for h in hs for i in h._refresh()["instances"]]
             for u, hs in jobs.items()}
    # both wait from the first start until the first of them has started her or his last job
    start = min(s for v in spans.values() for s, _ in v)
    end = min(max(s for s, _ in v) for v in spans.values())
    secs = {u: sum(max(0.0, (min(e, end) - max(s, start)).total_seconds()) for s, e in v) for u, v in spans.items()}
    share = secs["carol"] / (secs["carol"] + secs["dave"])
    assert abs(share - 0.5) <= 0.1, secs
    # and no decision ever ran more than the pool's max_nodes=2 at once (an end frees its slot first)
    events = sorted([(s, 1) for v in spans.values() for s, _ in v] + [(e, -1) for v in spans.values() for _, e in v])
    running = [sum(d for _, d in events[:k + 1]) for k in range(len(events))]
    assert max(running) == 2, max(running)


def test_quotas_refuse_at_submit_and_hold_in_the_queue(team):
    _pool(team, "QUOTA", max_nodes=2)
    root = team["root"]
    with pytest.raises(PermissionDeniedError, match="setting quotas needs an admin"):
        mljobs.set_user_quota("alice", "QUOTA", max_queued=1, session=team["alice"])
    mljobs.set_user_quota("alice", "QUOTA", max_instances=1, max_queued=2, session=root)
    assert mljobs.get_user_quota("alice", session=root) == [
        {"owner": "alice", "pool": "QUOTA", "max_instances": 1, "max_queued": 2, "max_instance_hours": None}]
    h = mljobs.remote("QUOTA", stage_name="A", session=team["alice"])(hold)
    running = h(30.0)
    wait_status(running, {"RUNNING"}, timeout=60)
    waiting = [h(0.1), h(0.1)]
    with pytest.raises(QuotaExceededError, match=r"2 job\(s\) queued on pool QUOTA, their max_queued=2"):
        h(0.1)
    time.sleep(1.0)
    info = waiting[0]._refresh()
    assert info["status"] == "PENDING" and "max_instances=1" in info["message"], info["message"]
    # bob is not held by alice's quota: the free slot is his
    bob = mljobs.remote("QUOTA", stage_name="B", session=team["bob"])(hold)(0.1)
    assert bob.result(timeout=60) == 0.1
    running.cancel()
    assert [j.result(timeout=60) for j in waiting] == [0.1, 0.1]
    # everyone's default, per day
    mljobs.set_user_quota("*", "*", max_instance_hours=0.00001, session=root)
    with pytest.raises(QuotaExceededError, match="max_instance_hours=1e-05"):
        mljobs.remote("QUOTA", stage_name="B", session=team["bob"])(hold)(0.1)
    mljobs.set_user_quota("*", "*", session=root)  # no limits: the row goes
    assert mljobs.remote("QUOTA", stage_name="B", session=team["bob"])(hold)(0.1).result(timeout=60) == 0.1


def test_a_higher_priority_starts_at_the_next_free_slot(team):
    _pool(team, "PRIO", max_nodes=1)
    with pytest.raises(PermissionDeniedError, match="max_priority=0"):
        mljobs.remote("PRIO", stage_name="A", priority=5, session=team["alice"])(hold)(0.1)
    busy = mljobs.remote("PRIO", stage_name="A", session=team["alice"])(hold)(2.0)
    wait_status(busy, {"RUNNING"}, timeout=60)
    low = [mljobs.remote("PRIO", stage_name="A", session=team["alice"])(hold)(0.1) for _ in range(3)]
    urgent = mljobs.remote("PRIO", stage_name="R", priority=5, session=team["root"])(hold)(0.1)
    assert urgent.result(timeout=60) == 0.1
    u = urgent._refresh()
    assert u["priority"] == 5
    assert all(j._refresh()["started_time"] is None or _t(j._refresh(), "started_time") >= _t(u, "started_time")
               for j in low)
    assert [j.result(timeout=60) for j in low] == [0.1] * 3


def test_preemption_requeues_the_lower_job_which_resumes_from_its_checkpoint(team, sqlite_server):
    _pool(team, "PRE", max_nodes=1, preemption=True, max_priority=10)
    victim = mljobs.remote("PRE", stage_name="A", max_retries=1, session=team["alice"])(resumable)(3)
    wait_status(victim, {"RUNNING"}, timeout=60)
    deadline = time.monotonic() + 60
    ck = sqlite_server.home / "work" / victim.id / "0" / ".checkpoint" / "step"
    while not ck.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ck.exists()
    urgent = mljobs.remote("PRE", stage_name="B", priority=5, session=team["bob"])(hold)(0.5)
    assert urgent.result(timeout=60) == 0.5
    assert victim.result(timeout=120) == {"attempt": 2, "resumed_from": 7, "total": 10}
    events = team["alice"].request("GET", f"/jobs/{victim.id}/events").json()
    assert any("preempted by job " + urgent.id in e["message"] for e in events), events
    # no retries left: it ends CANCELLED, saying who preempted it
    plain = mljobs.remote("PRE", stage_name="A", session=team["alice"])(hold)(600.0)
    wait_status(plain, {"RUNNING"}, timeout=60)
    mljobs.remote("PRE", stage_name="B", priority=5, session=team["bob"])(hold)(0.1).result(timeout=60)
    assert plain.wait(60) == "CANCELLED"
    assert "preempted by job" in plain.message and "of user bob" in plain.message and "no retries" in plain.message


def test_usage_outlives_a_deleted_job_and_a_restart(team, sqlite_server):
    """What a user ran counts for fair share and the daily quota after they delete the job (its
    instance rows go with it) and after the server restarts (usage is rebuilt from the store)."""
    _pool(team, "LEDGER", max_nodes=1)
    root, alice = team["root"], team["alice"]
    h = mljobs.remote("LEDGER", stage_name="A", session=alice)(hold)
    job = h(1.5)
    assert job.result(timeout=60) == 1.5
    mljobs.set_user_quota("alice", "LEDGER", max_instance_hours=0.0003, session=root)  # 1.08 s a day
    with pytest.raises(QuotaExceededError, match="max_instance_hours"):
        h(0.1)
    mljobs.delete_job(job.id, session=alice)
    with pytest.raises(QuotaExceededError, match="max_instance_hours"):  # deleting the job gives nothing back
        h(0.1)
    sqlite_server.stop()
    url = sqlite_server.start()
    root, alice = Session(url=url, token=root.token), Session(url=url, token=alice.token)
    try:
        h = mljobs.remote("LEDGER", stage_name="A", session=alice)(hold)
        with pytest.raises(QuotaExceededError, match="max_instance_hours"):
            h(0.1)
        mljobs.set_user_quota("alice", "LEDGER", session=root)
        running = h(30.0)
        wait_status(running, {"RUNNING"}, timeout=60)
        users = {u["user"]: u for u in mljobs.describe_compute_pool("LEDGER", session=root)["users"]}
        assert users["alice"]["usage"] >= 1.5, users  # the deleted job's 1.5 s, read back after the restart
        running.cancel()
        assert running.wait(60) == "CANCELLED"
    finally:
        root.close()
        alice.close()


def test_quotas_and_shares_through_the_cli(team, sqlite_server):
    """`mljobs user quota set|show` and `mljobs pool describe`, as an operator runs them."""
    import json
    import subprocess
    import sys

    def cli(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**sqlite_server.env(), "MLJOBS_URL": sqlite_server.url, "MLJOBS_TOKEN": token, "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "mljobs", *args], env=env, capture_output=True, text=True,
                              timeout=60)

    _pool(team, "CLIQ", max_nodes=2)
    root, alice = team["root"].token, team["alice"].token
    refused = cli(alice, "user", "quota", "set", "bob", "--pool", "CLIQ", "--max-instances", "1")
    assert refused.returncode != 0 and "needs an admin" in " ".join((refused.stdout + refused.stderr).split())
    done = cli(root, "user", "quota", "set", "alice", "--pool", "CLIQ", "--max-instances", "1", "--max-queued", "5")
    assert done.returncode == 0 and "quota of alice on CLIQ: max_instances=1, max_queued=5" in done.stdout, done
    shown = cli(root, "user", "quota", "show", "alice", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [{"owner": "alice", "pool": "CLIQ", "max_instances": 1, "max_queued": 5,
                                         "max_instance_hours": None}]
    held = [mljobs.remote("CLIQ", stage_name="A", session=team["alice"])(hold)(30.0) for _ in range(2)]
    wait_status(held[0], {"RUNNING"}, timeout=60)
    described = cli(alice, "pool", "describe", "CLIQ")
    assert described.returncode == 0, described.stderr
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in described.stdout.splitlines()
            if line.startswith("│")]
    # user, running, queued, share, max instances: one running (her max_instances), one queued, all the share
    assert rows == [["alice", "1", "1", "100%", "1"]], described.stdout
    for j in held:
        j.cancel()
    assert [j.wait(60) for j in held] == ["CANCELLED", "CANCELLED"]
