"""Nodes as hosts: one network namespace per instance of a multi-node job, joined by a bridge.

For a job of ``count`` instances the local provider makes ``mlj-<job>-sw`` (a namespace that holds
only the bridge ``br0``) and ``mlj-<job>-<i>`` per instance, each with loopback and ``eth0``, one
end of a veth pair whose other end sits on the bridge, addressed ``10.211.0.<i+1>/24``. Every job
has its own bridge namespace, so jobs cannot reach one another and addresses repeat freely; the
machine's own namespace gets no interface, route or address. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

__all__ = ["unavailable_reason", "namespace", "create", "add", "delete", "pids", "list_job_namespaces", "SUBNET"]

SUBNET = "10.211.0"
_PREFIX = "mlj-"


def unavailable_reason() -> str | None:
    """None when this process can make namespaces, else why not."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "the server does not run as root"
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    return None


def _tag(job_id: str) -> str:
    return job_id.removeprefix("MLJOB_").replace("_", "").lower()[:12]


def namespace(job_id: str, instance_id: int | str) -> str:
    return f"{_PREFIX}{_tag(job_id)}-{instance_id}"


def address(instance_id: int) -> str:
    return f"{SUBNET}.{instance_id + 1}"


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def create(job_id: str, count: int) -> list[str]:
    """Make the job's bridge and ``count`` instance namespaces; returns their addresses."""
    sw = namespace(job_id, "sw")
    try:
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        return add(job_id, range(count))
    except BaseException:
        delete(job_id)
        raise


def add(job_id: str, instance_ids: range) -> list[str]:
    """Plug more instances into an existing job network (late instances); their addresses."""
    sw = namespace(job_id, "sw")
    for i in instance_ids:
        ns = namespace(job_id, i)
        _ip("netns", "add", ns)
        _ip("-n", sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", sw, "link", "set", f"v{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    return [address(i) for i in instance_ids]


def pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def list_job_namespaces(job_id: str | None = None) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    want = _PREFIX + (_tag(job_id) + "-" if job_id else "")
    return [n for n in names if n.startswith(want)]


def delete(job_id: str) -> None:
    """Kill whatever still runs in the job's namespaces, then remove them (idempotent)."""
    for ns in list_job_namespaces(job_id):
        for pid in pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
