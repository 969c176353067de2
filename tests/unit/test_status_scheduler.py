from __future__ import annotations

import datetime as dt

import pytest

from mljobs.errors import InvalidTransitionError
from mljobs.providers.base import InstanceExit, InstanceHandle
from mljobs.server.monitor import reconcile_once
from mljobs.server.records import JobRecord
from mljobs.server.scheduler import pending_reason, plan, plan_top_ups
from mljobs.server.store import Store, utcnow
from mljobs.spec import JobSpec, PayloadKind, PoolSpec, is_job_id, new_job_id
from mljobs.status import JOB_STATUS, TERMINAL, can_transition

S = JOB_STATUS


def test_terminal_states_never_move():
    for t in TERMINAL:
        assert not any(can_transition(t, n) for n in S)
    assert can_transition(S.PENDING, S.RUNNING)
    # back to the queue from RUNNING (a retry) or CANCELLING (preempted; Store.requeue_job checks which)
    assert can_transition(S.RUNNING, S.PENDING) and can_transition(S.CANCELLING, S.PENDING)
    assert not can_transition(S.CANCELLED, S.PENDING)


def test_job_ids():
    jid = new_job_id()
    assert is_job_id(jid) and jid.startswith("MLJOB_") and "-" not in jid
    assert not is_job_id("MLJOB_123")


def _pool(max_nodes=2, suspended=False):
    return {"name": "P", "max_nodes": max_nodes, "suspended": suspended}


def _job(i, target=1, min_=None, ran=0):
    return JobRecord(id=f"j{i}", name=f"j{i}", status="PENDING", message="", database_name="D", schema_name="S",
                     owner="me", compute_pool="P", stage_name="ST", target_instances=target,
                     min_instances=min_ or target, instances_ran=ran, created_time=utcnow())


def plan_starts(pool, used, pending):
    """A fifo pool with one user's queue."""
    return plan(pool, used, {"me": pending}, fair=False).starts


def test_plan_is_fifo_and_respects_capacity():
    plan = plan_starts(_pool(2), {0}, [_job(1), _job(2)])
    assert [(j.id, s) for j, s in plan] == [("j1", [1])]
    assert plan_starts(_pool(2, suspended=True), set(), [_job(1)]) == []
    # the head needs 2, only 1 free: nothing behind it jumps the queue
    assert plan_starts(_pool(2), {0}, [_job(1, target=2), _job(2)]) == []
    # all-or-enough: min 1 of target 3 starts with what is free
    assert [s for _, s in plan_starts(_pool(2), set(), [_job(1, target=3, min_=1)])] == [[0, 1]]


def test_two_multinode_jobs_never_deadlock():
    # each needs 2 of 3 nodes: the first takes what it can, the second waits holding nothing
    plan = plan_starts(_pool(3), set(), [_job(1, target=3, min_=2), _job(2, target=3, min_=2)])
    assert [(j.id, s) for j, s in plan] == [("j1", [0, 1, 2])]
    plan = plan_starts(_pool(4), set(), [_job(1, target=2), _job(2, target=3, min_=2)])
    assert [(j.id, s) for j, s in plan] == [("j1", [0, 1]), ("j2", [2, 3])]


def test_top_ups_use_only_slots_nobody_queues_for():
    short = [_job(1, target=3, min_=2, ran=2)]
    assert [(j.id, s) for j, s in plan_top_ups(_pool(3), {0, 1}, [], short)] == [("j1", [2])]
    assert plan_top_ups(_pool(3), {0, 1}, [_job(2)], short) == []  # a queued job comes first
    assert plan_top_ups(_pool(3, suspended=True), {0, 1}, [], short) == []
    assert plan_top_ups(_pool(2), {0, 1}, [], short) == []  # nothing free


def test_pending_reason_words():
    assert pending_reason({"name": "P", "suspended": True, "max_nodes": 1}, 0, 0).startswith("pool P is SUSPENDED")
    assert pending_reason(_pool(2), 2, 1) == "pool busy: 2/2 nodes in use, 1 job(s) ahead in the queue"


@pytest.fixture
def store(tmp_path):
    s = Store.sqlite(tmp_path / "db.sqlite")
    s.migrate()
    s.create_pool(PoolSpec("P", "CPU_X64_XS"))
    yield s
    s.close()


def _insert(store, status="PENDING"):
    jid = new_job_id()
    spec = JobSpec("P", "st", PayloadKind.FILE, entrypoint=["m.py"])
    store.insert_job({"id": jid, "name": jid, "status": status, "message": "", "database_name": "D",
                      "schema_name": "S", "owner": "me", "compute_pool": "P", "stage_name": "ST",
                      "target_instances": 1, "min_instances": 1, "instances_ran": 0, "spec": spec.to_dict(),
                      "created_time": utcnow()})
    return jid


