"""The CLI as an operator meets it, run as a subprocess against a real server: it says only what
happened, and refuses what would lock the operator out."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from mljobs.client.session import Session
from tests.conftest import ServerProc, assert_no_leftovers

CLI = [sys.executable, "-m", "mljobs"]


def _cli(srv: ServerProc, *args: str, token: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = srv.env()
    env.pop("MLJOBS_TOKEN", None)
    if token:
        env["MLJOBS_TOKEN"] = token
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _said(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stdout + done.stderr).split())


def test_a_first_user_must_be_an_admin(tmp_path):
    srv = ServerProc(tmp_path / "home")
    # no server yet: the CLI writes the store itself
    refused = _cli(srv, "user", "create", "alice")
    assert refused.returncode != 0 and "--admin" in _said(refused), _said(refused)
    srv.start()
    try:
        refused = _cli(srv, "user", "create", "alice")  # through the running server
        assert refused.returncode != 0 and "--admin" in _said(refused), _said(refused)
        assert Session(url=srv.url).request("GET", "/whoami").json()["admin"] is True  # nothing changed
        made = _cli(srv, "user", "create", "ops", "--admin")
        assert made.returncode == 0, _said(made)
        token = made.stdout.strip()
        alice = _cli(srv, "user", "create", "alice", token=token)  # now a plain user is fine
        assert alice.returncode == 0, _said(alice)
        stopped = _cli(srv, "server", "stop", token=token)
        assert stopped.returncode == 0, _said(stopped)
    finally:
        srv.stop()
    assert_no_leftovers(srv.home)


def test_server_stop_without_the_token_it_needs_says_so_and_stops_nothing(tmp_path):
    srv = ServerProc(tmp_path / "home")
    srv.start()
    root = Session(url=srv.url).request("POST", "/users", json={"name": "root", "admin": True}).json()["token"]
    try:
        t = time.monotonic()
        refused = _cli(srv, "server", "stop")
        said = _said(refused)
        assert refused.returncode != 0 and "MLJOBS_TOKEN" in said and "admin" in said, said
        assert "stopped" not in said.replace("not stopped", ""), said
        assert time.monotonic() - t < 20  # it answers, instead of waiting a minute for a pid
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # still running
        stopped = _cli(srv, "server", "stop", token=root)
        assert stopped.returncode == 0 and "stopped" in _said(stopped), _said(stopped)
        assert srv.proc is not None and srv.proc.wait(10) is not None  # and it really has
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            httpx.post(srv.url + "/api/v1/server/shutdown", headers={"authorization": f"Bearer {root}"}, timeout=30)
            srv.proc.wait(60)
    assert_no_leftovers(srv.home)
