"""One instance of a multi-node job: a Ray node, and on the head the wait for enough nodes.

The supervisor's child runs :func:`main` (or ``python -m mljobs.runtime.multinode RUN_DIR`` in
another interpreter) when ``launch["multinode"]`` is set. The provider fills that in::

    {"count": k, "min_instances": m, "parallel": bool, "join_timeout_s": t, "started_at": epoch,
     "addresses": [node address of each instance], "gcs_port", "dashboard_port", "client_port",
     "ports": {ray start option: port, ...} for this instance, "temp_dir": this instance's Ray dir,
     "cpus", "gpus", "memory_bytes": what this node advertises (its family's, not the machine's)}

- Instance 0 is the head: ``ray start --head``, then it waits until ``min_instances`` nodes are
  alive (or fails with :class:`InstancesUnavailableError` saying how many came in how long), then
  runs the payload with ``RAY_ADDRESS`` pointing at this job's own cluster. The Ray processes stay
  in the supervisor's tree, which stops them once the result is written.
- Other instances wait for the head's GCS port, then ``ray start --address ... --block``: they
  live until the server releases them (the supervisor gets SIGUSR1 once the head has ended) or
  their Ray node dies. Raylets also give up on their own when the head's GCS is gone for
  ``_WORKER_GCS_GRACE_S``, so a worker never outlives its head by long, even with no server.
- ``parallel=True``: every instance runs the payload itself, with ranks and a rendezvous
  address in its environment (set by the provider); no Ray node is started.
- ``ray_address`` set (the Ray provider: the nodes already belong to a Ray cluster, whose ports
  a cluster of the job's own would collide with): no Ray node is started either. Instance 0 runs
  the payload with ``RAY_ADDRESS`` pointing at that cluster; the others hold their nodes until
  released (:func:`run_on_host_cluster`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mljobs import logformat
from mljobs.errors import InstancesUnavailableError
from mljobs.runtime import launcher

__all__ = ["main", "enter_netns", "ray_env", "start_head", "wait_for_nodes", "run_worker", "node_env", "DEFAULT_PORTS"]

CLONE_NEWNET = 0x40000000
_WORKER_GCS_GRACE_S = 15  # a raylet exits this long after its head's GCS went away (Ray's default: 60)
_PROGRESS_EVERY_S = 10.0


# Ray's and the rendezvous' ports where every node is a host of its own
DEFAULT_PORTS = {"gcs_port": 6379, "dashboard_port": 8265, "client_port": 10001, "rendezvous_port": 29500}


def node_env(mn: dict[str, Any], instance_id: int) -> dict[str, str]:
    """The variables a multi-node instance's payload sees: the addresses and, for ``parallel``
    jobs, the ranks torch.distributed's ``env://`` method reads; else ``RAY_ADDRESS``."""
    head, k = mn["addresses"][0], mn["count"]
    env = {"MLJOBS_HEAD_ADDRESS": head, "MLJOBS_NODE_ADDRESSES": ",".join(mn["addresses"]),
           "MLJOBS_RENDEZVOUS_PORT": str(mn["rendezvous_port"])}
    if mn["parallel"]:
        env.update(MASTER_ADDR=head, MASTER_PORT=str(mn["rendezvous_port"]), WORLD_SIZE=str(k),
                   RANK=str(instance_id), NODE_RANK=str(instance_id), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    else:  # the job's own cluster, or the cluster its nodes belong to (the Ray provider)
        env["RAY_ADDRESS"] = mn.get("ray_address") or f"{head}:{mn['gcs_port']}"
        if not mn.get("ray_address"):
            env.update(RAY_AUTH_ENV)
    return env


def setns(fd: int, what: str) -> None:
    """Move the calling thread into the network namespace open at ``fd`` (threads it starts after go with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def enter_netns(name: str, control_plane: str | None = None) -> threading.Thread | None:
    """Move this (single-threaded) process into network namespace ``name`` (``ip netns`` names).

    With ``control_plane`` (``http://127.0.0.1:PORT``, the server's own loopback address) the
    same address keeps working inside the namespace: a socket listening there is served by a
    thread that stays in the machine's namespace and forwards each connection to the server.
    Returns that thread, not yet started (start it after any fork)."""
    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, f"network namespace {name}")
    finally:
        os.close(fd)
    target = urlsplit(control_plane or "")
    if target.hostname not in ("127.0.0.1", "localhost") or not target.port:
        os.close(host_fd)
        return None
    listener = socket.create_server(("127.0.0.1", target.port))  # created here: it lives in `name`
    return threading.Thread(target=_forward, args=(listener, host_fd, target.port), daemon=True,
                            name="mljobs-control-plane-forwarder")


def _forward(listener: socket.socket, host_fd: int, port: int) -> None:
    """Accept inside the namespace, connect from the machine's (this thread moves back)."""
    setns(host_fd, "the machine's network namespace")
    os.close(host_fd)
    while True:
        inner, _ = listener.accept()
        try:
            outer = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            inner.close()
            continue
        outer.settimeout(None)
        for a, b in ((inner, outer), (outer, inner)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()


class _SysLog:
    """Appends mljobs' own lines (``sys`` stream) to the instance log, beside the supervisor."""

    def __init__(self, path: str | None) -> None:
        self.path = path  # None in a sandbox, which does not see the log: its stderr, which the supervisor logs

    def __call__(self, text: str) -> None:
        if self.path is None:
            sys.stderr.write(f"mljobs: {text}\n")
            sys.stderr.flush()
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(logformat.format_record(logformat.SYS, text))


# The job's own cluster says its authentication mode rather than letting Ray guess it: Ray 2.5x
# turns token authentication on for `ray start` whenever ~/.ray/auth_token exists (a local
# ray.init writes one), and the job's own clients, which have no token, were then refused.
RAY_AUTH_ENV = {"RAY_AUTH_MODE": "disabled"}


def ray_env() -> dict[str, str]:
    """The environment for ``ray start``: no usage reports, quick failure detection."""
    return {**os.environ, **RAY_AUTH_ENV, "RAY_USAGE_STATS_ENABLED": "0",
            # a dead node is noticed in about 5 s rather than 15-30 s
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
            "RAY_gcs_rpc_server_reconnect_timeout_s": str(_WORKER_GCS_GRACE_S)}


def _dashboard_installed() -> bool:
    """Whether ``ray[default]`` (the dashboard's own dependencies) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "aiohttp_cors", "ray.dashboard"))


def _node_args(mn: dict[str, Any], instance_id: int) -> list[str]:
    args = [f"--node-ip-address={mn['addresses'][instance_id]}", f"--temp-dir={mn['temp_dir']}",
            f"--num-cpus={mn['cpus']}", f"--num-gpus={mn['gpus']}", f"--memory={mn['memory_bytes']}",
            f"--object-store-memory={max(80 << 20, min(2 << 30, int(mn['memory_bytes'] * 0.3)))}",
            "--disable-usage-stats"]
    args += [f"--{opt}={port}" for opt, port in sorted((mn.get("ports") or {}).items())]
    return args


def _ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *args]


def gcs_address(mn: dict[str, Any]) -> str:
    return f"{mn['addresses'][0]}:{mn['gcs_port']}"


def start_head(mn: dict[str, Any], run_dir: Path, log: _SysLog) -> dict[str, Any]:
    """``ray start --head`` for this job; writes ``ray.json`` (addresses, dashboard) in ``run_dir``."""
    ip = mn["addresses"][0]
    dashboard = _dashboard_installed()
    args = ["--head", f"--port={mn['gcs_port']}", f"--ray-client-server-port={mn['client_port']}",
            f"--include-dashboard={'true' if dashboard else 'false'}", *_node_args(mn, 0)]
    if dashboard:
        args += [f"--dashboard-host={ip}", f"--dashboard-port={mn['dashboard_port']}"]
    t = time.monotonic()
    log(f"starting the Ray head node at {gcs_address(mn)} ({mn['cpus']} CPU, {mn['gpus']} GPU, "
        f"{mn['memory_bytes']} bytes)")
    out = subprocess.run(_ray(*args), capture_output=True, text=True, env=ray_env(), stdin=subprocess.DEVNULL)
    for line in out.stdout.splitlines() + out.stderr.splitlines():
        log(f"ray: {line}")
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"could not start the Ray head node (ray start exited with {out.returncode}):\n{tail}")
    info = {"gcs_address": gcs_address(mn),
            "dashboard_url": f"http://{ip}:{mn['dashboard_port']}" if dashboard else None}
    tmp = run_dir / "ray.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, run_dir / "ray.json")
    log(f"Ray head node up in {time.monotonic() - t:.2f} s")
    return info


def wait_for_nodes(mn: dict[str, Any], log: _SysLog) -> int:
    """Block until ``min_instances`` Ray nodes are alive; returns how many are. Raises
    :class:`InstancesUnavailableError` when the job's join timeout passes first."""
    import ray

    want, count = mn["min_instances"], mn["count"]
    deadline = mn["started_at"] + mn["join_timeout_s"]
    os.environ.update(RAY_AUTH_ENV)
    ray.init(address=gcs_address(mn), logging_level=logging.WARNING, log_to_driver=False)
    try:
        said = time.monotonic()
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= want:
                waited = time.time() - mn["started_at"]
                log(f"{len(alive)} of {count} instance(s) joined after {waited:.1f} s; running the payload")
                return len(alive)
            now = time.time()
            if now >= deadline:
                joined = {n.get("NodeManagerAddress") for n in alive}
                missing = [i for i, a in enumerate(mn["addresses"]) if a not in joined]
                which = (f"; instance(s) {missing} did not join" if len(set(mn["addresses"])) == count
                         and missing else "")
                raise InstancesUnavailableError(
                    f"only {len(alive)} of {count} instance(s) joined the job's Ray cluster within "
                    f"{mn['join_timeout_s']:g} s (min_instances={want}){which}. Each instance's log tells why "
                    "(get_logs(instance_id=i), `mljobs logs JOB --instance i`); raise join_timeout_s, "
                    "lower min_instances, or use a pool with free nodes.")
            if time.monotonic() - said >= _PROGRESS_EVERY_S:
                said = time.monotonic()
                log(f"waiting for instances: {len(alive)} of {count} joined (need {want}), "
                    f"{deadline - now:.0f} s left")
            time.sleep(0.1)
    finally:
        ray.shutdown()


def _wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Whether ``host:port`` accepts a connection before ``deadline`` (tried at least once)."""
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            if time.time() >= deadline:
                return False
            time.sleep(0.1)


def run_worker(mn: dict[str, Any], instance_id: int, log: _SysLog) -> int:
    """Join the head's cluster and stay until stopped; returns ``ray start --block``'s exit code."""
    head, port = mn["addresses"][0], mn["gcs_port"]
    deadline = mn["started_at"] + mn["join_timeout_s"]
    t = time.monotonic()
    if not _wait_for_port(head, port, deadline):
        print(f"mljobs: the head node's Ray GCS at {head}:{port} did not come up within "
              f"{mn['join_timeout_s']:g} s; see the head's log (instance 0)", file=sys.stderr)
        return 1
    log(f"joining the Ray cluster at {head}:{port} as node {mn['addresses'][instance_id]}")
    proc = subprocess.Popen(_ray(f"--address={head}:{port}", "--block", *_node_args(mn, instance_id)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ray_env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        log(f"ray: {line.rstrip()}")
        if "Ray runtime started" in line:
            log(f"joined the job's Ray cluster in {time.monotonic() - t:.2f} s")
    code = proc.wait()
    if code != 0:
        print(f"mljobs: this instance's Ray node stopped (ray start exited with {code}); "
              "its log with verbose=True shows Ray's own output", file=sys.stderr)
    return code


def run_on_host_cluster(launch: dict[str, Any], mn: dict[str, Any], instance_id: int, log: _SysLog) -> int:
    """The job's nodes belong to a Ray cluster already: the head runs the payload on it; the
    others wait (their node's reservation held) until the server releases them."""
    if instance_id == 0:
        info = {"gcs_address": mn["ray_address"], "dashboard_url": None}
        tmp = Path(launch["run_dir"]) / "ray.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, Path(launch["run_dir"]) / "ray.json")
        log(f"running the payload on the Ray cluster at {mn['ray_address']} with {mn['count']} node(s) reserved")
        return launcher.main(launch)
    log("holding this node for the job until its head has finished")
    while True:
        time.sleep(3600)


def main(launch: dict[str, Any]) -> int:
    """Run one instance of a multi-node job; 0 on success (the envelope says the rest)."""
    mn = launch["multinode"]
    instance_id = int(launch["instance_id"])
    log = _SysLog(launch["log_file"])
    if mn["parallel"]:
        return launcher.main(launch)
    if mn.get("ray_address"):
        return run_on_host_cluster(launch, mn, instance_id, log)
    if instance_id != 0:
        return run_worker(mn, instance_id, log)
    try:
        start_head(mn, Path(launch["run_dir"]), log)
        wait_for_nodes(mn, log)
    except BaseException as e:  # noqa: BLE001 - every failure travels as data
        envelope = launcher.exception_envelope(e)
        sys.stderr.write(f"{envelope['exc_type']}: {envelope['exc_message']}\n")
        launcher.write_envelope(Path(launch["result_file"]), envelope)
        return 1
    return launcher.main(launch)


if __name__ == "__main__":
    with open(Path(sys.argv[1]) / "launch.json") as f:
        sys.exit(main(json.load(f)))
