"""Containment, memory limits on resident memory, and per-job metrics, with real processes.

Every test runs under each mechanism: ``auto`` (a cgroup where the machine lets us write one;
skipped, with the reason printed, where it does not) and ``fallback`` (forced, so the parent-death
signal and the marker sweep are tested everywhere).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mljobs
from mljobs import JOB_STATUS
from mljobs.runtime import containment
from tests.conftest import ServerProc, assert_no_leftovers, host_pids, wait_status

CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/memory")


def cgroups_left(home: Path) -> list[str]:
    """This server's cgroup folders still on the machine (anywhere under /sys/fs/cgroup)."""
    tag = containment.home_tag(home)
    out = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if tag in dirnames:
            out.append(os.path.join(dirpath, tag))
        dirnames[:] = [d for d in dirnames if not d.startswith("mlj-") and dirpath.count("/") < 7]
    return out


@pytest.fixture(params=["auto", "fallback"])
def contained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server whose containment is ``auto`` (a cgroup: skipped where none is writable) or forced
    to ``fallback``; afterwards no process and no cgroup of it is left."""
    home = tmp_path_factory.mktemp("mlh")
    if request.param == "auto":
        plan = containment.detect(home, "auto")
        for d in (plan.kill_dir, plan.memory_dir):
            if d:
                os.rmdir(d)
        if plan.kind == "fallback":
            print(f"SKIP cgroup half: no writable cgroup on this machine ({plan.reason})")
            pytest.skip(f"no writable cgroup: {plan.reason}")
    srv = ServerProc(home, extra_env={"MLJOBS_CONTAINMENT": request.param})
    srv.start()
    srv.mechanism = request.param  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()
        assert_no_leftovers(home)
        assert cgroups_left(home) == [], "cgroups left behind"


def _session(srv: ServerProc) -> mljobs.Session:
    return mljobs.Session(url=srv.url)


def _forker(s, pids: Path):
    """A job that starts a child and a `setsid` grandchild (its own session), records every pid."""
    @mljobs.remote("P1", stage_name="payload_stage", session=s)
    def forker(path: str):
        import os
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        escaped = subprocess.Popen(["setsid", "sh", "-c", "sleep 300 & echo $! > " + path + ".gc; wait"])
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid} {escaped.pid}")
        os.rename(path + ".tmp", path)
        time.sleep(300)

    return forker(str(pids))


def _wait_pids(pids: Path, job_id: str) -> list[int]:
    """The pids the forker job recorded, as this machine numbers them (in a sandbox a job sees
    the numbers of its own PID namespace: the last of each process's NSpid)."""
    gc = pids.with_suffix(".gc")
    deadline = time.monotonic() + 30
    while not (pids.exists() and gc.exists() and gc.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    inner = [int(p) for p in pids.read_text().split()] + [int(gc.read_text())]
    tree = host_pids(inner, job_id)
    assert all(_alive(p) for p in tree)
    return tree


def _sandboxed(s, job) -> bool:
    info = s.request("GET", f"/jobs/{job.id}").json()
    return (info["instances"][0]["isolation"] or "none").startswith("sandbox")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _supervisor(job_id: str) -> psutil.Process:
    sups = [p for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("mljobs-supervisor") and job_id in
            " ".join(p.info["cmdline"])]
    assert len(sups) == 1, sups
    return sups[0]


def test_supervisor_kill9_leaves_nothing_and_the_next_job_waits(contained, tmp_path):
    s = _session(contained)
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=s)
    pids = tmp_path / "pids"
    victim = _forker(s, pids)
    tree = _wait_pids(pids, victim.id)

    sandboxed = _sandboxed(s, victim)

    @mljobs.remote("P1", stage_name="payload_stage", session=s)
    def survivors(pids: list[int]):
        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            except OSError:
                return False

        return [p for p in pids if alive(p)]

    nxt = survivors(tree)  # queued behind the victim on the one-node pool
    assert nxt.status == JOB_STATUS.PENDING
    _supervisor(victim.id).kill()
    killed = time.monotonic()
    if sandboxed:  # the sandbox dies with its supervisor (and its PID namespace with it), server or not
        while any(_alive(p) for p in tree) and time.monotonic() - killed < 1:
            time.sleep(0.01)
        assert [p for p in tree if _alive(p)] == [], "the sandbox's processes outlived its supervisor by 1 s"
    assert wait_status(victim, {"INTERNAL_ERROR"}, timeout=30) == "INTERNAL_ERROR"
    ended = time.monotonic()
    while any(_alive(p) for p in tree) and time.monotonic() - ended < 5:
        time.sleep(0.02)
    assert [p for p in tree if _alive(p)] == [], "processes of the job outlived it by 5 s"
    # nothing of the victim was left when the next job started (a sandboxed job sees only its own
    # processes, so there the check above, before it could start, is the one that counts)
    assert nxt.result(timeout=60) == []


def test_server_and_supervisor_kill9_then_restart_leaves_nothing(contained, tmp_path):
    s = _session(contained)
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=s)
    pids = tmp_path / "pids"
    victim = _forker(s, pids)
    tree = _wait_pids(pids, victim.id)
    sandboxed = _sandboxed(s, victim)
    sup = _supervisor(victim.id)
    contained.kill(signal.SIGKILL)
    sup.kill()
    sup.wait(10)
    time.sleep(0.5)
    if sandboxed:  # the sandbox dies with its supervisor, and its PID namespace with it
        assert not _alive(tree[-1]), "the setsid grandchild outlived its sandbox"
    else:
        assert _alive(tree[-1]), "the setsid grandchild should outlive its supervisor until the server sweeps"
    contained.start()
    again = mljobs.get_job(victim.id, session=_session(contained))
    assert again.wait(timeout=30) == JOB_STATUS.INTERNAL_ERROR
    assert [p for p in tree if _alive(p)] == []


