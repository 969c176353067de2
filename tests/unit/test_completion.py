"""One owner of a job's completion: ControlPlane with a real SQLite store and a fake provider.

After every committed store transaction, nobody may see an active job whose instances all
ended (the monitor, or a server started after a crash, would then call it lost), nor an
instance recorded EXITED with a result that is not on the stage yet.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mljobs.config import Settings
from mljobs.paths import StagePaths
from mljobs.providers.base import InstanceExit, InstanceHandle, InstanceLaunch, Provider
from mljobs.runtime.checkpoint import StageFolder
from mljobs.server.service import ControlPlane
from mljobs.server.store import Store, utcnow
from mljobs.spec import JobSpec, PayloadKind, PoolSpec, new_job_id

ENVELOPE = b"the result envelope"


class FakeProvider(Provider):
    """Instances that have ended: the first poll reads their files, later ones find them cleaned."""

    name = "local"

    def __init__(self) -> None:
        self.cleaned: set[tuple[str, int]] = set()

    def validate_pool(self, pool: PoolSpec) -> None:
        pass

    def start(self, launch: InstanceLaunch) -> InstanceHandle:
        raise AssertionError("not started here")

    def watch(self, handle: InstanceHandle, on_exit: Any) -> bool:
        return False

    def poll(self, handle: InstanceHandle) -> InstanceExit | None:
        if (handle.job_id, handle.instance_id) in self.cleaned:
            return InstanceExit(None, lost=True)
        return InstanceExit(0, result=ENVELOPE, usage={"cpu_seconds": 1.5, "peak_rss_bytes": 1000})

    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> None:
        pass

    def cleanup(self, handle: InstanceHandle, now: bool = False) -> None:
        self.cleaned.add((handle.job_id, handle.instance_id))


class CheckedEngine:
    """The store's engine, checking the invariants after each transaction it commits."""

    def __init__(self, engine: sa.Engine, check: Any) -> None:
        self._engine, self._check = engine, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self._engine.begin() as c:
            yield c
        self._check()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    store = Store.sqlite(tmp_path / "mljobs.db")
    plane = ControlPlane(Settings(home=tmp_path, create_default_pool=False), store)
    store.migrate()
    plane._providers["local"] = FakeProvider()
    plane.create_pool("P", instance_family="CPU_X64_XS", max_nodes=2)
    plane.violations = []  # type: ignore[attr-defined]
    raw, stage = store.engine, plane.stage("st")

    def check() -> None:
        with raw.connect() as c:
            half_done = c.execute(sa.text(
                "SELECT id FROM jobs WHERE status IN ('RUNNING', 'CANCELLING') "
                "AND EXISTS (SELECT 1 FROM instances i WHERE i.job_id = jobs.id) "
                "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.job_id = jobs.id "
                "AND i.status IN ('STARTING', 'RUNNING'))")).scalars().all()
            recorded = c.execute(sa.text(
                "SELECT job_id FROM instances WHERE status = 'EXITED' AND instance_id = 0")).scalars().all()
        unkept = [j for j in recorded if not stage.exists(StagePaths(j).result)]
        found = plane.violations  # type: ignore[attr-defined]
        found += [f"{j}: active with every instance ended" for j in half_done]
        found += [f"{j}: EXITED before its result was on the stage" for j in unkept]

    store.engine = CheckedEngine(store.engine, check)  # type: ignore[assignment]
    yield plane
    store.close()


def _running_job(cp: ControlPlane, instances: int = 1, max_retries: int = 0) -> str:
    job_id = new_job_id()
    spec = JobSpec("P", "st", PayloadKind.FUNCTION, ["f"], target_instances=instances, max_retries=max_retries)
    cp.store.insert_job({
        "id": job_id, "name": job_id, "status": "PENDING", "message": "", "database_name": "D", "schema_name": "S",
        "owner": "me", "compute_pool": "P", "stage_name": "st", "target_instances": instances,
        "min_instances": instances, "instances_ran": 0, "spec": spec.to_dict(), "created_time": utcnow()})
    assert cp.store.start_job(job_id, list(range(instances)))
    for i in range(instances):
        handle = InstanceHandle(job_id, i, 4242 + i, 1.0)
        cp.store.update_instance(job_id, i, status="RUNNING", handle=handle.to_dict())
    return job_id


def test_the_last_exit_and_the_job_status_are_one_transaction(cp):
    job_id = _running_job(cp)
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))
    assert cp.violations == []
    job, [inst] = cp.store.get_job(job_id), cp.store.instances_of(job_id)
    assert (job.status, job.message) == ("DONE", "")
    assert inst["status"] == "EXITED" and inst["exit_code"] == 0 and inst["exit_record"]["has_result"]
    assert cp.stage("st").get_bytes(StagePaths(job_id).result) == ENVELOPE


