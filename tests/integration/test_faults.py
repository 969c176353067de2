"""Fault tests: the server killed mid-run and while jobs complete, a payload killed, the store
locked, a long queue. Each asserts that no job is lost or mislabelled."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

import mljobs
from mljobs import JOB_STATUS
from tests.conftest import ServerProc, assert_no_leftovers, leftover_processes, wait_status

ALIVE = {"PENDING", "RUNNING"}


def _pool(s, name: str, max_nodes: int = 2) -> None:
    mljobs.create_compute_pool(name, instance_family="CPU_X64_XS", max_nodes=max_nodes, if_not_exists=True,
                               session=s)


def _napper(s, pool: str):
    @mljobs.remote(pool, stage_name="faults", session=s)
    def nap(i: int, seconds: float):
        import time as t

        t.sleep(seconds)
        return {"i": i, "pid_seen": True}

    return nap


def _final(job, timeout: float = 90.0) -> str:
    """The job's terminal status; every status seen on the way must be a legal one."""
    return wait_status(job, {"DONE", "FAILED", "CANCELLED", "INTERNAL_ERROR"}, timeout=timeout, allowed=ALIVE)


def _db(srv: ServerProc) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{srv.home / 'mljobs.db'}")


def test_server_kill9_mid_run_then_restart(sqlite_server):
    """Jobs RUNNING while the server dies finish DONE with their value; PENDING ones run."""
    s = mljobs.Session(url=sqlite_server.url)
    _pool(s, "K9", max_nodes=2)
    nap = _napper(s, "K9")
    # long enough to be seen RUNNING after all five are submitted on a loaded machine
    jobs = [nap(i, 4.0) for i in range(5)]
    wait_status(jobs[0], {"RUNNING"})
    wait_status(jobs[1], {"RUNNING"})
    assert {j.status.value for j in jobs[2:]} == {"PENDING"}
    sqlite_server.kill(signal.SIGKILL)
    time.sleep(4.5)  # the running ones end while no server watches them
    sqlite_server.start()
    s2 = mljobs.Session(url=sqlite_server.url)
    for i, job in enumerate(jobs):
        again = mljobs.get_job(job.id, session=s2)
        assert _final(again) == "DONE", (again.id, again.status, again.message)
        assert again.result() == {"i": i, "pid_seen": True}
        assert again.message == ""


def test_server_kill9_during_completion_loop(sqlite_server):
    """Short jobs finish while the server is killed at random moments, over and over."""
    rnd = random.Random(int(os.environ.get("MLJOBS_FAULT_SEED", "10")))
    srv = sqlite_server
    s = mljobs.Session(url=srv.url)
    _pool(s, "LOOP", max_nodes=2)
    submitted: list[tuple[str, int]] = []
    n = 0
    for _ in range(8):
        nap = _napper(s, "LOOP")
        for _ in range(4):
            submitted.append((nap(n, rnd.uniform(0.0, 0.3)).id, n))
            n += 1
        time.sleep(rnd.uniform(0.1, 1.2))  # jobs start and finish meanwhile
        srv.kill(signal.SIGKILL)
        srv.start()
        s = mljobs.Session(url=srv.url)
    for job_id, i in submitted:
        job = mljobs.get_job(job_id, session=s)
        assert _final(job) == "DONE", (job_id, job.status, job.message)
        assert job.result() == {"i": i, "pid_seen": True}
        assert job.message == ""


def _finished_while_server_down(srv: ServerProc, s) -> tuple[mljobs.MLJob, str]:
    """A job that ran to its end while the server was dead (kill -9), with its run dir intact."""
    _pool(s, "DOWN", max_nodes=1)
    job = _napper(s, "DOWN")(7, 1.0)
    wait_status(job, {"RUNNING"})
    pid_file = srv.home / "run" / job.id / "0" / "supervisor.pid"  # RUNNING is recorded just before the spawn
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the instance was not spawned"
        time.sleep(0.01)
    srv.kill(signal.SIGKILL)
    exit_file = srv.home / "run" / job.id / "0" / "exit.json"
    deadline = time.monotonic() + 30
    while not exit_file.exists():
        assert time.monotonic() < deadline, "the instance did not finish"
        time.sleep(0.05)
    return job, job.id


def test_restart_after_crash_between_instance_exit_and_job_transition(sqlite_server):
    """The server died after it recorded the instance's exit but before it moved the job: the
    restarted server derives the exit from the instance's files, not "node lost"."""
    job, job_id = _finished_while_server_down(sqlite_server, mljobs.Session(url=sqlite_server.url))
    eng = _db(sqlite_server)
    with eng.begin() as c:  # the state instance_exited leaves after its first write
        c.execute(sa.text("UPDATE instances SET status='EXITED', exit_code=0 WHERE job_id=:j"), {"j": job_id})
    eng.dispose()
    sqlite_server.start()
    again = mljobs.get_job(job_id, session=mljobs.Session(url=sqlite_server.url))
    assert _final(again) == "DONE", again.message
    assert again.result() == {"i": 7, "pid_seen": True}


