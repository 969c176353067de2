"""Containment and metrics: mechanism detection from sample text, bounding of samples, messages,
and a supervisor run directly with a memory limit smaller than the interpreter needs."""

from __future__ import annotations

import json
import signal
import os
import subprocess
import sys
from pathlib import Path
import sysconfig
import time

import cloudpickle
import pytest

import mljobs

from mljobs.runtime import containment
from mljobs.runtime.metrics import ROWS_PER_LEVEL, row_interval
from mljobs.server import metrics
from mljobs.spec import INSTANCE_FAMILIES

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:33 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = "4:memory:/process_api/abc\n6:freezer:/\n2:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"
PURE_V2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
CONTAINER = "700 690 0:26 /system.slice/docker-1.scope /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"


def test_mounts_hybrid():
    mounts = containment.parse_mountinfo(HYBRID)
    assert mounts[""] == ("/sys/fs/cgroup/unified", "/")
    assert mounts["memory"] == ("/sys/fs/cgroup/memory", "/") and mounts["cpuacct"][0] == "/sys/fs/cgroup/cpu,cpuacct"
    assert "name=systemd" not in mounts and "tmpfs" not in mounts
    own = containment.candidates(HYBRID, HYBRID_SELF)
    assert own == {"cgroup2": "/sys/fs/cgroup/unified", "freezer": "/sys/fs/cgroup/freezer",
                   "memory": "/sys/fs/cgroup/memory/process_api/abc"}


def test_mounts_pure_v2_and_container_root():
    assert containment.candidates(PURE_V2, "0::/user.slice/session-1.scope\n") == {
        "cgroup2": "/sys/fs/cgroup/user.slice/session-1.scope"}
    # inside a container the mount's root is our own cgroup: its path is the mount point itself
    assert containment.candidates(CONTAINER, "0::/system.slice/docker-1.scope/app\n") == {
        "cgroup2": "/sys/fs/cgroup/app"}
    assert containment.candidates("", "0::/\n") == {}


def test_forced_fallback_and_bad_setting(tmp_path):
    plan = containment.detect(tmp_path, "fallback")
    assert plan.kind == "fallback" and plan.memory == "rss" and "parent-death" in plan.describe()
    assert containment.Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="containment must be one of"):
        containment.detect(tmp_path, "cgroup3")


def test_row_interval_doubles_every_level():
    assert row_interval(0) == row_interval(ROWS_PER_LEVEL - 1) == 1.0
    assert row_interval(ROWS_PER_LEVEL) == 2.0 and row_interval(3 * ROWS_PER_LEVEL) == 8.0
    rows, t = 0, 0.0
    while t < 7 * 24 * 3600:  # a week-long job
        t += row_interval(rows)
        rows += 1
    assert rows < 7000


def test_bound_rows_halves_and_keeps_both_ends():
    rows = [{"t": float(i), "cpu": i / 10, "rss": i, "peak": i} for i in range(5000)]
    out = metrics.bound_rows(rows, 1024)
    assert len(out) <= 1024 and out[0] is rows[0] and out[-1] is rows[-1]
    assert [r["t"] for r in out] == sorted(r["t"] for r in out)
    assert metrics.bound_rows(rows[:10], 1024) == rows[:10]
    assert metrics.decode(metrics.encode(out)) == out and metrics.encode([]) is None


def test_instance_values_add_the_totals_as_a_last_row():
    rows = [{"t": 10.0, "cpu": 0.5, "rss": 100, "peak": 100}]
    vals = metrics.instance_values(rows, {"cpu_seconds": 0.9, "peak_rss_bytes": 150}, 10.5)
    assert vals["cpu_seconds"] == 0.9 and vals["peak_rss_bytes"] == 150
    assert metrics.decode(vals["metrics"])[-1] == {"t": 10.5, "cpu": 0.9, "rss": 0, "peak": 150}
    assert metrics.instance_values([], None, None) == {"cpu_seconds": None, "peak_rss_bytes": None, "metrics": None}
    framed = metrics.frame_rows(0, metrics.decode(vals["metrics"]))
    assert framed[0]["cpu_percent"] is None and framed[1]["cpu_percent"] == pytest.approx(80.0)


def test_oom_message():
    fam = INSTANCE_FAMILIES["CPU_X64_XS"]
    msg = metrics.oom_message(fam, "P1", int(2.3 * 2**30), 2 * 2**30)
    assert msg.startswith("out of memory: 2.3 GiB used, CPU_X64_XS allows 2 GiB; ") and "pool P1" in msg
    assert metrics.oom_message(fam, "P1", None, None).startswith("out of memory: more than allowed used, "
                                                                 "CPU_X64_XS allows 2 GiB")
    assert metrics.fmt_bytes(512 * 2**20) == "512 MiB" and metrics.fmt_bytes(100) == "100 bytes"


