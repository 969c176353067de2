"""Multi-node jobs on real Ray clusters.

Network rule: every Ray node here runs inside a network namespace made for the test. With root
and iproute2 the server (started by the test) puts each instance in its own namespace on a
bridge that lives in a namespace of its own; the loopback mode runs the whole server inside a
namespace this test makes. Without root these tests cannot keep Ray off the machine's network,
so they are skipped with that reason printed (never silently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

import mljobs
from mljobs import JOB_STATUS
from mljobs.providers import netns
from tests.conftest import assert_no_ray_left, kill_all, ray_processes, wait_status

pytestmark = pytest.mark.multinode

_REASON = netns.unavailable_reason()
if _REASON is None:
    try:
        import ray  # noqa: F401
    except ImportError:
        _REASON = "ray is not installed (pip install -e '.[test]' installs it)"
if _REASON:
    print(f"SKIP multi-node tests: {_REASON}")
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"multi-node tests need network namespaces: {_REASON}")

def _wait_for_log(job, text: str, instance_id: int = 0, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = job.get_logs(instance_id=instance_id, verbose=True)
        if text in logs:
            return logs
        assert job.status.value in ("PENDING", "RUNNING"), f"{job.id} ended {job.status}: {job.message}\n{logs}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the log of instance {instance_id} of {job.id} after {timeout}s")


def _kill_instance(job, instance_id: int) -> None:
    """SIGKILL an instance's supervisor and everything in its namespace: a node that dies."""
    victims = netns.pids(netns.namespace(job.id, instance_id))
    assert victims
    kill_all(victims)


def _running_forever(session, instances: int):
    """A job of ``instances`` nodes whose payload sleeps, once its payload runs."""
    pool = f"MN{instances}"
    mljobs.create_compute_pool(pool, instance_family="CPU_X64_XS", max_nodes=instances, session=session)

    @mljobs.remote(pool, stage_name="st", target_instances=instances, session=session)
    def forever():
        import time as t

        t.sleep(600)

    job = forever()
    _wait_for_log(job, "running the payload")
    return job


def _host_listeners() -> list[tuple[str, int, int | None]]:
    """TCP sockets listening in the machine's own namespace (the test's): (address, port, pid)."""
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("tcp") if c.status == "LISTEN"]


@pytest.fixture(autouse=True)
def _no_ray_left_behind(tmp_path_factory: pytest.TempPathFactory):
    yield
    assert_no_ray_left(tmp_path_factory.getbasetemp())