def test_restart_after_crash_between_spawn_and_recording_the_handle(sqlite_server):
    """The server died after it started a supervisor but before it stored its handle: the
    restarted server finds the instance from its pid file instead of calling it lost."""
    job, job_id = _finished_while_server_down(sqlite_server, mljobs.Session(url=sqlite_server.url))
    eng = _db(sqlite_server)
    with eng.begin() as c:
        c.execute(sa.text("UPDATE instances SET status='STARTING', handle=NULL WHERE job_id=:j"), {"j": job_id})
    eng.dispose()
    t = time.monotonic()
    sqlite_server.start()
    again = mljobs.get_job(job_id, session=mljobs.Session(url=sqlite_server.url))
    assert _final(again) == "DONE", again.message
    assert again.result() == {"i": 7, "pid_seen": True}
    assert time.monotonic() - t < 20  # not after the 60 s grace for instances that never started


def test_restart_after_crash_between_spawn_and_the_pid_file(sqlite_server):
    """The server died after a supervisor was forked but before its pid was written anywhere (the
    failure of the kill -9 loop): the instance ran to its end unseen. Long after the start grace,
    the restarted server still reads the exit record it left instead of calling the node lost."""
    from mljobs.server.store import utcnow
    from mljobs.server.tables import instances

    job, job_id = _finished_while_server_down(sqlite_server, mljobs.Session(url=sqlite_server.url))
    (sqlite_server.home / "run" / job_id / "0" / "supervisor.pid").unlink()
    eng = _db(sqlite_server)
    with eng.begin() as c:  # what start_job left: the instance STARTING, no handle, minutes ago
        c.execute(instances.update().where(instances.c.job_id == job_id).values(
            status="STARTING", handle=None, started_time=utcnow() - dt.timedelta(minutes=5)))
    eng.dispose()
    t = time.monotonic()
    sqlite_server.start()
    again = mljobs.get_job(job_id, session=mljobs.Session(url=sqlite_server.url))
    assert _final(again, timeout=20) == "DONE", again.message
    assert again.result() == {"i": 7, "pid_seen": True}
    assert time.monotonic() - t < 20


def test_payload_kill9_fails_with_the_signal_and_leaves_nothing(lite, sqlite_server):
    """kill -9 of the payload process: FAILED naming the signal; its own child goes too."""

    @mljobs.remote("DEFAULT_POOL", stage_name="faults", session=lite)
    def parent():
        import subprocess as sp
        import time as t

        sp.Popen(["sleep", "300"])  # a child the payload leaves behind when it dies
        print("child started", flush=True)
        t.sleep(300)

    job = parent()
    wait_status(job, {"RUNNING"})
    run_dir = sqlite_server.home / "run" / job.id / "0"
    deadline = time.monotonic() + 30
    while "child started" not in job.get_logs():
        assert time.monotonic() < deadline, job.get_logs()
        time.sleep(0.05)
    payload = [p for p in psutil.process_iter(["cmdline"])
               if " ".join(p.info["cmdline"] or []) == f"mljobs-payload {run_dir}"]
    assert len(payload) == 1, [p.info for p in psutil.process_iter(["cmdline"]) if job.id in str(p.info["cmdline"])]
    payload[0].send_signal(signal.SIGKILL)
    assert _final(job, timeout=30) == "FAILED"
    assert "signal 9" in job.message and "SIGKILL" in job.message, job.message
    with pytest.raises(mljobs.JobFailedError):
        job.result()
    deadline = time.monotonic() + 15
    while (left := [p for p in leftover_processes(sqlite_server.home) if "sleep" in " ".join(p.cmdline())]):
        assert time.monotonic() < deadline, f"the payload's child outlived it: {left}"
        time.sleep(0.1)


_LOCKER = textwrap.dedent("""
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    con.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("ROLLBACK")
""")


def _lock_db(srv: ServerProc, seconds: float) -> subprocess.Popen[str]:
    """Another process holding an exclusive lock on the server's SQLite file for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(srv.home / "mljobs.db"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def _locked_store_run(srv: ServerProc, lock_s: float) -> tuple[list, list[tuple[float, object]]]:
    """A job ends while the store is locked; submits are tried meanwhile. Returns the jobs that
    were running and each submit's (seconds, job or exception)."""
    s = mljobs.Session(url=srv.url)
    _pool(s, "LOCKED", max_nodes=2)
    nap = _napper(s, "LOCKED")
    running = [nap(0, 1.5), nap(1, lock_s + 2.0)]  # one ends during the lock, one after it
    for job in running:
        wait_status(job, {"RUNNING"})
    locker = _lock_db(srv, lock_s)
    tries: list[tuple[float, object]] = []
    try:
        for i in (2, 3):
            t = time.monotonic()
            try:
                got: object = nap(i, 0.1)
            except mljobs.MLJobsError as e:
                got = e
            tries.append((time.monotonic() - t, got))
    finally:
        assert locker.wait(30) == 0
    return running, tries