def test_store_transitions_are_compare_and_set(store):
    jid = _insert(store)
    store.transition(jid, S.RUNNING, expected=[S.PENDING])
    with pytest.raises(InvalidTransitionError):
        store.transition(jid, S.RUNNING, expected=[S.PENDING])
    done = store.transition(jid, S.DONE)
    assert done.status == "DONE" and done.completed_time is not None
    with pytest.raises(InvalidTransitionError, match="DONE"):
        store.transition(jid, S.CANCELLED)


def test_every_status_a_job_takes_is_an_event_in_order_and_a_refused_move_is_none(store):
    jid = _insert(store)
    assert store.start_job(jid, [0])
    store.transition(jid, S.CANCELLING, message="cancelled by me")
    with pytest.raises(InvalidTransitionError):
        store.transition(jid, S.PENDING)  # refused: writes no event
    assert store.record_exit(jid, 0, {"exit_code": -15, "ended_time": utcnow()}, S.CANCELLED,
                             expected=[S.CANCELLING], message="cancelled by me")
    assert not store.record_exit(jid, 0, {"exit_code": 0}, S.DONE, expected=[S.CANCELLED])  # ended already
    events = store.job_events(jid)
    assert [e["status"] for e in events] == ["PENDING", "RUNNING", "CANCELLING", "CANCELLED"]
    assert [e["message"] for e in events] == ["", "1 instance(s) started", "cancelled by me", "cancelled by me"]
    times = [e["time"] for e in events]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert times[-1] == store.get_job(jid).completed_time
    store.delete_job(jid)
    assert store.job_events(jid) == []


def test_queue_position_and_start_are_consistent_with_the_queue(store):
    ids = [_insert(store) for _ in range(5)]
    assert [j.id for j in store.pending_jobs("P")] == ids
    assert [j.id for j in store.pending_jobs("P", limit=2)] == ids[:2]
    assert [store.jobs_ahead(store.get_job(j)) for j in ids] == [0, 1, 2, 3, 4]
    assert store.start_job(ids[1], [0, 1])
    assert not store.start_job(ids[1], [0])  # no longer PENDING
    assert store.get_job(ids[1]).status == "RUNNING" and store.get_job(ids[1]).instances_ran == 2
    assert [i["slot"] for i in store.instances_of(ids[1])] == [0, 1]
    assert [store.jobs_ahead(store.get_job(j)) for j in ids[2:]] == [1, 2, 3]
    assert store.list_jobs(0, with_spec=False)[0].spec is None and store.list_jobs(1)[0].spec is not None


class FakeProvider:
    """Records calls; instances listed in ``ended`` have exited."""

    def __init__(self, ended, started=None):
        self.ended, self.watched, self.started = ended, [], started or {}

    def find(self, job_id, instance_id):
        return self.started.get(job_id)

    def watch(self, handle, cb):
        if handle.pid in self.ended:
            return False
        self.watched.append(handle.pid)
        return True

    def poll(self, handle):
        if handle.pid == 666:
            raise RuntimeError("broken")
        return InstanceExit(0) if handle.pid in self.ended else None


def test_reconcile_once_finishes_ended_and_attaches_live():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    live = [
        {"job_id": "a", "instance_id": 0, "handle": InstanceHandle("a", 0, pid=1).to_dict(), "started_time": now},
        {"job_id": "b", "instance_id": 0, "handle": InstanceHandle("b", 0, pid=2).to_dict(), "started_time": now},
        {"job_id": "c", "instance_id": 0, "handle": InstanceHandle("c", 0, pid=666).to_dict(), "started_time": now},
        {"job_id": "d", "instance_id": 0, "handle": None, "started_time": now - dt.timedelta(minutes=5)},
        {"job_id": "e", "instance_id": 0, "handle": None, "started_time": now},
        # started, but the server stopped before it stored the handles: the provider finds them
        {"job_id": "f", "instance_id": 0, "handle": None, "started_time": now},
        {"job_id": "g", "instance_id": 0, "handle": None, "started_time": now},
    ]
    provider = FakeProvider(ended={1, 666, 7}, started={"f": InstanceHandle("f", 0, pid=6),
                                                        "g": InstanceHandle("g", 0, pid=7)})
    exited, found = [], []
    done = reconcile_once(live, lambda pool: provider, lambda job: "P", exited.append, now, attach=True,
                          on_found=found.append)
    assert [h.job_id for h in done] == ["a", "d", "g"]  # c's error is isolated, e is still starting
    assert provider.watched == [2, 6]
    assert [(h.job_id, h.pid) for h in found] == [("f", 6), ("g", 7)]