def test_a_second_report_of_the_same_exit_changes_nothing(cp):
    """The exit watcher and the monitor may both report an instance; the second finds its files
    cleaned and must neither call it lost nor overwrite what the first recorded."""
    job_id = _running_job(cp)
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))
    first = cp.store.instances_of(job_id)
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))
    assert cp.store.instances_of(job_id) == first
    assert first[0]["exit_code"] == 0 and first[0]["cpu_seconds"] == 1.5
    assert cp.store.get_job(job_id).status == "DONE"


def test_a_multinode_job_finishes_from_the_stored_exit_records(cp):
    """The head ended first and its files are gone by the time the last worker ends: the job's
    status comes from the head's stored exit record, not from files."""
    job_id = _running_job(cp, instances=2)
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))
    cp._providers["local"].cleanup(InstanceHandle(job_id, 0))
    assert cp.store.get_job(job_id).status == "RUNNING"
    cp.instance_exited(InstanceHandle(job_id, 1, 4243, 1.0))
    assert cp.violations == []
    assert cp.store.get_job(job_id).status == "DONE"


def test_the_result_is_kept_outside_the_lock_and_a_report_meanwhile_changes_nothing(cp, monkeypatch):
    """A slow stage (S3) holds up no other decision: while the result is being written, the
    plane's lock is free; a second report of the same exit meanwhile returns at once; the row
    says EXITED only once the result is on the stage."""
    import threading

    job_id = _running_job(cp)
    writing, release = threading.Event(), threading.Event()
    stage = cp.stage("st")
    put = type(stage).put_bytes

    def slow_put(self, path, data):
        writing.set()
        assert release.wait(10)
        put(self, path, data)

    monkeypatch.setattr(type(stage), "put_bytes", slow_put)
    first = threading.Thread(target=cp.instance_exited, args=(InstanceHandle(job_id, 0, 4242, 1.0),))
    first.start()
    assert writing.wait(10)
    assert cp._lock.acquire(timeout=1)  # free while the stage is written
    cp._lock.release()
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))  # the monitor's report of the same exit
    assert cp.store.instances_of(job_id)[0]["status"] == "RUNNING"  # not recorded before its result
    release.set()
    first.join(10)
    assert cp.violations == []
    assert cp.store.get_job(job_id).status == "DONE" and cp.store.instances_of(job_id)[0]["exit_code"] == 0


def test_a_retried_jobs_checkpoint_is_kept_once_outside_the_lock(cp, monkeypatch, tmp_path):
    """A lost instance of a job with retries left: its end keeps the checkpoint on the stage
    (outside the lock); the requeue does not upload it a second time under the lock. One the
    monitor found ended without that (no report kept it) is still kept by the requeue."""
    import threading

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step").write_text("7")
    provider = cp._providers["local"]
    monkeypatch.setattr(provider, "poll", lambda handle: InstanceExit(None, lost=True))
    monkeypatch.setattr(provider, "checkpoint_dir", lambda handle, lost=False: str(ck), raising=False)
    stage = cp.stage("st")
    uploads: list[tuple[str, bool]] = []
    upload = type(stage).upload_dir

    def lock_free() -> bool:  # asked from another thread: the plane's lock is reentrant
        free: list[bool] = []

        def take() -> None:
            free.append(cp._lock.acquire(timeout=0.5))
            if free[0]:
                cp._lock.release()

        t = threading.Thread(target=take)
        t.start()
        t.join()
        return free[0]

    def counted(self, local, prefix, **kw):
        uploads.append((prefix, lock_free()))
        return upload(self, local, prefix, **kw)

    monkeypatch.setattr(type(stage), "upload_dir", counted)
    job_id = _running_job(cp, max_retries=2)
    cp.alter_pool("P", suspend=True)  # the requeued attempt waits (nothing here could start it)
    cp.instance_exited(InstanceHandle(job_id, 0, 4242, 1.0))
    job = cp.store.get_job(job_id)
    assert (job.status, job.attempt) == ("PENDING", 2), job.message
    # the attempt's run counts, though the requeue dropped its instance row (fair share, daily quotas)
    assert cp.store.instance_spans(utcnow() - dt.timedelta(hours=1), owner="me")[0]["compute_pool"] == "P"
    assert cp.store.instances_of(job_id) == []
    kept = StageFolder(stage, StagePaths(job_id).checkpoint(0))
    assert uploads == [(kept.kept(), True)]  # once, with the lock free
    assert stage.get_bytes(kept.kept() + "step") == b"7"
    # the completion path without a report (the monitor, a restarted server): the requeue keeps it
    uploads.clear()
    assert cp.store.start_job(job_id, [0])  # attempt 2 runs, and its end is found by the monitor
    cp.store.update_instance(job_id, 0, status="EXITED", handle=InstanceHandle(job_id, 0, 4242, 1.0).to_dict())
    with cp._lock:
        cp._complete(cp.store.get_job(job_id), cp.store.instances_of(job_id), None)
    assert [p for p, _ in uploads] == [kept.kept()]  # kept by the requeue this time
    job = cp.store.get_job(job_id)
    assert (job.status, job.attempt) == ("PENDING", 3), job.message
    assert cp._kept_checkpoints == {}