def test_sqlite_locked_10s_submits_wait_and_nothing_is_lost(sqlite_server):
    running, tries = _locked_store_run(sqlite_server, 10.0)
    # the first submit waits for the lock (30 s busy timeout), the second goes straight through
    assert 5.0 < tries[0][0] < 20.0 and tries[1][0] < 5.0, tries
    jobs = running + [got for _, got in tries]
    for i, job in enumerate(jobs):
        assert isinstance(job, mljobs.MLJob), job
        assert _final(job) == "DONE", (job.id, job.message)
        assert job.result() == {"i": i, "pid_seen": True}


def test_sqlite_locked_past_busy_timeout_fails_clearly_and_nothing_is_lost(tmp_path):
    """With a 2 s busy timeout a 10 s lock makes submits fail with 503 ServerUnavailableError,
    and the exit the watcher could not record is recorded by reconciliation afterwards."""
    srv = ServerProc(tmp_path / "home", extra_env={"MLJOBS_STORE_BUSY_TIMEOUT_S": "2"})
    srv.start()
    try:
        running, tries = _locked_store_run(srv, 10.0)
        for took, got in tries:
            assert isinstance(got, mljobs.ServerUnavailableError), got
            assert "store is unavailable" in str(got) and "locked" in str(got), got
            assert took < 6.0, tries
        for i, job in enumerate(running):
            assert _final(job, timeout=60) == "DONE", (job.id, job.message)
            assert job.result() == {"i": i, "pid_seen": True}
        s = mljobs.Session(url=srv.url)
        assert [j for j in mljobs.list_jobs(limit=0, session=s)["status"]] == ["DONE", "DONE"]  # none half-made
    finally:
        srv.stop()
        assert_no_leftovers(srv.home)


def test_1000_queued_jobs_on_a_pool_of_2_finish_in_fifo_order(lite):
    _pool(lite, "QUEUE", max_nodes=2)

    @mljobs.remote("QUEUE", stage_name="faults", session=lite)
    def square(i: int):
        return i * i

    n = int(os.environ.get("MLJOBS_QUEUE_JOBS", "1000"))
    t = time.monotonic()
    jobs = [square(i) for i in range(n)]
    for i, job in enumerate(jobs):
        assert job.wait(timeout=300) == JOB_STATUS.DONE, (job.id, job.message)
        assert job.result() == i * i
    took = time.monotonic() - t
    rows = mljobs.list_jobs(limit=0, session=lite)
    rows = rows[rows["compute_pool"] == "QUEUE"]
    assert len(rows) == n and set(rows["status"]) == {"DONE"}
    views = [lite.request("GET", f"/jobs/{j.id}").json() for j in jobs]
    created = [v["id"] for v in sorted(views, key=lambda v: v["created_time"])]
    started = [v["id"] for v in sorted(views, key=lambda v: (v["started_time"], v["created_time"]))]
    assert created == [j.id for j in jobs]
    assert started == created, "jobs did not start in the order they were queued"
    print(f"{n} jobs on a pool of 2: {took:.1f} s ({n / took:.0f} jobs/s)")


def test_embedded_server_is_detached_so_stop_is_immediate(tmp_path):
    """`mljobs server stop` while the process that started the embedded server lives on (a
    notebook kernel): it returns at once, leaves no zombie, and the starter keeps running."""
    home = tmp_path / "home"
    env = dict(os.environ, MLJOBS_HOME=str(home))
    env.pop("MLJOBS_URL", None)
    code = textwrap.dedent("""
        import sys, mljobs
        s = mljobs.get_active_session()
        print(s.server_info()["pid"], flush=True)
        sys.stdin.readline()  # stay alive, as a kernel does
        print("still here", flush=True)
    """)
    starter = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert starter.stdout is not None and starter.stdin is not None
        server_pid = int(starter.stdout.readline())
        assert server_pid not in [c.pid for c in psutil.Process(starter.pid).children(recursive=True)]
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "mljobs", "server", "stop"], env=env, timeout=60, check=True,
                       capture_output=True)
        took = time.monotonic() - t
        assert took < 10, f"server stop took {took:.1f} s"
        # stop returns once the server has exited; init (its parent, after the double fork) reaps it
        # a moment later, the starter never has to
        deadline = time.monotonic() + 10
        while psutil.pid_exists(server_pid) and time.monotonic() < deadline:
            try:
                proc = psutil.Process(server_pid)
                assert proc.status() == psutil.STATUS_ZOMBIE, "stop returned while the server still ran"
                assert proc.ppid() != starter.pid, "the server is a zombie of the starter"
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        assert not psutil.pid_exists(server_pid), "the server is still there 10 s after stop"
        assert starter.poll() is None, "the starter died"
        assert not [c for c in psutil.Process(starter.pid).children() if c.status() == psutil.STATUS_ZOMBIE]
        starter.stdin.write("\n")
        starter.stdin.flush()
        assert starter.stdout.readline() == "still here\n"
        assert starter.wait(30) == 0
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
    assert_no_leftovers(home)
