"""Finished jobs, their logs and stage files go after a retention period, or by hand with prune."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import mljobs
from mljobs.paths import StagePaths
from tests.conftest import ServerProc, assert_no_leftovers


def _job(session, value, fail=False):
    @mljobs.remote("DEFAULT_POOL", stage_name="keep_stage", session=session)
    def work(v, boom):
        print("working on", v)
        if boom:
            raise ValueError("boom")
        return v

    return work(value, fail)


def _gone(srv: ServerProc, job_id: str) -> bool:
    return not (srv.home / "logs" / job_id).exists() and not (
        srv.home / "stages" / "KEEP_STAGE" / StagePaths(job_id).prefix).exists()


def test_server_removes_jobs_past_their_ttl(tmp_path):
    # 2 s of retention: the monitor (every 5 s) removes the job, its log and its stage files
    srv = ServerProc(tmp_path / "home", extra_env={"MLJOBS_JOB_TTL_DAYS": str(2 / 86400)})
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)
        job = _job(s, 1)
        assert job.result(timeout=60) == 1
        assert not _gone(srv, job.id)
        deadline = time.monotonic() + 30
        while len(mljobs.list_jobs(limit=0, session=s)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(mljobs.list_jobs(limit=0, session=s)) == 0
        assert _gone(srv, job.id)
        with pytest.raises(mljobs.NotFoundError):
            mljobs.get_job(job.id, session=s)
    finally:
        srv.stop()
        assert_no_leftovers(srv.home)


def test_prune_by_hand_keeps_what_does_not_match(sqlite_server):
    s = mljobs.Session(url=sqlite_server.url)
    ok, bad = _job(s, 1), _job(s, 2, fail=True)
    assert ok.wait(timeout=60) == mljobs.JOB_STATUS.DONE and bad.wait(timeout=60) == mljobs.JOB_STATUS.FAILED
    third = _job(s, 3)
    env = dict(os.environ, MLJOBS_URL=sqlite_server.url)
    cli = [sys.executable, "-m", "mljobs", "jobs", "prune"]
    out = subprocess.run(cli + ["--older-than", "1h"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "deleted 0 job(s)" in out.stdout, out.stderr  # none is an hour old
    out = subprocess.run(cli + ["--older-than", "0s", "--status", "failed"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "deleted 1 job(s)" in out.stdout, out.stderr
    left = set(mljobs.list_jobs(limit=0, session=s).index)
    assert bad.id not in left and {ok.id, third.id} <= left
    assert _gone(sqlite_server, bad.id) and not _gone(sqlite_server, ok.id)
    out = subprocess.run(cli + ["--older-than", "soon"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "like 7d" in " ".join(out.stderr.split())
    assert third.result(timeout=60) == 3
