"""Users, owners and job tokens on a real server: each user sees only their own jobs."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys

import pytest

import mljobs
from mljobs.client.session import Session
from tests.conftest import ServerProc, add_users, assert_no_leftovers


@pytest.fixture
def users(tmp_path_factory):
    """A server with an admin (made by the anonymous local admin) and two plain users."""
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home)
    srv.start()
    assert Session(url=srv.url).request("GET", "/whoami").json()["admin"] is True  # no users yet: the local admin
    sessions = add_users(srv)
    yield srv, sessions
    for s in sessions.values():
        s.close()
    _stop_with_token(srv, sessions["root"].token)  # shutdown needs an admin now
    assert_no_leftovers(home)


def _stop_with_token(srv: ServerProc, token: str) -> None:
    import httpx

    httpx.post(srv.url + "/api/v1/server/shutdown", headers={"authorization": f"Bearer {token}"}, timeout=30)
    srv.proc.wait(60)


def _echo(session, value, stage):
    @mljobs.remote("DEFAULT_POOL", stage_name=stage, session=session)
    def echo(v):
        return v

    return echo(value)


def test_anonymous_refused_once_users_exist(users):
    srv, s = users
    with pytest.raises(mljobs.AuthenticationError, match="MLJOBS_TOKEN"):
        Session(url=srv.url).request("GET", "/jobs")
    with pytest.raises(mljobs.AuthenticationError, match="unknown token"):
        Session(url=srv.url, token="mlu_not-a-token").request("GET", "/jobs")
    assert s["alice"].request("GET", "/whoami").json() == {"name": "alice", "admin": False, "job_id": None}


def test_each_user_sees_only_their_jobs(users):
    srv, s = users
    a = _echo(s["alice"], "a", "alice_stage")
    b = _echo(s["bob"], "b", "bob_stage")
    assert a.result(timeout=60) == "a" and b.result(timeout=60) == "b"
    assert list(mljobs.list_jobs(limit=0, session=s["alice"]).index) == [a.id]
    assert list(mljobs.list_jobs(limit=0, session=s["bob"]).index) == [b.id]
    assert set(mljobs.list_jobs(limit=0, session=s["root"]).index) == {a.id, b.id}
    assert mljobs.list_jobs(limit=0, session=s["alice"])["owner"].tolist() == ["alice"]
    # someone else's job is missing, whatever the call
    for call in (lambda: mljobs.get_job(b.id, session=s["alice"]),
                 lambda: s["alice"].request("GET", f"/jobs/{b.id}/logs"),
                 lambda: s["alice"].request("GET", f"/jobs/{b.id}/result"),
                 lambda: s["alice"].request("POST", f"/jobs/{b.id}/cancel"),
                 lambda: mljobs.delete_job(b.id, session=s["alice"])):
        with pytest.raises(mljobs.NotFoundError, match="not yours"):
            call()
    assert mljobs.get_job(b.id, session=s["bob"]).status == mljobs.JOB_STATUS.DONE  # untouched
    assert mljobs.get_job(b.id, session=s["root"]).result() == "b"  # an admin sees every job
    # stages belong to whoever made them
    with pytest.raises(mljobs.PermissionDeniedError, match="belongs to user 'bob'"):
        _echo(s["alice"], "x", "bob_stage")
    with pytest.raises(mljobs.PermissionDeniedError, match="belongs to user 'bob'"):
        s["alice"].file.list("@bob_stage/")
    assert len(mljobs.list_jobs(limit=0, session=s["alice"])) == 1  # the refused submission left nothing


def test_admin_only_operations(users):
    srv, s = users
    alice = s["alice"]
    for call, what in ((lambda: alice.request("POST", "/users", json={"name": "eve"}), "creating users"),
                       (lambda: alice.request("GET", "/users"), "listing users"),
                       (lambda: alice.request("POST", "/server/shutdown"), "stopping the server"),
                       (lambda: mljobs.create_external_access_integration("X", allowed_hosts=["a.b"], session=alice),
                        "integration"),
                       (lambda: mljobs.create_stage("anywhere", "/etc", session=alice), "stage on '/etc'"),
                       (lambda: mljobs.alter_compute_pool("DEFAULT_POOL", suspend=True, session=alice),
                        "the server")):
        with pytest.raises(mljobs.PermissionDeniedError, match=what):
            call()
    assert mljobs.describe_compute_pool("DEFAULT_POOL", session=alice)["state"] != "SUSPENDED"
    mljobs.create_compute_pool("ALICE_POOL", instance_family="CPU_X64_XS", session=alice)
    assert mljobs.describe_compute_pool("ALICE_POOL", session=alice)["owner"] == "alice"
    with pytest.raises(mljobs.PermissionDeniedError, match="belongs to user 'alice'"):
        mljobs.drop_compute_pool("ALICE_POOL", session=s["bob"])
    mljobs.drop_compute_pool("ALICE_POOL", session=alice)


def test_tokens_stored_hashed(users):
    srv, s = users
    rows = sqlite3.connect(srv.home / "mljobs.db").execute("select name, token_hash from users").fetchall()
    assert {name for name, _ in rows} == {"root", "alice", "bob"}
    assert dict(rows)["alice"] == hashlib.sha256(s["alice"].token.encode()).hexdigest()
    raw = (srv.home / "mljobs.db").read_bytes()
    assert s["alice"].token.encode() not in raw


def test_job_token_acts_for_owner_not_admin(users):
    srv, s = users

    @mljobs.remote("DEFAULT_POOL", stage_name="alice_stage", session=s["alice"])
    def inside():
        import os

        import mljobs as m

        me = m.Session.builder.getOrCreate()
        who = me.request("GET", "/whoami").json()
        try:
            me.request("GET", "/users")
            users_refused = False
        except m.PermissionDeniedError:
            users_refused = True

        @m.remote("DEFAULT_POOL", stage_name="alice_stage", session=me)
        def child():
            return 41 + 1

        return who, users_refused, os.environ["MLJOBS_TOKEN"], child().result(timeout=60)

    job = inside()
    who, users_refused, token, child = job.result(timeout=120)
    assert who == {"name": "alice", "admin": False, "job_id": job.id}
    assert users_refused and child == 42
    assert token.startswith("mlj_") and token not in {x.token for x in s.values()}
    assert len(mljobs.list_jobs(limit=0, session=s["alice"])) == 2  # the child is alice's too
    with pytest.raises(mljobs.AuthenticationError, match="ended"):  # dead once its job ended
        Session(url=srv.url, token=token).request("GET", "/whoami")
    with pytest.raises(mljobs.AuthenticationError, match="not one this server signed"):
        Session(url=srv.url, token=token[:-4] + "0000").request("GET", "/whoami")


def test_cli_user_create_without_a_server_then_non_loopback_refused(tmp_path):
    env = ServerProc(tmp_path).env()
    cmd = [sys.executable, "-m", "mljobs"]
    bare = subprocess.run(cmd + ["server", "start", "--host", "10.255.255.1"], env=env, capture_output=True,
                          text=True, timeout=60)
    said = " ".join(bare.stderr.split())
    assert bare.returncode != 0 and "needs users" in said and "mljobs user create" in said, said
    made = subprocess.run(cmd + ["user", "create", "ops", "--admin"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("mlu_") and "shown once" in " ".join(made.stderr.split())
    row = sqlite3.connect(tmp_path / "mljobs.db").execute("select name, admin, token_hash from users").fetchone()
    assert row == ("ops", 1, hashlib.sha256(token.encode()).hexdigest())
