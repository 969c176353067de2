"""Start (or find) the embedded local control plane for an MLJOBS_HOME.

The first client to need it starts ``python -m mljobs server start`` in the background, fully
detached (its own session, not a child of the client), under a file lock, so two clients at once
end up sharing one server.
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
        pid = _start_detached([sys.executable, "-m", "mljobs", "server", "start"], env, str(home.server_log))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            url = find_server(home)
            if url:
                return url
            if not _alive(pid):
                break
            time.sleep(0.05)
        tail = home.server_log.read_text(errors="replace").splitlines()[-15:] if home.server_log.exists() else []
        raise ServerUnavailableError(
            f"the embedded mljobs server for MLJOBS_HOME={home.root} did not start "
            f"({'it exited' if not _alive(pid) else f'no answer in {timeout_s:g} s'}); its log "
            f"{home.server_log} ends with:\n" + "\n".join(tail)
        )


# Runs in a short-lived intermediate process: start the server in a session of its own with
# its output in the log, print its pid, exit. The server is then no child of the client.
_DETACH = """
import subprocess, sys
with open(sys.argv[1], "ab") as out:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)
print(p.pid, flush=True)
"""


def _start_detached(cmd: list[str], env: dict[str, str], log_path: str) -> int:
    """Start ``cmd`` fully detached (the double fork of a daemon, through an intermediate that
    exits at once): it is reparented to init, so it never lingers as a zombie of a client that
    lives on (a notebook kernel), and a stop does not wait for that client to reap it."""
    out = subprocess.run([sys.executable, "-c", _DETACH, log_path, *cmd], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise ServerUnavailableError(f"could not start the embedded mljobs server ({' '.join(cmd)}): "
                                     f"{out.stderr.strip()[-2000:] or out.stdout.strip()}")
    return int(out.stdout.strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
