"""Start (or find) the embedded local control plane for an MLJOBS_HOME.

The first client to need it starts ``python -m mljobs server start`` in the background, in
its own session, under a file lock, so two clients at once end up sharing one server.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import httpx

from mljobs.errors import ServerUnavailableError
from mljobs.paths import HomePaths

__all__ = ["ensure_server", "find_server"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def find_server(home: HomePaths) -> str | None:
    """The URL of the live server of ``home``, or None."""
    try:
        info = json.loads(home.server_info.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    url = info.get("url")
    return url if url and _answers(url) else None


def ensure_server(home: HomePaths, timeout_s: float = 60.0) -> str:
    """The URL of the home's server, starting one first if none answers."""
    url = find_server(home)
    if url:
        return url
    home.root.mkdir(parents=True, exist_ok=True)
    with open(home.start_lock, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        url = find_server(home)
        if url:
            return url
        env = dict(os.environ, MLJOBS_HOME=str(home.root))
        env.pop("MLJOBS_URL", None)
        with open(home.server_log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mljobs", "server", "start"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            url = find_server(home)
            if url:
                return url
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = home.server_log.read_text(errors="replace").splitlines()[-15:] if home.server_log.exists() else []
        raise ServerUnavailableError(
            f"the embedded mljobs server for MLJOBS_HOME={home.root} did not start "
            f"(exit code {proc.poll()}); its log {home.server_log} ends with:\n" + "\n".join(tail)
        )
