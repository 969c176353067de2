"""The Ray provider on a real 3-node Ray cluster (no mocks).

The cluster (tests/raycluster.py) runs in network namespaces on a bridge of its own; the mljobs
server under test runs in one more namespace on that bridge, bound to its address there, and the
test's client calls run in a thread that entered that namespace (``env.ns(fn)``). Without root,
`ip` or `nsenter` the tests are skipped with the reason printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mljobs
from tests import raycluster
from tests.conftest import ServerProc

pytestmark = pytest.mark.multinode

_REASON = raycluster.unavailable_reason()
if _REASON:
    print(f"SKIP Ray provider tests: {_REASON}")

POOL = "RAYPOOL"


class NsServer(ServerProc):
    """A real `mljobs server start` inside the cluster's server namespace, bound to its address
    there, with an admin user (a server reachable from other machines needs one)."""

    def __init__(self, home: Path, cluster: raycluster.RayCluster, ns: raycluster.NsThread,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(home, None, extra_env)
        self.cluster, self.ns, self.token = cluster, ns, ""
        self.prefix = cluster.nsenter(cluster.srv_ns)
        self.port = 0  # after the first start, its port: running jobs' agents report there

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.ns(fn, *args, **kwargs)

    def start(self) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.token:
            made = subprocess.run([sys.executable, "-m", "mljobs", "user", "create", "admin", "--admin"],
                                  env=self.env(), capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
            self.token = made.stdout.strip()
        self.args = ["--host", self.cluster.server_address, "--port", str(self.port)]
        url = super().start()
        self.port = json.loads((self.home / "server.json").read_text())["port"]
        return url


class Env:
    def __init__(self, cluster: raycluster.RayCluster, server: NsServer, ns: raycluster.NsThread) -> None:
        self.cluster, self.server, self.ns = cluster, server, ns
        self.session: Any = None

    def connect(self) -> None:
        from mljobs.client.session import Session

        self.session = self.ns(lambda: Session(url=self.server.url, token=self.server.token))

    def ray_status(self, job_id: str) -> str:
        """The Ray job's own status (SUCCEEDED, STOPPED, ...)."""
        from ray.job_submission import JobSubmissionClient

        return self.ns(lambda: JobSubmissionClient(self.cluster.dashboard_url).get_job_status(f"mljobs-{job_id}").value)

    def wait_ray_status(self, job_id: str, want: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.ray_status(job_id)) != want and time.monotonic() < deadline:
            time.sleep(0.3)
        return status

    def options(self, **more: Any) -> dict[str, Any]:
        return {"address": self.cluster.dashboard_url, "shared_paths": [str(self.server.home)], **more}


@pytest.fixture(scope="module")
def cluster() -> Iterator[raycluster.RayCluster]:
    if _REASON:
        pytest.skip(_REASON)
    c = raycluster.RayCluster(nodes=3, cpus=2, memory=10 << 30)  # logical memory: CPU_X64_S fits
    c.start()
    yield c
    left = c.stop()
    assert not left, f"processes of the Ray cluster left running: {left}"
    assert not [n for n in raycluster.leftover_namespaces() if c.tag in n]
    assert not list(Path("/tmp").glob(f"{raycluster.PREFIX}{c.tag}*"))


