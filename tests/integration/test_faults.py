"""Fault tests: the server killed mid-run and while jobs complete, a payload killed, the store
locked, a long queue. Each asserts that no job is lost or mislabelled."""

from __future__ import annotations

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
    jobs = [nap(i, 2.0) for i in range(5)]
    wait_status(jobs[0], {"RUNNING"})
    wait_status(jobs[1], {"RUNNING"})
    assert {j.status.value for j in jobs[2:]} == {"PENDING"}
    sqlite_server.kill(signal.SIGKILL)
    time.sleep(2.5)  # the running ones end while no server watches them
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