@needs_netns
def test_three_nodes_spread_logs_and_dashboard(lite):
    mljobs.create_compute_pool("MN", instance_family="CPU_X64_XS", max_nodes=3, session=lite)
    before = {(a, p) for a, p, _ in _host_listeners()}

    @mljobs.remote("MN", stage_name="st", target_instances=3, session=lite)
    def spread():
        import os
        import time as t

        import ray

        ray.init(address="auto")

        @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
        def where():
            t.sleep(1.0)
            return ray.get_runtime_context().get_node_id(), os.environ.get("MLJOBS_INSTANCE_ID")

        print("payload on the head", flush=True)
        placed = ray.get([where.remote() for _ in range(3)])
        nodes = [n for n in ray.nodes() if n["Alive"]]
        return {"node_ids": [p[0] for p in placed], "nodes": sorted(n["NodeManagerAddress"] for n in nodes),
                "cpus": ray.cluster_resources().get("CPU"), "instance": os.environ["MLJOBS_INSTANCE_ID"]}

    job = spread()
    assert job.target_instances == 3
    logs = _wait_for_log(job, "running the payload")
    assert "3 of 3 instance(s) joined" in logs
    url = job.get_ray_dashboard_url()
    assert url == "http://10.211.0.1:8265"
    page = httpx.get(f"{lite.url}/jobs/{job.id}", timeout=30)  # the web dashboard links it while it runs
    assert page.status_code == 200 and f'id="ray-link" target="_blank" rel="noopener">{url}</a>' in page.text
    # Ray listens only inside the job's namespaces: nothing new in the machine's own.
    new = [(a, p, pid) for a, p, pid in _host_listeners() if (a, p) not in before]
    ray_pids = {p.pid for p in ray_processes()}
    assert not [x for x in new if x[2] in ray_pids], f"Ray listens outside its namespaces: {new}"

    out = job.result(timeout=180)
    assert len(set(out["node_ids"])) == 3, out  # SPREAD put one task on each of three nodes
    assert out["nodes"] == ["10.211.0.1", "10.211.0.2", "10.211.0.3"]  # exactly the job's nodes
    assert out["cpus"] == 3.0 and out["instance"] == "0"  # each node advertises its family's 1 CPU
    assert job.instances_ran == 3
    assert "payload on the head" in job.get_logs()  # the default log is the head's
    worker_log = job.get_logs(instance_id=2, verbose=True)
    assert "joining the Ray cluster at 10.211.0.1:6379 as node 10.211.0.3" in worker_log
    assert "released: the job's head has finished" in worker_log
    cli = subprocess.run([sys.executable, "-m", "mljobs", "logs", job.id, "--instance", "1", "--verbose"],
                         capture_output=True, text=True, env=dict(os.environ, MLJOBS_URL=lite.url), timeout=60)
    assert "joining the Ray cluster at 10.211.0.1:6379 as node 10.211.0.2" in cli.stdout, cli.stderr
    row = mljobs.list_jobs(session=lite).loc[job.id]
    assert row["target_instances"] == 3 and row["instances_ran"] == 3 and row["status"] == "DONE"
    assert [i["exit_code"] for i in job._refresh()["instances"]] == [0, 0, 0]
    assert job.get_ray_dashboard_url() is None  # the job is over


@needs_netns
def test_min_instances_starts_with_the_free_nodes(lite):
    mljobs.create_compute_pool("MN2", instance_family="CPU_X64_XS", max_nodes=2, session=lite)

    @mljobs.remote("MN2", stage_name="st", target_instances=3, min_instances=2, session=lite)
    def count(session: mljobs.Session):
        import os

        import ray

        ray.init(address="auto")
        # the control plane answers at its own address from inside the head's namespace too
        me = mljobs.get_job(os.environ["MLJOBS_JOB_ID"], session=session)
        return len([n for n in ray.nodes() if n["Alive"]]), os.environ["MLJOBS_INSTANCE_COUNT"], me.status.value

    job = count(lite)
    assert job.result(timeout=180) == (2, "2", "RUNNING")
    assert job.instances_ran == 2 and job.min_instances == 2 and job.target_instances == 3


@needs_netns
def test_late_instances_join_when_nodes_free_up(lite):
    mljobs.create_compute_pool("MN", instance_family="CPU_X64_XS", max_nodes=3, session=lite)

    @mljobs.remote("MN", stage_name="st", session=lite)
    def blocker():
        import time as t

        t.sleep(600)

    @mljobs.remote("MN", stage_name="st", target_instances=3, min_instances=2, session=lite)
    def grows():
        import time as t

        import ray

        ray.init(address="auto")
        first = len([n for n in ray.nodes() if n["Alive"]])
        deadline = t.monotonic() + 120
        while t.monotonic() < deadline and len([n for n in ray.nodes() if n["Alive"]]) < 3:
            t.sleep(0.2)
        return first, len([n for n in ray.nodes() if n["Alive"]])

    hold = blocker()
    wait_status(hold, {"RUNNING"})
    job = grows()
    _wait_for_log(job, "running the payload")
    assert job.instances_ran == 2
    hold.cancel()  # its node frees up: the running job gets its third instance
    assert job.result(timeout=180) == (2, 3)
    assert job.instances_ran == 3
    assert "joining the Ray cluster at 10.211.0.1:6379 as node 10.211.0.3" in job.get_logs(instance_id=2, verbose=True)
    assert hold.wait(timeout=60) == JOB_STATUS.CANCELLED


