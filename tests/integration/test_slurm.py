"""The Slurm provider on a real Slurm cluster (scripts/slurm-cluster: slurmctld and three slurmd,
each node its own network namespace and host name).

The control plane and the client run inside the controller's namespace (this test's main thread
enters it for the module), bound to the controller's address, which the nodes reach over the
cluster's bridge; nothing gets an address in the machine's own namespace. The agents on the nodes
report over HTTP with their job's token. Skipped, with the reason printed, where the cluster
cannot be made (no root, no namespaces, no apt); never otherwise.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mljobs
from mljobs import JOB_STATUS, Session
from mljobs.errors import InvalidArgumentError
from tests.conftest import ServerProc, assert_no_leftovers

pytestmark = [pytest.mark.slurm]
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """Move this thread (the test's main thread) into the network namespace ``fd`` refers to;
    processes and threads it starts from then on are there too."""
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def _payload_processes(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


class SlurmEnv:
    def __init__(self, cluster: Any, server: ServerProc, token: str) -> None:
        self.cluster, self.server, self.token = cluster, server, token
        self.session = Session(url=server.url, token=token)
        self.options = {"partition": cluster.partition, "shared_paths": [str(server.home)],
                        "output": str(server.home / "slurm-%j.out")}


def _free_port(address: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _start(cluster: Any, home: Path, extra_env: dict[str, str] | None = None) -> tuple[ServerProc, str]:
    env = dict(os.environ, MLJOBS_HOME=str(home))
    made = subprocess.run([sys.executable, "-m", "mljobs", "user", "create", "admin", "--admin"], env=env,
                          capture_output=True, text=True, check=True)
    token = made.stdout.strip().splitlines()[-1]
    srv = ServerProc(home, extra_env={"MLJOBS_DEFAULT_POOL": "0", "MLJOBS_HEARTBEAT_TIMEOUT_S": "8",
                                      "MLJOBS_TOKEN": "", **(extra_env or {})},
                     # a fixed port: the nodes' agents keep reporting to it across a server restart
                     args=["--host", cluster.controller_address, "--port", str(_free_port(cluster.controller_address))])
    srv.token = token
    srv.start()
    return srv, token


@pytest.fixture(scope="module")
def slurm(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmEnv]:
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ctl = os.open(f"/run/netns/{slurm_cluster.controller_namespace}", os.O_RDONLY | os.O_CLOEXEC)
    _setns(ctl)
    os.close(ctl)
    home = tmp_path_factory.mktemp("slurm-home")
    # the nodes' agents keep their job folders here (under /tmp, where a job's own uid may pass),
    # not in /tmp/mljobs-node: what the fault tests' killed agents leave goes with the module
    nodes = Path(tempfile.mkdtemp(prefix="mljobs-nodes-"))
    nodes.chmod(0o755)
    srv, token = _start(slurm_cluster, home, {"MLJOBS_NODE_DIR": str(nodes)})
    env = SlurmEnv(slurm_cluster, srv, token)
    try:
        mljobs.create_compute_pool("HPC", instance_family="CPU_X64_XS", max_nodes=3, provider="slurm",
                                   provider_options=env.options, session=env.session)
        yield env
    finally:
        srv.stop()
        _setns(own)
        os.close(own)
        assert_no_leftovers(home)
        shutil.rmtree(nodes, ignore_errors=True)


def test_function_job_returns_its_value_and_log(slurm: SlurmEnv) -> None:
    @mljobs.remote("HPC", stage_name="payload_stage", session=slurm.session)
    def where(n: int) -> tuple[int, str, int]:
        import os
        import socket

        print("hello from", socket.gethostname())
        return n * 2, socket.gethostname(), os.getuid()

    job = where(21)
    assert job.wait(timeout=120) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
    value, host, uid = job.result()
    assert value == 42 and host in slurm.cluster.nodes
    assert f"hello from {host}" in job.get_logs()
    # the node's agent ran it in the job's sandbox (the server has users: shared, a uid of the
    # owner's own, out only through its egress proxy; it still reached the control plane)
    isolation = slurm.session.request("GET", f"/jobs/{job.id}").json()["instances"][0]["isolation"]
    assert isolation == f"sandbox (shared, uid {uid} (admin), egress by integrations)" and uid != 0, isolation


def test_file_job_returns_dunder_return(slurm: SlurmEnv, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\n__return__ = {'epochs': int(sys.argv[2])}\n")
    job = mljobs.submit_file(str(script), "HPC", stage_name="payload_stage", args=["--epochs", "3"],
                             session=slurm.session)
    assert job.wait(timeout=120) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
    assert job.result() == {"epochs": 3}
    assert "args ['--epochs', '3']" in job.get_logs()


def _rendezvous_app(app: Path, head_returns: str) -> None:
    """``rdv.py``: rank 0 listens at MASTER_ADDR:MASTER_PORT and collects every other rank's host
    name over TCP; its ``__return__`` is ``head_returns`` (of ``world`` and ``peers``)."""
    app.mkdir(exist_ok=True)
    (app / "rdv.py").write_text(textwrap.dedent("""
        import os, socket, time
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        head, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if rank == 0:
            srv = socket.create_server((head, port))
            peers = [srv.accept()[0].recv(100).decode() for _ in range(world - 1)]
            __return__ = HEAD_RETURNS
        else:
            for _ in range(300):
                try:
                    s = socket.create_connection((head, port), timeout=2)
                    break
                except OSError:
                    time.sleep(0.1)
            s.sendall(socket.gethostname().encode())
            __return__ = socket.gethostname()
    """).replace("HEAD_RETURNS", head_returns))


def test_parallel_job_rendezvous_across_nodes(slurm: SlurmEnv, tmp_path: Path) -> None:
    _rendezvous_app(tmp_path / "app", "sorted(peers + [socket.gethostname()])")
    job = mljobs.submit_directory(str(tmp_path / "app"), "HPC", entrypoint="rdv.py", stage_name="payload_stage",
                                  target_instances=3, parallel=True, session=slurm.session)
    assert job.wait(timeout=180) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
    assert job.result() == sorted(slurm.cluster.nodes)


def test_parallel_function_runs_on_every_node(slurm: SlurmEnv) -> None:
    """``@remote(..., parallel=True)`` on a Slurm pool: the function runs on every allocated node,
    each with its rank; ``distributed_result`` gives every instance's value."""
    @mljobs.remote("HPC", stage_name="payload_stage", target_instances=3, parallel=True, session=slurm.session)
    def rank_and_host(scale: int) -> tuple[int, int, str]:
        import os
        import socket

        return int(os.environ["RANK"]) * scale, int(os.environ["WORLD_SIZE"]), socket.gethostname()

    job = rank_and_host(10)
    res = job.distributed_result(timeout=180)
    assert res.ok, (res, job.get_logs(verbose=True))
    assert [r[:2] for r in res.results] == [(0, 3), (10, 3), (20, 3)]
    assert sorted(r[2] for r in res.results) == sorted(slurm.cluster.nodes)  # one instance a node
    assert job.result() == res.results[0]  # the head's


def test_a_sandboxed_job_sees_the_pools_mounts_and_nothing_else_of_the_node(slurm: SlurmEnv, tmp_path: Path) -> None:
    """A Slurm pool's ``mounts`` (an admin's): the node's sandbox binds them (here a scratch folder,
    read-write) and no other folder of the node."""
    scratch, hidden = tmp_path / "scratch", tmp_path / "hidden"
    for d in (scratch, hidden):
        d.mkdir()
        d.chmod(0o1777)  # the job runs as a uid of its owner's own
    (hidden / "secret").write_text("not for jobs")
    mljobs.create_compute_pool("HPCMOUNT", instance_family="CPU_X64_XS", max_nodes=1, provider="slurm",
                               provider_options={**slurm.options, "mounts": [f"{scratch}:rw"]}, session=slurm.session)
    try:
        @mljobs.remote("HPCMOUNT", stage_name="payload_stage", session=slurm.session)
        def write_and_look(scratch: str, hidden: str) -> tuple[bool, bool]:
            import os

            with open(os.path.join(scratch, "out.txt"), "w") as f:
                f.write("from the job")
            return os.path.exists(hidden), os.path.exists(os.path.join(hidden, "secret"))

        job = write_and_look(str(scratch), str(hidden))
        assert job.result(timeout=120) == (False, False), job.get_logs(verbose=True)
        assert (scratch / "out.txt").read_text() == "from the job"
        with pytest.raises(InvalidArgumentError, match="is not an absolute path"):
            mljobs.create_compute_pool("HPCMOUNT2", instance_family="CPU_X64_XS", provider="slurm",
                                       provider_options={**slurm.options, "mounts": ["scratch:rw"]},
                                       session=slurm.session)
    finally:
        mljobs.drop_compute_pool("HPCMOUNT", session=slurm.session)


def test_min_instances_is_a_node_range(slurm: SlurmEnv, tmp_path: Path) -> None:
    """With one node busy, a job of 3 instances that needs 2 runs on the 2 Slurm grants."""
    blocker = slurm.cluster.exec(["sbatch", "--parsable", "-w", slurm.cluster.nodes[2], "--cpus-per-task=2",
                                  "--mem=4000M", "--output=/dev/null", "--wrap=sleep 300"])
    sid = blocker.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 30
        while slurm.cluster.exec(["squeue", "-h", "-j", sid, "-o", "%T"]).stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, "the blocker never ran"
            time.sleep(0.2)
        _rendezvous_app(tmp_path / "app", "(world, sorted(peers + [socket.gethostname()]))")
        job = mljobs.submit_directory(str(tmp_path / "app"), "HPC", entrypoint="rdv.py", stage_name="payload_stage",
                                      target_instances=3, min_instances=2, parallel=True, session=slurm.session)
        assert job.wait(timeout=120) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
        assert job.result() == (2, sorted(slurm.cluster.nodes[:2]))
        assert "granted 2 node(s); instance 2 does not run" in job.get_logs(instance_id=2, verbose=True)
    finally:
        slurm.cluster.exec(["scancel", sid])


def test_ray_job_spans_three_slurm_nodes(slurm: SlurmEnv, tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "spread.py").write_text(textwrap.dedent("""
        import socket, ray
        ray.init(address="auto")
        @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
        def host():
            import socket, time
            time.sleep(0.5)
            return socket.gethostname()
        __return__ = sorted(set(ray.get([host.remote() for _ in range(9)])))
    """))
    job = mljobs.submit_directory(str(tmp_path / "app"), "HPC", entrypoint="spread.py", stage_name="payload_stage",
                                  target_instances=3, session=slurm.session)
    assert job.wait(timeout=240) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
    assert job.result() == sorted(slurm.cluster.nodes)
    # each node's instance ran sandboxed, on the nodes' network (where its Ray cluster forms)
    isolation = [i["isolation"] for i in slurm.session.request("GET", f"/jobs/{job.id}").json()["instances"]]
    assert len(isolation) == 3 and all(i.startswith("sandbox (shared, uid ") and "egress" not in i
                                       for i in isolation), isolation
    assert "egress is not filtered" in job.get_logs(instance_id=0, verbose=True)
    deadline = time.monotonic() + 15  # each agent removes its node's Ray folder once it has reported
    while (left := list(Path("/tmp").glob(f"mljr-{job.id[-12:].lower()}-*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray folders left on the nodes: {left}"


def test_cancel_leaves_nothing_on_any_node(slurm: SlurmEnv, tmp_path: Path) -> None:
    marker = "mljobs-slurm-cancel-" + uuid.uuid4().hex[:8]
    script = tmp_path / "sleepy.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        # a grandchild that escapes the process group and the session
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"], start_new_session=True)
        print("ready", flush=True)
        time.sleep(300)
    """))
    job = mljobs.submit_file(str(script), "HPC", stage_name="payload_stage", session=slurm.session)
    deadline = time.monotonic() + 90
    while "ready" not in job.get_logs() and time.monotonic() < deadline:
        assert job.status in (JOB_STATUS.PENDING, JOB_STATUS.RUNNING), job.message
        time.sleep(0.2)
    assert _payload_processes(marker), "the payload's grandchild never started"
    job.cancel()
    assert job.wait(timeout=60) == JOB_STATUS.CANCELLED, job.message
    deadline = time.monotonic() + 20
    while _payload_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _payload_processes(marker)
    deadline = time.monotonic() + 30  # the allocation completes (CG) a moment after the job ended
    while (queued := slurm.cluster.exec(["squeue", "-h", "-n", f"mljobs-{job.id}"]).stdout.strip()) and (
            time.monotonic() < deadline):
        time.sleep(0.2)
    assert queued == ""


def _allocation_state(slurm: SlurmEnv, job_id: str) -> str:
    """The Slurm state of the job's allocation ('' when Slurm no longer lists it)."""
    return slurm.cluster.exec(["squeue", "-h", "-n", f"mljobs-{job_id}", "-o", "%T"]).stdout.strip()


def _wait_allocation_gone(slurm: SlurmEnv, job_id: str) -> str:
    deadline = time.monotonic() + 30  # an allocation completes (CG) a moment after it was cancelled
    while (state := _allocation_state(slurm, job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


def test_cancel_of_a_pending_allocation_ends_at_once(slurm: SlurmEnv, tmp_path: Path) -> None:
    """A job that mljobs started but Slurm still queues (every node taken by another user's job):
    a cancel ends it CANCELLED and removes the allocation from Slurm's queue, instead of a signal
    that a pending allocation never receives and a wait for an agent that never reports."""
    blocker = slurm.cluster.exec(["sbatch", "--parsable", "-N3", "--exclusive", "-o", "/dev/null",
                                  "--wrap", "sleep 300"])
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while "RUNNING" not in slurm.cluster.exec(["squeue", "-h", "-j", blocker_id, "-o", "%T"]).stdout and (
                time.monotonic() < deadline):
            time.sleep(0.2)
        job = mljobs.remote("HPC", stage_name="payload_stage", session=slurm.session)(lambda: 1)()
        deadline = time.monotonic() + 60
        while _allocation_state(slurm, job.id) != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _allocation_state(slurm, job.id) == "PENDING"
        assert job.status == JOB_STATUS.RUNNING, job.message  # mljobs started it; Slurm queues it
        job.cancel()
        assert job.wait(timeout=60) == JOB_STATUS.CANCELLED, job.message
        assert "cancelled before it started on a node; its slurm allocation is stopped" in job.get_logs(verbose=True)
        assert _wait_allocation_gone(slurm, job.id) == ""
    finally:
        slurm.cluster.exec(["scancel", blocker_id])


def test_cancel_while_the_agent_starts_ends_at_once(slurm: SlurmEnv, tmp_path: Path) -> None:
    """A cancel once the allocation runs but before its agent reported (its node still starting
    Python): CANCELLED without waiting for the agent, the allocation and what it started gone."""
    marker = f"300.{uuid.uuid4().int % 10**9:09d}"  # a unique duration marks the allocation's process
    slow = tmp_path / "python"  # the nodes' interpreter: one that never gets as far as the agent
    slow.write_text(f"#!/bin/sh\nexec sleep {marker}\n")
    slow.chmod(0o755)
    mljobs.create_compute_pool("HPCSLOW", instance_family="CPU_X64_XS", max_nodes=1, provider="slurm",
                               provider_options={**slurm.options, "python": str(slow)}, session=slurm.session)
    try:
        job = mljobs.remote("HPCSLOW", stage_name="payload_stage", session=slurm.session)(lambda: 1)()
        deadline = time.monotonic() + 60
        while not _payload_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _payload_processes(marker), "the allocation never started its command"
        assert job.status == JOB_STATUS.RUNNING, job.message
        job.cancel()
        assert job.wait(timeout=60) == JOB_STATUS.CANCELLED, job.message
        assert "cancelled before it started on a node; its slurm allocation is stopped" in job.get_logs(verbose=True)
        assert _wait_allocation_gone(slurm, job.id) == ""
        deadline = time.monotonic() + 20
        while _payload_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _payload_processes(marker)
    finally:
        mljobs.drop_compute_pool("HPCSLOW", session=slurm.session)


def test_server_kill9_mid_job_finds_it_again(slurm: SlurmEnv, tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(4)\n__return__ = 'survived'\n")
    job = mljobs.submit_file(str(script), "HPC", stage_name="payload_stage", session=slurm.session)
    deadline = time.monotonic() + 60
    while "started" not in job.get_logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm.server.kill(signal.SIGKILL)
    time.sleep(1)
    slurm.server.start()
    job = mljobs.get_job(job.id, session=Session(url=slurm.server.url, token=slurm.token))
    slurm.session = Session(url=slurm.server.url, token=slurm.token)
    assert job.wait(timeout=90) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
    assert job.result() == "survived"


def _kill_node(slurm: SlurmEnv, host: str, job_id: str, marker: str) -> None:
    """The node dies: its slurmd and every process of the job on it (the agent included)."""
    slurm.cluster.kill_node(host)
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if job_id in cmd or marker in cmd:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_lost_node_is_detected_within_the_heartbeat_timeout(slurm: SlurmEnv, tmp_path: Path) -> None:
    marker = "mljobs-slurm-lost-" + uuid.uuid4().hex[:8]
    script = tmp_path / "doomed.py"
    script.write_text(f"import time\nprint('up {marker}', flush=True)\ntime.sleep(300)\n")
    job = mljobs.submit_file(str(script), "HPC", stage_name="payload_stage", session=slurm.session)
    deadline = time.monotonic() + 60
    while "up" not in job.get_logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    node = job.get_logs(verbose=True)
    host = next(h for h in slurm.cluster.nodes if f"on {h} (" in node)
    _kill_node(slurm, host, job.id, marker)
    killed = time.monotonic()
    assert job.wait(timeout=60) == JOB_STATUS.INTERNAL_ERROR, job.message
    took = time.monotonic() - killed
    assert "lost" in job.message, job.message
    assert took < 8 + 5 + 5, f"detected after {took:.1f} s"  # the timeout, one monitor tick, slack
    slurm.cluster.restart_node(host)


def test_a_lost_node_makes_attempt_2_which_resumes_from_the_checkpoint(slurm: SlurmEnv, tmp_path: Path) -> None:
    """max_retries=1: a node's death (its slurmd and the job's processes killed) requeues the job
    as attempt 2, in a new allocation, which finds what attempt 1 left in MLJOBS_CHECKPOINT_DIR
    (the agent kept it on the stage as it changed) and ends DONE."""
    marker = "mljobs-slurm-retry-" + uuid.uuid4().hex[:8]
    script = tmp_path / "resumable.py"
    script.write_text(textwrap.dedent(f"""
        import os, pathlib, time
        ckpt = pathlib.Path(os.environ["MLJOBS_CHECKPOINT_DIR"]) / "epoch"
        attempt = int(os.environ["MLJOBS_ATTEMPT"])
        start = int(ckpt.read_text()) if ckpt.exists() else 0
        print("up", attempt, "from", start, "{marker}", flush=True)
        if attempt == 1:
            tmp = ckpt.with_name("epoch.tmp")
            tmp.write_text("3")
            tmp.replace(ckpt)  # written whole, then renamed into place
            time.sleep(300)
        __return__ = {{"attempt": attempt, "resumed_from": start}}
    """))
    job = mljobs.submit_file(str(script), "HPC", stage_name="payload_stage", max_retries=1, session=slurm.session)
    deadline = time.monotonic() + 60
    while "up 1" not in job.get_logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "up 1" in job.get_logs(), job.get_logs(verbose=True)
    stage_ckpt = slurm.server.home / "stages" / "PAYLOAD_STAGE" / job.id / "checkpoint" / "0"

    def kept_epoch() -> bool:  # the copy the stage's pointer names holds the file
        try:
            return (stage_ckpt / (stage_ckpt / "CURRENT").read_text() / "epoch").exists()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30  # the agent looks every heartbeat
    while not kept_epoch() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kept_epoch(), "the agent never kept the checkpoint on the stage"
    host = next(h for h in slurm.cluster.nodes if f"on {h} (" in job.get_logs(verbose=True))
    _kill_node(slurm, host, job.id, marker)
    try:
        assert job.wait(timeout=120) == JOB_STATUS.DONE, (job.message, job.get_logs(verbose=True))
        assert job.result() == {"attempt": 2, "resumed_from": 3}
        assert "up 2 from 3" in job.get_logs()
        assert slurm.session.request("GET", f"/jobs/{job.id}").json()["attempt"] == 2
    finally:
        slurm.cluster.restart_node(host)


def test_bad_input_is_refused_and_records_nothing(slurm: SlurmEnv, tmp_path: Path) -> None:
    s = slurm.session
    before = {p for p in mljobs.list_compute_pools(session=s)["name"]}
    with pytest.raises(InvalidArgumentError, match=r"unknown slurm provider option\(s\) \['partiton'\].*partition"):
        mljobs.create_compute_pool("BAD1", instance_family="CPU_X64_XS", provider="slurm",
                                   provider_options={"partiton": "debug"}, session=s)
    with pytest.raises(InvalidArgumentError, match=r"partition 'nope' does not exist.*debug"):
        mljobs.create_compute_pool("BAD2", instance_family="CPU_X64_XS", provider="slurm",
                                   provider_options={"partition": "nope"}, session=s)
    with pytest.raises(InvalidArgumentError, match=r"CPU_X64_S needs 2 CPUs, 8 GiB.*no node of Slurm partition"):
        mljobs.create_compute_pool("BAD3", instance_family="CPU_X64_S", provider="slurm",
                                   provider_options={"partition": "debug"}, session=s)
    assert {p for p in mljobs.list_compute_pools(session=s)["name"]} == before
    mljobs.create_compute_pool("LOCALSTAGE", instance_family="CPU_X64_XS", max_nodes=4, provider="slurm",
                               provider_options={"partition": "debug"}, session=s)
    script = tmp_path / "x.py"
    script.write_text("print(1)\n")
    n_jobs = len(mljobs.list_jobs(limit=0, session=s))
    with pytest.raises(InvalidArgumentError, match=r"cannot read.*shared_paths"):
        mljobs.submit_file(str(script), "LOCALSTAGE", stage_name="payload_stage", session=s)
    mljobs.create_compute_pool("WIDE", instance_family="CPU_X64_XS", max_nodes=4, provider="slurm",
                               provider_options=slurm.options, session=s)
    with pytest.raises(InvalidArgumentError, match=r"target_instances=4, but Slurm partition 'debug' has 3 node"):
        mljobs.submit_file(str(script), "WIDE", stage_name="payload_stage", target_instances=4, parallel=True,
                           session=s)
    assert len(mljobs.list_jobs(limit=0, session=s)) == n_jobs
    mljobs.drop_compute_pool("LOCALSTAGE", session=s)
    mljobs.drop_compute_pool("WIDE", session=s)


def test_unreachable_engine_is_quoted(slurm: SlurmEnv, tmp_path: Path) -> None:
    """A server whose Slurm commands cannot reach a controller says which command failed and why."""
    from mljobs.config import Settings
    from mljobs.paths import HomePaths
    from mljobs.providers.slurm import SlurmProvider
    from mljobs.spec import PoolSpec

    bogus = tmp_path / "slurm.conf"
    bogus.write_text("ClusterName=nowhere\nSlurmctldHost=nowhere(10.213.0.250)\nSlurmctldPort=6999\n"
                     "MessageTimeout=2\nNodeName=x CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=x Default=YES\n")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(bogus)
    try:
        provider = SlurmProvider(HomePaths(tmp_path), Settings(home=tmp_path, advertise_url="http://10.213.0.1:1"))
        with pytest.raises(InvalidArgumentError, match=r"`sinfo -h -o .*` (failed|did not answer)"):
            provider.validate_pool(PoolSpec("P", "CPU_X64_XS", provider="slurm"))
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = old