@pytest.mark.parametrize("mechanism", ["auto", "fallback"])
def test_a_limit_smaller_than_the_interpreter_fails_fast(tmp_path, mechanism):
    """The supervisor run directly (as the spawner's fork would) with an 8 MiB family."""
    plan = containment.detect(tmp_path / "home", mechanism)
    run, app = tmp_path / "run", tmp_path / "app"
    run.mkdir(), app.mkdir()
    (app / "function.pkl").write_bytes(cloudpickle.dumps({"fn": time.sleep, "args": (2,), "kwargs": {}}))
    python = tmp_path / "python"  # another path: the instance starts a fresh interpreter, as a job environment does
    python.symlink_to(sys.executable)
    launch = {"job_id": "MLJOB_UNIT", "instance_id": 0, "instance_count": 1, "run_dir": str(run),
              "work_dir": str(app), "app_dir": str(app), "log_file": str(tmp_path / "0.log"),
              "result_file": str(run / "result.pkl"), "payload_kind": "function", "entrypoint": [], "args": [],
              "session_param": None, "client_python": "", "client_cloudpickle": "", "env": {}, "cpus": None,
              "memory_bytes": 8 << 20, "python": str(python), "environment": None, "grace_period_s": 1,
              "multinode": None, "netns": None, "containment": plan.to_dict(),
              "metrics_file": str(run / "metrics.jsonl"), "metrics": True, "gpus": []}
    (run / "launch.json").write_text(json.dumps(launch))
    t0 = time.monotonic()
    try:
        # a symlinked interpreter outside the venv does not see the venv's packages: name them
        path = os.pathsep.join([str(Path(mljobs.__file__).parents[1]), sysconfig.get_paths()["purelib"]])
        subprocess.run([sys.executable, "-m", "mljobs.runtime.supervisor", str(run)], timeout=60, check=True,
                       env=dict(os.environ, PYTHONPATH=path))
    finally:
        # the supervisor empties its cgroups and leaves their removal to the server: do it here
        cg = containment.InstanceCgroup(plan, "MLJOB_UNIT", 0)
        left = cg.pids()
        cg.remove()
        for d in (plan.kill_dir, plan.memory_dir):
            if d:
                os.rmdir(d)  # fails (and the test with it) if another cgroup was left inside
    assert left == [], "the supervisor left processes in its cgroups"
    record = json.loads((run / "exit.json").read_text())
    assert time.monotonic() - t0 < 30
    assert record["exit_code"] != 0 and record["oom"]["limit_bytes"] == 8 << 20, record
    assert record["oom"]["used_bytes"] > 0


@pytest.mark.parametrize("cold", [False, True])
def test_a_cancel_sent_as_soon_as_the_supervisors_pid_is_known_is_taken(tmp_path, cold):
    """The server may SIGTERM a supervisor the moment the spawner names it. A warm supervisor used
    to die of it before it could handle it (no exit record; a sandbox's init could be left behind)."""
    import psutil

    from mljobs.paths import HomePaths
    from mljobs.providers.local import _Spawner

    plan = containment.Plan("fallback", None, "rss", None)
    run, app = tmp_path / "run", tmp_path / "app"
    run.mkdir(), app.mkdir()
    (app / "function.pkl").write_bytes(cloudpickle.dumps({"fn": time.sleep, "args": (30,), "kwargs": {}}))
    launch = {"job_id": "MLJOB_UNIT", "instance_id": 0, "instance_count": 1, "run_dir": str(run),
              "work_dir": str(app), "app_dir": str(app), "log_file": str(tmp_path / "0.log"),
              "result_file": str(run / "result.pkl"), "payload_kind": "function", "entrypoint": [], "args": [],
              "session_param": None, "client_python": "", "client_cloudpickle": "", "env": {}, "cpus": None,
              "memory_bytes": None, "python": sys.executable, "environment": None, "grace_period_s": 1,
              "multinode": None, "netns": None, "containment": plan.to_dict(),
              "metrics_file": str(run / "metrics.jsonl"), "metrics": False, "gpus": []}
    (run / "launch.json").write_text(json.dumps(launch))
    (tmp_path / "home").mkdir()
    spawner = _Spawner(HomePaths(tmp_path / "home"), plan, 1)
    try:
        spawner._ensure()  # started, its spare forked
        time.sleep(0.5)
        pid = spawner.spawn(str(run), str(tmp_path / "sup.err"), cold=cold)
        os.kill(pid, signal.SIGTERM)
        psutil.Process(pid).wait(30)
    finally:
        spawner.close()
    record = json.loads((run / "exit.json").read_text())
    assert record["cancelled"] is True, record