OOM = re.compile(r"^out of memory: \d+(\.\d)? GiB used, CPU_X64_XS allows 2 GiB; ")


def test_over_its_memory_fails_with_what_it_used(contained):
    s = _session(contained)

    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=s)  # CPU_X64_XS: 2 GiB
    def hog():
        chunks = []
        for _ in range(30):  # 3 GiB, touched page by page
            c = bytearray(100 * 2**20)
            for i in range(0, len(c), 4096):
                c[i] = 1
            chunks.append(c)
        return len(chunks)

    job = hog()
    assert job.wait(timeout=90) == JOB_STATUS.FAILED
    assert OOM.match(job.message), job.message
    with pytest.raises(mljobs.JobFailedError):
        job.result()


def test_a_large_sparse_mapping_runs(contained):
    s = _session(contained)

    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=s)
    def sparse():
        import mmap

        noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.12 lacks the name
        m = mmap.mmap(-1, 64 * 2**30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
        m[12345] = 7  # one page touched
        return len(m)

    assert sparse().result(timeout=60) == 64 * 2**30


def test_metrics_of_a_job_that_uses_300_mb_and_2_s_of_cpu(contained):
    s = _session(contained)

    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=s)
    def work():
        import time

        block = bytearray(300 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        t = time.process_time()
        while time.process_time() - t < 2:
            pass
        return len(block)

    job = work()
    assert job.result(timeout=60) == 300 * 2**20
    df = job.get_metrics()
    assert list(df.columns) == ["time", "instance", "cpu_percent", "cpu_seconds", "rss_bytes", "peak_rss_bytes"]
    assert len(df) >= 2 and (df["instance"] == 0).all()
    peak, cpu = df["peak_rss_bytes"].max(), df["cpu_seconds"].max()
    assert 250e6 <= peak <= 450e6, peak  # 300 MB plus the interpreter
    assert 1.5 <= cpu <= 3.0, cpu
    row = mljobs.list_jobs(session=s).loc[job.id]
    assert row["peak_rss_bytes"] == peak and abs(row["cpu_seconds"] - cpu) < 1e-6
    assert df["cpu_percent"].dropna().between(0, 250).all()


def test_metrics_of_a_job_that_never_ran_is_an_empty_frame(contained):
    s = _session(contained)
    mljobs.create_compute_pool("P1", instance_family="CPU_X64_XS", max_nodes=1, session=s)
    mljobs.alter_compute_pool("P1", suspend=True, session=s)

    @mljobs.remote("P1", stage_name="payload_stage", session=s)
    def never():
        return 1

    job = never()
    job.cancel()
    df = job.get_metrics()
    assert df.empty and list(df.columns)[:6] == ["time", "instance", "cpu_percent", "cpu_seconds", "rss_bytes",
                                                 "peak_rss_bytes"]