@pytest.fixture(scope="module")
def env(cluster: raycluster.RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    ns = raycluster.NsThread(cluster.srv_ns)
    home = tmp_path_factory.mktemp("mlray")
    server = NsServer(home, cluster, ns, {"MLJOBS_HEARTBEAT_S": "1", "MLJOBS_HEARTBEAT_TIMEOUT_S": "12"})
    server.start()
    e = Env(cluster, server, ns)
    e.connect()
    ns(mljobs.create_compute_pool, POOL, instance_family="CPU_X64_XS", max_nodes=3, provider="ray",
       provider_options=e.options(), session=e.session)
    yield e
    ns(e.session.close)
    server.stop()
    ns.close()
    left = _wait_gone(str(home))
    assert not left, f"processes of the jobs left running: {left}"


def _job_processes(*needles: str) -> list[tuple[int, str]]:
    """Processes on the machine whose command line contains one of ``needles``."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid() and any(n in cmd for n in needles):
                out.append((p.pid, cmd[:200]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _wait_gone(*needles: str, timeout: float = 20.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while (left := _job_processes(*needles)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _wait_log(job: Any, text: str, instance_id: int = 0, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = job.get_logs(instance_id=instance_id)
        if text in logs:
            return logs
        assert job.status.value in ("PENDING", "RUNNING"), f"{job.id} ended {job.status}: {job.message}\n{logs}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the log of instance {instance_id} of {job.id}")


def test_function_job_returns_its_value_and_log_like_on_the_local_pool(env):
    s = env.session

    def add(a, b):
        import os as o
        import socket

        print("hello from", "ray" if o.environ.get("RAY_ADDRESS") else "local", a + b, flush=True)
        return a + b, o.environ["MLJOBS_INSTANCE_ID"], socket.gethostname() != ""

    def body():
        ray_job = mljobs.remote(POOL, stage_name="st", session=s)(add)(2, 3)
        local_job = mljobs.remote("DEFAULT_POOL", stage_name="st", session=s)(add)(2, 3)
        assert ray_job.result(timeout=120) == local_job.result(timeout=120) == (5, "0", True)
        assert "hello from ray 5" in ray_job.get_logs()
        assert "hello from local 5" in local_job.get_logs()
        assert ray_job.status.value == "DONE"
        return ray_job.id

    job_id = env.ns(body)
    assert not _wait_gone(job_id)
    assert env.wait_ray_status(job_id, "SUCCEEDED") == "SUCCEEDED"


def test_file_job_returns_dunder_return(env, tmp_path):
    script = tmp_path / "main.py"
    script.write_text("import sys, os\nprint('file job on', os.environ['MLJOBS_COMPUTE_POOL'])\n"
                      "__return__ = {'argv': sys.argv[1:], 'answer': 42}\n")

    def body():
        job = mljobs.submit_file(str(script), POOL, stage_name="st", args=["--x", "1"], session=env.session)
        assert job.result(timeout=120) == {"argv": ["--x", "1"], "answer": 42}
        assert f"file job on {POOL}" in job.get_logs()

    env.ns(body)


RENDEZVOUS = textwrap.dedent("""
    import os, socket, time
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    head, port = os.environ["MLJOBS_HEAD_ADDRESS"], int(os.environ["MLJOBS_RENDEZVOUS_PORT"])
    if rank == 0:
        srv = socket.create_server((head, port))
        srv.settimeout(60)
        peers = []
        for _ in range(world - 1):
            conn, (addr, _p) = srv.accept()
            peers.append((conn.recv(64).decode(), addr))
            conn.sendall(b"ok")
            conn.close()
        __return__ = {"head": head, "peers": sorted(peers), "nodes": os.environ["MLJOBS_NODE_ADDRESSES"]}
    else:
        deadline = time.time() + 60
        while True:
            try:
                c = socket.create_connection((head, port), timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        c.sendall(str(rank).encode())
        assert c.recv(2) == b"ok"
        __return__ = {"rank": rank, "me": c.getsockname()[0]}
""")


def test_parallel_job_rendezvous_on_three_distinct_nodes(env, tmp_path):
    script = tmp_path / "rdv.py"
    script.write_text(RENDEZVOUS)

    def body():
        job = mljobs.submit_file(str(script), POOL, stage_name="st", target_instances=3, parallel=True,
                                 session=env.session)
        out = job.distributed_result(timeout=150)
        assert out.ok, (out.exit_codes, out.exception, job.get_logs(instance_id=1))
        return out.results

    head, r1, r2 = env.ns(body)
    addresses = [head["head"], *[addr for _, addr in head["peers"]]]
    assert len(set(addresses)) == 3 and set(addresses) <= set(env.cluster.addresses), head
    assert head["peers"] == sorted([("1", r1["me"]), ("2", r2["me"])])
    assert head["nodes"].split(",") == [head["head"], r1["me"], r2["me"]]


def test_multinode_job_without_parallel_runs_on_the_host_cluster(env):
    def spread():
        import ray

        ray.init(address="auto")
        nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])

        @ray.remote(num_cpus=1)
        def square(x):
            return x * x

        return nodes, sum(ray.get([square.remote(i) for i in range(4)]))

    def body():
        job = mljobs.remote(POOL, stage_name="st", target_instances=3, session=env.session)(spread)()
        value = job.result(timeout=150)
        info = job.get_logs(instance_id=1, verbose=True)
        return value, info, job.id

    (nodes, total), worker_log, job_id = env.ns(body)
    assert nodes == env.cluster.addresses and total == 14
    assert "holding this node" in worker_log and "released" in worker_log
    assert not _wait_gone(job_id)
    assert env.wait_ray_status(job_id, "SUCCEEDED") == "SUCCEEDED"


def _make_sleeper():
    """A payload that starts a child with ``marker`` in its argv, then sleeps (made here, so that
    cloudpickle sends it by value: the nodes do not import the tests)."""

    def sleeper(marker: str):
        import subprocess as sp
        import sys as s
        import time as t

        sp.Popen([s.executable, "-c", "import time; time.sleep(600)", marker])
        print("payload started", flush=True)
        t.sleep(600)

    return sleeper


SLEEPER = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]])
    print("payload started", flush=True)
    time.sleep(600)
""")


def _submit_sleeper(env: Env, marker: str, instances: int, tmp_path: Path):
    """A sleeper on ``instances`` nodes: a function for one, a parallel file job (every instance
    runs it) for more."""
    if instances == 1:
        return mljobs.remote(POOL, stage_name="st", session=env.session)(_make_sleeper())(marker)
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    return mljobs.submit_file(str(script), POOL, stage_name="st", args=[marker], target_instances=instances,
                              parallel=True, session=env.session)


@pytest.mark.parametrize("instances", [1, 3])
def test_cancel_leaves_nothing_on_any_node(env, instances, tmp_path):
    marker = f"mljray-marker-{uuid.uuid4().hex}"

    def start():
        job = _submit_sleeper(env, marker, instances, tmp_path)
        for i in range(instances):
            _wait_log(job, "payload started", instance_id=i)
        return job

    job = env.ns(start)
    assert _job_processes(marker), "the payload's child should run before the cancel"
    t = time.monotonic()
    env.ns(job.cancel)
    assert env.ns(job.wait, 60).value == "CANCELLED"
    left = _wait_gone(marker, job.id)
    assert not left, f"left running after cancel: {left}"
    assert time.monotonic() - t < 30
    assert env.wait_ray_status(job.id, "STOPPED") == "STOPPED"


def test_bad_input_is_refused_and_nothing_recorded(env, tmp_path):
    s = env.session
    script = tmp_path / "x.py"
    script.write_text("__return__ = 1\n")

    def body():
        pools_before = {p for p in mljobs.list_compute_pools(session=s)["name"]}
        jobs_before = len(mljobs.list_jobs(limit=0, session=s))
        errors = {}
        for name, family, opts in [
            ("BAD_OPT", "CPU_X64_XS", env.options(bogus=1)),
            ("BAD_ADDR", "CPU_X64_XS", env.options(address=f"http://{env.cluster.addresses[1]}:8265")),
            ("BAD_FAMILY", "CPU_X64_M", env.options()),
            ("BAD_NOADDR", "CPU_X64_XS", {"shared_paths": [str(env.server.home)]}),
        ]:
            with pytest.raises(mljobs.MLJobsError) as e:
                mljobs.create_compute_pool(name, instance_family=family, max_nodes=3, provider="ray",
                                           provider_options=opts, session=s)
            errors[name] = " ".join(str(e.value).split())
        mljobs.create_compute_pool("NOSHARE", instance_family="CPU_X64_XS", max_nodes=5, provider="ray",
                                   provider_options={"address": env.cluster.dashboard_url}, session=s)
        mljobs.create_compute_pool("WIDE", instance_family="CPU_X64_XS", max_nodes=5, provider="ray",
                                   provider_options=env.options(), session=s)
        with pytest.raises(mljobs.MLJobsError) as e:
            mljobs.submit_file(str(script), "NOSHARE", stage_name="st", session=s)
        errors["stage"] = " ".join(str(e.value).split())
        with pytest.raises(mljobs.MLJobsError) as e:
            mljobs.submit_file(str(script), "WIDE", stage_name="st", target_instances=4, parallel=True, session=s)
        errors["too_many"] = " ".join(str(e.value).split())
        pools_after = {p for p in mljobs.list_compute_pools(session=s)["name"]}
        assert pools_after == pools_before | {"NOSHARE", "WIDE"}
        assert len(mljobs.list_jobs(limit=0, session=s)) == jobs_before
        for p in ("NOSHARE", "WIDE"):
            mljobs.drop_compute_pool(p, session=s)
        return errors

    errors = env.ns(body)
    assert "bogus" in errors["BAD_OPT"] and "address:" in errors["BAD_OPT"] and "shared_paths:" in errors["BAD_OPT"]
    assert f"`JobSubmissionClient('http://{env.cluster.addresses[1]}:8265')` failed" in errors["BAD_ADDR"]
    assert "CPU_X64_M needs 6 CPUs" in errors["BAD_FAMILY"] and "2 CPUs" in errors["BAD_FAMILY"]
    assert "needs provider_options={'address'" in errors["BAD_NOADDR"]
    assert "cannot read" in errors["stage"] and "shared_paths" in errors["stage"]
    assert "target_instances=4" in errors["too_many"] and "3 alive node(s)" in errors["too_many"]


def test_gang_that_cannot_be_placed_fails_with_what_the_cluster_has(env, tmp_path):
    marker = f"mljray-marker-{uuid.uuid4().hex}"

    def body():
        blocker = _submit_sleeper(env, marker, 1, tmp_path)  # takes 1 of some node's 2 CPUs
        _wait_log(blocker, "payload started")
        mljobs.create_compute_pool("RAY_S", instance_family="CPU_X64_S", max_nodes=3, provider="ray",
                                   provider_options=env.options(), session=env.session)
        script = tmp_path / "never.py"
        script.write_text("__return__ = 'placed'\n")
        job = mljobs.submit_file(str(script), "RAY_S", stage_name="st", target_instances=3, parallel=True,
                                 join_timeout_s=4, session=env.session)
        status = job.wait(60).value
        out = job.distributed_result()
        blocker.cancel()
        blocker.wait(60)
        mljobs.drop_compute_pool("RAY_S", session=env.session)
        return status, job.message, out.exception, job.get_logs(verbose=True), job.id

    status, message, exc, logs, job_id = env.ns(body)
    assert status == "FAILED", message
    assert isinstance(exc, mljobs.errors.InstancesUnavailableError), exc
    assert "could not reserve 3 nodes" in str(exc) and "3 alive node(s)" in str(exc), exc
    assert "waiting for the Ray cluster to reserve 3 nodes" in logs
    assert not _wait_gone(job_id, marker)


def test_server_killed_mid_job_finds_it_again(env):
    def start():
        def slow():
            import time as t

            print("slow started", flush=True)
            t.sleep(6)
            return "survived"

        job = mljobs.remote(POOL, stage_name="st", session=env.session)(slow)()
        _wait_log(job, "slow started")
        return job

    job = env.ns(start)
    env.server.kill(signal.SIGKILL)
    time.sleep(1)
    env.server.start()
    env.connect()
    job = env.ns(mljobs.get_job, job.id, session=env.session)
    assert env.ns(job.result, 120) == "survived"


def test_lost_node_is_detected_within_the_heartbeat_timeout(env, tmp_path):
    marker = f"mljray-marker-{uuid.uuid4().hex}"

    def start():
        job = _submit_sleeper(env, marker, 3, tmp_path)
        for i in range(3):
            _wait_log(job, "payload started", instance_id=i)
        return job

    job = env.ns(start)
    env.cluster.kill_node(2)  # a worker node dies, with its Ray node and the instance on it
    t = time.monotonic()

    def detected() -> str:  # the loss is noted on the job (or ends it) the moment it is decided
        while " lost" not in (message := job.message) and time.monotonic() - t < 60:
            time.sleep(0.2)
        return message

    noted = env.ns(detected)
    took = time.monotonic() - t
    status = env.ns(job.wait, 90).value  # then the other instances are stopped (fail fast)
    message = env.ns(lambda: job.message)
    try:
        assert status in ("FAILED", "INTERNAL_ERROR"), message
        assert "was lost" in noted, noted  # the instance on the killed node (bundles map to any node)
        # MLJOBS_HEARTBEAT_TIMEOUT_S=12, plus a 5 s monitor tick, plus slack for a loaded machine
        assert took < 12 + 5 + 8, took
        assert not _wait_gone(marker, job.id)
    finally:
        env.cluster.restart_node(2)


def test_cancel_while_the_agent_starts_stops_the_ray_job_at_once(env, tmp_path):
    """A cancel once the job's Ray job runs but before its agent reports (the node still starting
    Python) ends the job CANCELLED without waiting for an agent that will never come (before,
    it waited for the engine's end, a grace period and the monitor: 14-15 s), and stops the Ray
    job with the process it started."""
    marker = f"300.{uuid.uuid4().int % 10**9:09d}"  # a unique duration marks the entrypoint's process
    slow = tmp_path / "python"  # the nodes' interpreter: one that never gets as far as the agent
    slow.write_text(f"#!/bin/sh\nexec sleep {marker}\n")
    slow.chmod(0o755)
    env.ns(mljobs.create_compute_pool, "RAYSLOW", instance_family="CPU_X64_XS", max_nodes=1, provider="ray",
           provider_options=env.options(python=str(slow)), session=env.session)
    job = env.ns(lambda: mljobs.remote("RAYSLOW", stage_name="st", session=env.session)(lambda: 1)())
    deadline = time.monotonic() + 60
    while not _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _job_processes(marker), "the Ray job's entrypoint never ran"
    assert env.ray_status(job.id) == "RUNNING"
    assert env.ns(lambda: job.status.value) == "RUNNING"
    env.ns(job.cancel)
    assert env.ns(job.wait, 60).value == "CANCELLED", env.ns(lambda: job.message)
    # ended by the cancel itself, not found lost later
    logs = env.ns(job.get_logs, verbose=True)
    assert "cancelled before it started on a node; its ray allocation is stopped" in logs, logs
    assert "lost" not in env.ns(lambda: job.message)
    assert env.wait_ray_status(job.id, "STOPPED") == "STOPPED"
    left = _wait_gone(marker)
    assert not left, f"left running after cancel: {left}"
    env.ns(mljobs.drop_compute_pool, "RAYSLOW", session=env.session)


def test_cancel_while_ray_still_queues_the_job_ends_it_at_once(env, tmp_path):
    """A cancel while Ray holds the job's Ray job PENDING (every CPU of the cluster taken by
    another pool's gang) ends it CANCELLED at once. Ray 2.60 stops a PENDING job only once its
    supervisor actor gets the entrypoint's CPUs (stop_job queues behind its creation): then it
    ends STOPPED, and nothing of it is left (docs/providers.md)."""
    marker = f"mljray-marker-{uuid.uuid4().hex}"
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)

    def fill_the_cluster():
        mljobs.create_compute_pool("RAY_FULL", instance_family="CPU_X64_S", max_nodes=3, provider="ray",
                                   provider_options=env.options(), session=env.session)
        full = mljobs.submit_file(str(script), "RAY_FULL", stage_name="st", args=[marker], target_instances=3,
                                  parallel=True, session=env.session)
        for i in range(3):  # 3 nodes x 2 CPUs: all of them
            _wait_log(full, "payload started", instance_id=i)
        return full, mljobs.remote(POOL, stage_name="st", session=env.session)(lambda: 1)()

    full, job = env.ns(fill_the_cluster)
    deadline, status = time.monotonic() + 30, None
    while status != "PENDING" and time.monotonic() < deadline:
        try:
            status = env.ray_status(job.id)
        except Exception:  # noqa: BLE001 - not submitted to Ray yet
            time.sleep(0.2)
    assert status == "PENDING", status
    time.sleep(1.0)
    assert env.ray_status(job.id) == "PENDING"  # Ray queues it: no CPU is free
    t = time.monotonic()
    env.ns(job.cancel)
    assert env.ns(job.wait, 60).value == "CANCELLED", env.ns(lambda: job.message)
    assert time.monotonic() - t < 10
    assert "cancelled before it started on a node" in env.ns(job.get_logs, verbose=True)
    assert env.ray_status(job.id) == "PENDING"  # what Ray can do: see the docstring
    env.ns(full.cancel)
    assert env.ns(full.wait, 60).value == "CANCELLED"
    assert env.wait_ray_status(job.id, "STOPPED", timeout=60) == "STOPPED"
    assert env.ns(lambda: job.status.value) == "CANCELLED"
    env.ns(mljobs.drop_compute_pool, "RAY_FULL", session=env.session)
    assert not _wait_gone(marker, job.id)


