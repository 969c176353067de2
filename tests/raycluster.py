"""A real Ray cluster of a few nodes for the Ray provider's tests and benchmark, kept off the
machine's own network.

Every node is its own network namespace (``mljray-<tag>-n<i>``, address ``10.214.0.<i+1>``), on a
bridge that lives in a namespace of its own (``mljray-<tag>-sw``); one more namespace
(``mljray-<tag>-srv``, ``10.214.0.10``) holds the mljobs server under test and the test's client
calls (:class:`NsThread`). The machine's own namespace gets no interface, address or route, as in
:mod:`mljobs.providers.netns`. The head runs the dashboard (the job server) on its address:8265.

Teardown kills the processes inside the cluster's namespaces (never ``ray stop``: it stops Ray
processes by name, on the whole machine, other people's included) and deletes the namespaces.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

__all__ = ["unavailable_reason", "RayCluster", "NsThread", "SUBNET"]

SUBNET = "10.214.0"
PREFIX = "mljray-"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root: a Ray cluster of network namespaces needs root"
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    try:
        import ray  # noqa: F401 - only whether it is there
    except ImportError:
        return "ray is not installed"
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


class NsThread:
    """One thread that lives in a network namespace: what runs in it (and every thread it
    starts) connects from there. The rest of the process stays where it is."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"in-{ns}", initializer=self._enter)

    def _enter(self) -> None:
        fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.ns}")
        finally:
            os.close(fd)

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayCluster:
    """``nodes`` Ray nodes of ``cpus`` CPUs and ``memory`` bytes (Ray's logical memory) each."""

    def __init__(self, nodes: int = 3, cpus: int = 2, memory: int = 6 << 30, tag: str | None = None) -> None:
        self.count, self.cpus, self.memory = nodes, cpus, memory
        self.tag = tag or uuid.uuid4().hex[:6]
        self.sw = f"{PREFIX}{self.tag}-sw"
        self.srv_ns = f"{PREFIX}{self.tag}-srv"
        self.node_ns = [f"{PREFIX}{self.tag}-n{i}" for i in range(nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.server_address = f"{SUBNET}.10"
        self.temp_dirs = [f"/tmp/{PREFIX}{self.tag}-n{i}" for i in range(nodes)]
        self.home = f"/tmp/{PREFIX}{self.tag}-home"
        self.node_dir = f"/tmp/{PREFIX}{self.tag}-jobs"  # the agents' MLJOBS_NODE_DIR: gone with the cluster
        self.dashboard_url = f"http://{self.addresses[0]}:8265"
        self.gcs_address = f"{self.addresses[0]}:6379"
        self.env: dict[str, str] = {}

    # -- network ------------------------------------------------------------------------------
    def _plug(self, ns: str, veth: str, address: str) -> None:
        _ip("netns", "add", ns)
        _ip("-n", self.sw, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.sw, "link", "set", veth, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def nsenter(self, ns: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}"]

    # -- life ---------------------------------------------------------------------------------
    def start(self, env: dict[str, str] | None = None) -> None:
        try:
            _ip("netns", "add", self.sw)
            _ip("-n", self.sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.sw, "link", "set", "br0", "up")
            for i, ns in enumerate(self.node_ns):
                self._plug(ns, f"v{i}", self.addresses[i])
            self._plug(self.srv_ns, "vsrv", self.server_address)
            # HOME of its own: a token that a local ray.init left in ~/.ray would turn Ray's token
            # auth on for the head alone, and its workers could not join
            os.makedirs(self.home, exist_ok=True)
            os.makedirs(self.node_dir, mode=0o755, exist_ok=True)
            self.env = {**os.environ, **(env or {}), "HOME": self.home, "MLJOBS_NODE_DIR": self.node_dir,
                        "RAY_USAGE_STATS_ENABLED": "0",
                        # a dead node is noticed in seconds
                        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
            self._run(self.node_ns[0], [*self._ray, "--head", f"--node-ip-address={self.addresses[0]}",
                                        "--port=6379", f"--temp-dir={self.temp_dirs[0]}", "--include-dashboard=true",
                                        f"--dashboard-host={self.addresses[0]}", "--dashboard-port=8265",
                                        *self._common])
            procs = [self._start_worker(i) for i in range(1, self.count)]
            for p in procs:
                out, _ = p.communicate(timeout=120)
                if p.returncode != 0:
                    raise RuntimeError(f"ray start (worker) failed:\n{out[-3000:]}")
            self.wait_alive(self.count, 60)
        except BaseException:
            self.stop()
            raise

    @property
    def _ray(self) -> list[str]:
        return [sys.executable, "-m", "ray.scripts.scripts", "start"]

    @property
    def _common(self) -> list[str]:
        return [f"--num-cpus={self.cpus}", f"--memory={self.memory}", "--object-store-memory=80000000",
                "--disable-usage-stats"]

    def _start_worker(self, i: int) -> subprocess.Popen[str]:
        return subprocess.Popen(self.nsenter(self.node_ns[i]) + [
            *self._ray, f"--address={self.gcs_address}", f"--node-ip-address={self.addresses[i]}",
            f"--temp-dir={self.temp_dirs[i]}", *self._common], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

    def restart_node(self, i: int) -> None:
        """Start worker node ``i`` again (after :meth:`kill_node`) and wait until it is alive."""
        self.kill_node(i)
        time.sleep(0.5)
        out, _ = self._start_worker(i).communicate(timeout=120)
        deadline = time.monotonic() + 60
        while not any(n["node_ip"] == self.addresses[i] for n in self.alive_nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {i} did not come back:\n{out[-2000:]}")
            time.sleep(0.3)

    def _run(self, ns: str, cmd: list[str]) -> None:
        out = subprocess.run(self.nsenter(ns) + cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd[:6])} ...` failed:\n{(out.stdout + out.stderr)[-3000:]}")

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The head's view of the cluster's nodes (from the server's namespace)."""
        import httpx

        def get() -> list[dict[str, Any]]:
            r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, timeout=10)
            r.raise_for_status()
            return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

        ns = NsThread(self.srv_ns)
        try:
            return ns(get)
        finally:
            ns.close()

    def wait_alive(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except Exception:  # noqa: BLE001 - the dashboard is still coming up
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.alive_nodes())} of {count} Ray nodes alive after {timeout} s")
            time.sleep(0.3)

    def kill_node(self, i: int) -> None:
        """SIGKILL everything in node ``i``'s namespace: a machine that dies."""
        for pid in ns_pids(self.node_ns[i]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster still alive: in its namespaces, or naming its temp dirs."""
        pids = {pid for ns in (*self.node_ns, self.srv_ns) for pid in ns_pids(ns)}
        out = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid in pids or any(t in cmd for t in self.temp_dirs):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def stop(self) -> list[str]:
        """Kill every process of the cluster, delete its namespaces and temp dirs; returns what
        was still alive after SIGTERM and a short wait (for the caller's assertion)."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for p in self.processes():
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        left = [" ".join(p.cmdline()[:3]) for p in self.processes()]
        for ns in (*self.node_ns, self.srv_ns, self.sw):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for t in [*self.temp_dirs, self.home, self.node_dir]:
            shutil.rmtree(t, ignore_errors=True)
        return left


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


if __name__ == "__main__":  # a quick manual check: start, list the nodes, stop
    c = RayCluster()
    t = time.monotonic()
    c.start()
    print(f"up in {time.monotonic() - t:.1f} s:", [(n["node_ip"], n["resources_total"]) for n in c.alive_nodes()])
    print("left:", c.stop(), leftover_namespaces(), sorted(Path("/tmp").glob(f"{PREFIX}*")))
