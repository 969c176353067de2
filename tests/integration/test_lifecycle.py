"""Scheduling, cancel, survival of client exit and server restart."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import mljobs
from mljobs import JOB_STATUS
from tests.conftest import host_pids, wait_status


def _sleeper(session, pool="P1", seconds=30.0, **kw):
    @mljobs.remote(pool, stage_name="payload_stage", session=session, **kw)
    def sleeper(s: float):
        import time as t

        print("sleeping", flush=True)
        t.sleep(s)
        return s

    return sleeper(seconds)


def test_fifo_queue_and_pending_reason(session):
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=session)
    first = _sleeper(session, seconds=1.5)
    second = _sleeper(session, seconds=0.1)
    assert wait_status(first, {"RUNNING"}) == "RUNNING"
    assert second.status == JOB_STATUS.PENDING
    assert second.message.startswith("pool busy: 1/1 nodes in use")
    desc = mljobs.describe_compute_pool("P1", session=session)
    assert desc["nodes_in_use"] == 1 and desc["queued"] == 1 and desc["state"] == "ACTIVE"
    assert second.result(timeout=60) == 0.1
    assert first.status == JOB_STATUS.DONE  # first come, first served


def test_suspended_pool_keeps_jobs_pending_until_resume(session):
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=session)
    mljobs.alter_compute_pool("P1", suspend=True, session=session)
    job = _sleeper(session, seconds=0.1)
    time.sleep(0.5)
    assert job.status == JOB_STATUS.PENDING
    assert "SUSPENDED" in job.message and "resume" in job.message
    with pytest.raises(TimeoutError, match="PENDING"):
        job.wait(timeout=0.5)
    mljobs.alter_compute_pool("P1", resume=True, session=session)
    assert job.result(timeout=60) == 0.1


def test_cancel_kills_whole_tree(session, tmp_path):
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=session)
    pids = tmp_path / "pids"

    @mljobs.remote("P1", stage_name="payload_stage", session=session)
    def spawner(path: str):
        import os
        import subprocess
        import time

        child = subprocess.Popen(["sh", "-c", "sleep 300 & echo $! > " + path + ".gc; wait"])
        escaped = subprocess.Popen(["setsid", "sleep", "300"])
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {child.pid} {escaped.pid}")
        time.sleep(300)

    job = spawner(str(pids))
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.with_suffix(".gc").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = host_pids([int(p) for p in pids.read_text().split()] + [int(pids.with_suffix(".gc").read_text())], job.id)
    assert all(psutil.pid_exists(p) for p in tree)
    queued = _sleeper(session, seconds=0.1)
    t0 = time.monotonic()
    job.cancel()
    assert wait_status(job, {"CANCELLED"}, timeout=15, allowed={"RUNNING", "CANCELLING"}) == "CANCELLED"
    assert time.monotonic() - t0 < 10
    for p in tree:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE, p
    assert queued.result(timeout=60) == 0.1  # capacity freed
    pending = _sleeper(session, seconds=0.1)
    mljobs.alter_compute_pool("P1", suspend=True, session=session)
    pending2 = _sleeper(session, seconds=0.1)
    pending2.cancel()
    assert pending2.status == JOB_STATUS.CANCELLED
    # `pending` started at submit if the freed slot was seen, else it waits for the resume
    mljobs.alter_compute_pool("P1", resume=True, session=session)
    assert pending.result(timeout=60) == 0.1


def test_job_survives_client_exit(sqlite_server, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import mljobs
        s = mljobs.Session.builder.config("url", {sqlite_server.url!r}).create()

        @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=s)
        def slow():
            import time
            time.sleep(1.5)
            return "survived"

        print(slow().id)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    job_id = out.stdout.strip().splitlines()[-1]
    s = mljobs.Session(url=sqlite_server.url)
    assert mljobs.get_job(job_id, session=s).result(timeout=60) == "survived"


def test_job_survives_server_restart_and_dead_supervisor_is_internal_error(sqlite_server):
    s = mljobs.Session(url=sqlite_server.url)
    survivor = _sleeper(s, pool="DEFAULT_POOL", seconds=3)
    victim = _sleeper(s, pool="DEFAULT_POOL", seconds=60)
    wait_status(survivor, {"RUNNING"})
    wait_status(victim, {"RUNNING"})
    sup = [p for p in psutil.process_iter(["cmdline"]) if victim.id in " ".join(p.info["cmdline"] or [])]
    assert sup, "the victim's supervisor is not running"
    sqlite_server.kill()
    # the platform loses this node while the server is down: its processes all stop at once (frozen
    # first, so the supervisor cannot see its payload die and record that as the payload's exit)
    tree = {}
    for p in sup:
        try:
            tree.update({c.pid: c for c in [p, *p.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for how in (psutil.Process.suspend, psutil.Process.kill):
        for c in tree.values():
            try:
                how(c)
            except psutil.NoSuchProcess:
                pass
    sqlite_server.start()
    s2 = mljobs.Session(url=sqlite_server.url)
    assert mljobs.get_job(survivor.id, session=s2).result(timeout=60) == 3
    again = mljobs.get_job(victim.id, session=s2)
    assert again.wait(timeout=30) == JOB_STATUS.INTERNAL_ERROR
    assert "supervisor" in again.message


def test_log_follow_streams_while_running(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=lite)
    def ticker():
        import time

        for i in range(3):
            print("tick", i, flush=True)
            time.sleep(0.3)

    job = ticker()
    assert list(job.stream_logs()) == ["tick 0", "tick 1", "tick 2"]
    assert job.get_logs(limit=1) == "tick 2"


def test_failed_exit_code_message(lite, tmp_path):
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nprint('about to die')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    job = mljobs.submit_file(script, "DEFAULT_POOL", stage_name="payload_stage", session=lite)
    assert job.wait(timeout=60) == JOB_STATUS.FAILED
    assert "signal 9" in job.message and "about to die" in job.message
    with pytest.raises(mljobs.JobFailedError, match="without a result"):
        job.result()


def test_embedded_server_shared_by_two_clients(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, MLJOBS_HOME=str(home))
    env.pop("MLJOBS_URL", None)
    code = ("import mljobs; s = mljobs.get_active_session(); print(s.url, s.server_info()['pid'])")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    try:
        assert len(outs) == 1, outs
    finally:
        subprocess.run([sys.executable, "-m", "mljobs", "server", "stop"], env=env, timeout=60, check=True)
    from tests.conftest import assert_no_leftovers

    assert_no_leftovers(home)


def test_supervisors_come_from_a_warm_spawner_that_is_replaced_when_killed(sqlite_server):
    s = mljobs.Session(url=sqlite_server.url)
    job = _sleeper(s, pool="DEFAULT_POOL", seconds=5)
    wait_status(job, {"RUNNING"})

    def named(prefix):
        found = [p for p in psutil.process_iter(["cmdline", "ppid"])
                 if " ".join(p.info["cmdline"] or []).startswith(f"{prefix} {sqlite_server.home}")]
        # a child the spawner has just forked carries the spawner's title until it renames itself
        pids = {p.pid for p in found}
        return [p for p in found if p.info["ppid"] not in pids]

    deadline = time.monotonic() + 10  # RUNNING is recorded just before the supervisor is asked for
    while not (sups := [p for p in named("mljobs-supervisor") if job.id in " ".join(p.info["cmdline"])]):
        assert time.monotonic() < deadline, "no supervisor for the running job"
        time.sleep(0.02)
    spawners = named("mljobs-spawner")
    assert len(spawners) == 1
    assert len(sups) == 1 and sups[0].ppid() == spawners[0].pid  # ps names each instance's supervisor
    spawners[0].kill()
    assert job.result(timeout=60) == 5  # a running job does not depend on the spawner
    again = _sleeper(s, pool="DEFAULT_POOL", seconds=0.1)
    assert again.result(timeout=60) == 0.1  # the provider starts a fresh spawner
    assert len([p for p in named("mljobs-spawner") if p.status() != psutil.STATUS_ZOMBIE]) == 1


def test_memory_is_limited_by_the_instance_family(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=lite)  # CPU_X64_XS: 2 GiB per node
    def hog():
        import os

        block = bytearray(3 * 2**30)  # more than the family allows, touched page by page
        for i in range(0, len(block), 4096):
            block[i] = 1
        return len(block), os.getpid()

    job = hog()
    assert job.wait(timeout=60) == JOB_STATUS.FAILED
    assert job.message.startswith("out of memory: ") and "CPU_X64_XS allows 2 GiB" in job.message
    assert "pool DEFAULT_POOL" in job.message
    with pytest.raises(mljobs.JobFailedError, match="out of memory"):
        job.result()
