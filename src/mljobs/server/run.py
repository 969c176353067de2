"""Run the control plane: one per MLJOBS_HOME (a file lock), bound to 127.0.0.1."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from mljobs.config import Settings
from mljobs.errors import ConflictError
from mljobs.paths import HomePaths
from mljobs.server.app import create_app
from mljobs.server.auth import is_loopback
from mljobs.server.service import ControlPlane
from mljobs.server.store import Store

__all__ = ["serve", "read_server_info"]

log = logging.getLogger("mljobs.server")


def read_server_info(home: HomePaths) -> dict[str, Any] | None:
    try:
        return json.loads(home.server_info.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _bind(host: str, port: int, previous: int | None) -> socket.socket:
    """Bind ``port``; with 0, prefer the previous server's port so running jobs find us again."""
    for candidate in ([previous] if port == 0 and previous else []) + [port]:
        # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and without
        # it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if candidate == port:
                raise
            continue
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock
    raise AssertionError("unreachable")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until SIGTERM/SIGINT (jobs keep running) or an API shutdown (jobs are stopped)."""
    home = HomePaths(settings.home)
    home.root.mkdir(parents=True, exist_ok=True)
    lock = open(home.server_lock, "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = read_server_info(home) or {}
        raise ConflictError(
            f"an mljobs server already runs for MLJOBS_HOME={home.root} (pid {info.get('pid')}, "
            f"{info.get('url')}); `mljobs server stop` stops it") from None
    store = (Store(settings.database_url, settings.store_busy_timeout_s) if settings.database_url
             else Store.sqlite(home.database, settings.store_busy_timeout_s))
    loopback = is_loopback(host)
    if not loopback:
        store.migrate()
        if not (store.has_users() or settings.token):
            store.close()
            raise ConflictError(
                f"refusing to serve on {host}: a server reachable from other machines needs users, and this one "
                f"has none. Create an admin first (`mljobs user create NAME --admin` with the same MLJOBS_HOME "
                f"or MLJOBS_DATABASE_URL prints their token), or bind to 127.0.0.1")
    previous = (read_server_info(home) or {}).get("port")
    sock = _bind(host, port, previous)
    bound = sock.getsockname()[1]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{bound}"
    cp = ControlPlane(settings, store, url, loopback=loopback)
    cp.start()
    stop_jobs = threading.Event()
    server: uvicorn.Server

    def shutdown() -> None:
        stop_jobs.set()
        server.should_exit = True

    app = create_app(cp, on_shutdown=shutdown)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    info = {"url": url, "port": bound, "pid": os.getpid(), "store": store.engine.dialect.name}
    tmp = home.server_info.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, home.server_info)
    log.warning("mljobs server %s (pid %d, home %s)", url, os.getpid(), home.root)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        server.run(sockets=[sock])
    finally:
        cp.stop(cancel_jobs=stop_jobs.is_set())
        if stop_jobs.is_set():
            _wait_jobs_stopped(cp)
        if (read_server_info(home) or {}).get("pid") == os.getpid():
            home.server_info.unlink(missing_ok=True)
        store.close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _wait_jobs_stopped(cp: ControlPlane, timeout_s: float = 30.0) -> None:


    deadline = time.monotonic() + timeout_s
    while cp.store.live_instances() and time.monotonic() < deadline:
        cp.reconcile(attach=False)
        time.sleep(0.1)