@needs_netns
def test_instances_that_cannot_join_time_out(lite):
    mljobs.create_compute_pool("MN2", instance_family="CPU_X64_XS", max_nodes=2, session=lite)

    @mljobs.remote("MN2", stage_name="st", target_instances=2, join_timeout_s=5, session=lite)
    def never_runs():
        return "ran"

    for _ in range(3):
        job = never_runs()
        # Cut instance 1 off the job's network before it can reach the head (whose start takes
        # seconds), as soon as the scheduler has made the job's namespaces.
        ns = netns.namespace(job.id, 1)
        deadline = time.monotonic() + 30
        while subprocess.run(["ip", "-n", ns, "link", "show", "eth0"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"namespace {ns} was not made"
            time.sleep(0.01)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "down"], check=True)
        status = job.wait(timeout=180)
        if status != JOB_STATUS.DONE:
            break
        # the cut came after instance 1 had joined (this test starved of CPU for seconds on a
        # loaded machine: seen once in a full run on 2 cores); the scenario did not happen, again
    assert status == JOB_STATUS.FAILED, (status, job.message)
    msg = job.message
    assert "only 1 of 2 instance(s) joined the job's Ray cluster within 5 s (min_instances=2)" in msg, msg
    assert "instance(s) [1] did not join" in msg
    with pytest.raises(mljobs.InstancesUnavailableError, match="only 1 of 2"):
        job.result()
    # instance 1 says why it stopped: its own 5 s ran out first, or the head's did and released it
    said = job.get_logs(instance_id=1, verbose=True)
    assert "did not come up within 5 s" in said or "released: the job's head has finished" in said, said


@needs_netns
def test_a_killed_worker_is_reported_and_the_job_goes_on(lite):
    mljobs.create_compute_pool("MN2", instance_family="CPU_X64_XS", max_nodes=2, session=lite)

    @mljobs.remote("MN2", stage_name="st", target_instances=2, session=lite)
    def outlive():
        import time as t

        import ray

        ray.init(address="auto")
        deadline = t.monotonic() + 90
        while t.monotonic() < deadline:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) < 2:
                return len(alive)
            t.sleep(0.2)
        return -1

    job = outlive()
    _wait_for_log(job, "running the payload")
    _kill_instance(job, 1)  # the worker's supervisor and its whole Ray node
    assert job.result(timeout=180) == 1  # Ray saw the node die; the payload carried on
    assert job.status == JOB_STATUS.DONE
    assert "instance 1 (a worker node) was lost" in job.message
    assert "the job goes on with 1 of 2 node(s)" in job.message
    assert "mljobs: instance 1 (a worker node) was lost" in job.get_logs(verbose=True)


@needs_netns
def test_a_dead_head_is_an_internal_error_and_stops_the_workers(lite):
    job = _running_forever(lite, 2)
    _kill_instance(job, 0)
    assert job.wait(timeout=120) == JOB_STATUS.INTERNAL_ERROR
    assert "node lost" in job.message
    assert "released: the job's head has finished" in job.get_logs(instance_id=1, verbose=True)


@needs_netns
def test_cancel_stops_every_instance(lite):
    job = _running_forever(lite, 3)
    assert len(ray_processes()) >= 3
    job.cancel()
    assert wait_status(job, {"CANCELLED"}, timeout=60, allowed={"CANCELLING"}) == "CANCELLED"
    assert not netns.list_job_namespaces(job.id)
    assert [i["status"] for i in job._refresh()["instances"]] == ["EXITED"] * 3
    # the autouse fixture checks that no Ray process, namespace or temp folder is left


RANKS = textwrap.dedent('''
    import os, socket, time
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert os.environ["MLJOBS_INSTANCE_ID"] == str(rank)
    assert os.environ["MLJOBS_INSTANCE_COUNT"] == str(world)
    head, port = os.environ["MLJOBS_HEAD_ADDRESS"], int(os.environ["MLJOBS_RENDEZVOUS_PORT"])
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == (head, str(port))
    assert os.environ["MLJOBS_NODE_ADDRESSES"].split(",")[0] == head
    if os.environ.get("FAIL_RANK") == str(rank):
        raise ValueError(f"rank {rank} fails on purpose")
    if rank == 0:  # a rendezvous across the job's network, like torch.distributed's env://
        srv = socket.create_server((head, port))
        seen = []
        for _ in range(world - 1):
            conn, _ = srv.accept()
            seen.append(int(conn.recv(16)))
            conn.close()
        __return__ = sorted(seen)
    else:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection((head, port), timeout=1).sendall(str(rank).encode())
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.1)
        __return__ = rank
''')