def test_a_quota_holds_a_ray_pools_jobs_in_mljobs_queue(env, tmp_path):
    """mljobs decides what starts on every provider: a Ray pool's job over its owner's
    max_instances waits in mljobs' queue (Ray never sees it), its pending reason naming the limit."""
    marker = f"mljray-marker-{uuid.uuid4().hex}"

    def body():
        mljobs.create_compute_pool("RAYQ", instance_family="CPU_X64_XS", max_nodes=3, provider="ray",
                                   provider_options=env.options(), session=env.session)
        mljobs.set_user_quota("*", "RAYQ", max_instances=1, session=env.session)
        first = mljobs.remote("RAYQ", stage_name="st", session=env.session)(_make_sleeper())(marker)
        _wait_log(first, "payload started")
        second = mljobs.remote("RAYQ", stage_name="st", session=env.session)(lambda: 2)()
        time.sleep(2.0)
        held = second._refresh()
        from ray.job_submission import JobSubmissionClient

        ray_jobs = {j.submission_id for j in JobSubmissionClient(env.cluster.dashboard_url).list_jobs()}
        first.cancel()
        return first, second, held, ray_jobs

    first, second, held, ray_jobs = env.ns(body)
    assert held["status"] == "PENDING" and "max_instances=1" in held["message"], held["message"]
    assert f"mljobs-{first.id}" in ray_jobs and f"mljobs-{second.id}" not in ray_jobs  # Ray never saw it
    assert env.ns(second.result, timeout=90) == 2  # it starts once the first has ended
    assert env.ns(lambda: first.status.value) == "CANCELLED"
    env.ns(mljobs.set_user_quota, "*", "RAYQ", session=env.session)
    env.ns(mljobs.drop_compute_pool, "RAYQ", session=env.session)
    assert not _wait_gone(marker, first.id)
