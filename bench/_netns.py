"""Run a benchmark's Ray half inside a network namespace made for it (loopback only).

Ray binds every interface and probes outside addresses; inside a fresh namespace it can reach
nothing but itself. Needs root and iproute2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any


def kill_netns_processes(ns: str) -> None:
    """SIGKILL every process inside network namespace ``ns`` (never `pkill -f ray`: that matches
    anything with "ray" in its command line, far outside the namespace)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def run_ray_half(script: str, args: list[str], timeout_s: float = 900) -> dict[str, Any] | str:
    """``python script --ray-inner ARGS`` in a new namespace; its last stdout line (JSON), or why not."""
    if not shutil.which("ip") or os.geteuid() != 0:
        return "skipped: needs root and iproute2 for a network namespace"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "skipped: ray is not installed (pip install -e '.[bench]')"
    ns = f"mljobs-bench-{os.getpid()}"
    # Cleanup must run even when the benchmark is stopped from outside (SIGTERM, Ctrl-C).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, script, "--ray-inner", *args],
                             capture_output=True, text=True, timeout=timeout_s,
                             env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        if out.returncode != 0:
            return f"failed: {out.stderr[-800:]}"
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        kill_netns_processes(ns)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