@needs_netns
def test_parallel_runs_every_instance_with_ranks(lite, tmp_path):
    mljobs.create_compute_pool("MN", instance_family="CPU_X64_XS", max_nodes=3, session=lite)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    job = mljobs.submit_file(script, "MN", stage_name="st", target_instances=3, parallel=True, session=lite)
    dist = job.distributed_result(timeout=120)
    assert dist.exit_codes == [0, 0, 0] and dist.ok, (dist, job.message)
    assert dist.results == [[1, 2], 1, 2]
    assert job.result() == [1, 2]  # the job's own result is instance 0's

    bad = mljobs.submit_file(script, "MN", stage_name="st", target_instances=3, parallel=True,
                             env_vars={"FAIL_RANK": "1"}, session=lite)
    assert bad.wait(timeout=120) == JOB_STATUS.FAILED
    dist = bad.distributed_result()
    assert dist.exit_codes[1] == 1 and not dist.ok
    assert isinstance(dist.exception, ValueError) and "rank 1 fails on purpose" in str(dist.exception)
    assert "ValueError: rank 1 fails on purpose" in bad.message
    with pytest.raises(ValueError, match="rank 1"):
        bad.result()


def test_join_timeout_must_be_positive_and_only_parallel_jobs_have_distributed_results(lite):
    # (a function may be parallel too: tests/integration/test_definitions.py runs one)
    with pytest.raises(mljobs.InvalidArgumentError, match="join_timeout_s must be"):
        mljobs.remote("DEFAULT_POOL", stage_name="s", join_timeout_s=0, session=lite)(lambda: 1)()
    with pytest.raises(mljobs.InvalidArgumentError, match="not a parallel job"):
        job = mljobs.remote("DEFAULT_POOL", stage_name="s", session=lite)(lambda: 1)()
        job.distributed_result(timeout=60)


LOOPBACK_DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.conftest import ServerProc, assert_no_leftovers
    import mljobs
    home = Path(sys.argv[2])  # in the test's own temporary folder
    srv = ServerProc(home, extra_env={"MLJOBS_NODE_NETWORK": "loopback"})
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)
        mljobs.create_compute_pool("MN2", instance_family="CPU_X64_XS", max_nodes=2, session=s)

        @mljobs.remote("MN2", stage_name="st", target_instances=2, session=s)
        def nodes():
            import os, ray
            ray.init(address="auto")
            @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
            def where():
                import time; time.sleep(1)
                return ray.get_runtime_context().get_node_id()
            ids = ray.get([where.remote() for _ in range(2)])
            return {"ids": ids, "addresses": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]],
                    "ray_address": os.environ["RAY_ADDRESS"]}

        job = nodes()
        out = job.result(timeout=180)
        out["dashboard"] = job.get_ray_dashboard_url()
        print(json.dumps(out))
    finally:
        srv.stop()
        assert_no_leftovers(home)
''')


@needs_netns
def test_loopback_mode_in_a_namespace_of_the_test(tmp_path):
    """Without namespaces per instance, nodes share loopback with distinct ports. The whole
    server runs in a namespace made here, so Ray's wide binds reach nothing else."""
    ns = f"mljobs-test-{os.getpid()}"
    driver = tmp_path / "driver.py"
    driver.write_text(LOOPBACK_DRIVER)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        root = str(Path(__file__).resolve().parents[2])
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(driver), root, str(tmp_path / "home")],
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(set(result["ids"])) == 2 and result["addresses"] == ["127.0.0.1", "127.0.0.1"]
        host, port = result["ray_address"].split(":")
        assert host == "127.0.0.1" and int(port) != 6379  # a port chosen for this job
    finally:
        kill_all(netns.pids(ns))
        subprocess.run(["ip", "netns", "delete", ns], check=True)
